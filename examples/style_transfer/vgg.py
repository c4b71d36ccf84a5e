"""VGG-19 ``features`` for style transfer: loading weights, named layers, preprocessing, feature taps.

Shared by the Gatys and AdaIN examples. The network is torchvision's
``vgg19().features`` (16 convs, indices ``0, 2, 5, ...``), so prunekit sees
the conv layers as ``'0'``, ``'2'``, ... and a plan made on it applies to it
directly.

Example:
    >>> torch.manual_seed(0)  # doctest: +SKIP
    >>> features = load_vgg19_features("random")  # doctest: +SKIP
    >>> taps = FeatureExtractor(features, ["relu1_1", "relu2_1"])  # doctest: +SKIP
    >>> sorted(taps(torch.rand(1, 3, 32, 32)))  # doctest: +SKIP
    ['relu1_1', 'relu2_1']
"""

from __future__ import annotations

import os
import urllib.error
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterable, List, Mapping

import torch
import torchvision
from torch import Tensor, nn

from prunekit.sparse import MAGIC as SPARSE_MAGIC
from prunekit.sparse import load_sparse

__all__ = [
    "CAFFE_BGR_MEAN",
    "CONV_LAYER_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LAYER_INDEX",
    "FeatureExtractor",
    "Preprocessor",
    "WeightsUnavailableError",
    "conv_index_names",
    "load_vgg19_features",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Per-channel pixel means (B, G, R) of the original Caffe VGG release, on a 0-255 scale.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)

# Convs per block of VGG-19 ("configuration E").
_BLOCKS = (2, 2, 4, 4, 4)


def _build_layer_index() -> "OrderedDict[str, int]":
    index: "OrderedDict[str, int]" = OrderedDict()
    position = 0
    for block, convs in enumerate(_BLOCKS, start=1):
        for conv in range(1, convs + 1):
            index[f"conv{block}_{conv}"] = position
            index[f"relu{block}_{conv}"] = position + 1
            position += 2
        index[f"pool{block}"] = position
        position += 1
    return index


LAYER_INDEX: Dict[str, int] = dict(_build_layer_index())
"""Caffe-style layer names (``conv1_1``, ``relu1_1``, ..., ``pool5``) -> index in ``vgg19().features``."""

CONV_LAYER_NAMES: List[str] = [name for name in LAYER_INDEX if name.startswith("conv")]
"""The 16 conv layers in order: ``conv1_1`` ... ``conv5_4``."""


def conv_index_names() -> Dict[str, str]:
    """Map prunekit's layer names for ``features`` (``'0'``, ``'2'``, ...) to ``conv1_1``, ``conv1_2``, ..."""
    return {str(LAYER_INDEX[name]): name for name in CONV_LAYER_NAMES}


class WeightsUnavailableError(RuntimeError):
    """The pretrained VGG-19 weights could not be obtained (typically: no internet, nothing cached)."""


def _torchvision_cache_dir() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def _imagenet_state_dict() -> Mapping[str, Tensor]:
    weights = torchvision.models.VGG19_Weights.IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=False, weights_only=True)
    except (urllib.error.URLError, OSError, ConnectionError, TimeoutError) as err:
        filename = os.path.basename(weights.url)
        raise WeightsUnavailableError(
            f"could not download the ImageNet VGG-19 weights ({err.__class__.__name__}: {err}); "
            f"offline, pass --weights PATH to a local VGG-19 state_dict, or copy {filename} "
            f"from {weights.url} into {_torchvision_cache_dir()}, or use --weights random "
            f"for a smoke run"
        ) from None


def _features_state_dict(state: Mapping[str, Tensor], source: str) -> "OrderedDict[str, Tensor]":
    """Normalise a VGG-19 state_dict to the keys of ``vgg19().features`` (``'0.weight'``, ...)."""
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    names_to_index = {name: index for name, index in LAYER_INDEX.items() if name.startswith("conv")}
    out: "OrderedDict[str, Tensor]" = OrderedDict()
    for key, value in state.items():
        if not isinstance(value, Tensor):
            continue
        stripped = key[len("module.") :] if key.startswith("module.") else key
        if stripped.startswith("classifier."):
            continue  # the full VGG's fully-connected head is not used
        if stripped.startswith("features."):
            stripped = stripped[len("features.") :]
        layer, _, param = stripped.rpartition(".")
        if layer in names_to_index:  # Caffe-converted files name layers conv1_1, ...
            layer = str(names_to_index[layer])
        if not layer.isdigit() or param not in ("weight", "bias"):
            raise ValueError(
                f"{source}: unexpected key {key!r}; expected a VGG-19 state_dict with keys like "
                f"'features.0.weight' (full VGG), '0.weight' (features only) or 'conv1_1.weight' "
                f"(Caffe-converted)"
            )
        out[f"{layer}.{param}"] = value
    if not out:
        raise ValueError(f"{source}: no VGG-19 conv weights found in the state_dict")
    return out


def _load_state_dict_file(path: str) -> Mapping[str, Tensor]:
    target = Path(path)
    if not target.is_file():
        raise FileNotFoundError(
            f"weights file {path!r} does not exist; pass 'imagenet', 'random' or the path to a "
            f"VGG-19 state_dict (.pth)"
        )
    with open(target, "rb") as handle:
        is_sparse = handle.read(len(SPARSE_MAGIC)) == SPARSE_MAGIC
    if is_sparse:  # a prunekit.save_sparse checkpoint, e.g. written by the prune command
        return load_sparse(target)
    try:
        state = torch.load(target, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or pickled-model files
        raise ValueError(
            f"cannot read {path!r} as a state_dict ({err.__class__.__name__}); pass a file written by "
            f"torch.save(model.state_dict(), path) or prunekit.save_sparse"
        ) from None
    if not isinstance(state, Mapping):
        raise ValueError(
            f"{path!r} holds a {type(state).__name__}, not a state_dict; save the weights with "
            f"torch.save(model.state_dict(), path)"
        )
    return state


def _vgg19_features_random() -> nn.Sequential:
    """``vgg19().features`` with torchvision's conv initialisation, without building the 120M-parameter head."""
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs["E"], batch_norm=False)
    for module in features.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
    return features


def load_vgg19_features(weights: str = "imagenet") -> nn.Sequential:
    """Return VGG-19 ``features`` frozen in eval mode, with non-in-place ReLUs.

    The ReLUs are made out-of-place so an activation read at ``convX_Y`` is not
    overwritten by the ReLU that follows it.

    Args:
        weights: ``"imagenet"`` (torchvision's ``VGG19_Weights.IMAGENET1K_V1``,
            downloaded once and cached by torchvision), ``"random"`` (initialised
            from the caller's torch seed; for offline smoke runs), or the path to
            a state_dict: a full VGG-19 (``features.N.weight``, ``classifier`` is
            ignored), features only (``N.weight``) or Caffe-converted names
            (``conv1_1.weight``), saved with ``torch.save`` or
            :func:`prunekit.save_sparse`.

    Raises:
        WeightsUnavailableError: ``"imagenet"`` could not be downloaded.
        FileNotFoundError: the path does not exist.
        ValueError: the file is not a VGG-19 state_dict.
    """
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights must be 'imagenet', 'random' or a path, got {type(weights).__name__}")
    weights = os.fspath(weights)
    features = _vgg19_features_random()
    if weights == "imagenet":
        state = _features_state_dict(_imagenet_state_dict(), "ImageNet VGG-19 weights")
    elif weights == "random":
        state = None
    else:
        state = _features_state_dict(_load_state_dict_file(weights), repr(weights))
    if state is not None:
        missing, unexpected = features.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"weights {weights!r} do not fit VGG-19 features: missing {missing[:4]}, "
                f"unexpected {unexpected[:4]}; pass a VGG-19 (not VGG-16) state_dict"
            )
    for index, module in enumerate(features):
        if isinstance(module, nn.ReLU):
            features[index] = nn.ReLU(inplace=False)
    features.eval()
    features.requires_grad_(False)
    return features


class Preprocessor:
    """Convert images in [0, 1] RGB to the input the weights were trained on, and back.

    Args:
        mode: ``"imagenet"`` (torchvision weights: RGB, ImageNet mean/std) or
            ``"caffe"`` (Caffe-converted weights: BGR, 0-255, minus the BGR mean).

    Example:
        >>> pre = Preprocessor("caffe")
        >>> x = torch.rand(1, 3, 4, 4)
        >>> torch.allclose(pre.denormalize(pre.normalize(x)), x, atol=1e-5)
        True
    """

    MODES = ("imagenet", "caffe")

    def __init__(self, mode: str = "imagenet") -> None:
        if mode not in self.MODES:
            raise ValueError(f"unknown preprocessing {mode!r}; choose one of {', '.join(self.MODES)}")
        self.mode = mode
        if mode == "imagenet":
            self._shift = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            self._scale = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        else:
            self._shift = torch.tensor(CAFFE_BGR_MEAN).view(1, 3, 1, 1)
            self._scale = torch.ones(1, 3, 1, 1)

    def normalize(self, img01: Tensor) -> Tensor:
        """Map an RGB batch ``[B, 3, H, W]`` in [0, 1] to the network's input."""
        if img01.dim() != 4 or img01.shape[1] != 3:
            raise ValueError(f"expected an RGB batch [B, 3, H, W], got shape {tuple(img01.shape)}")
        shift = self._shift.to(img01)
        scale = self._scale.to(img01)
        if self.mode == "caffe":
            return img01.flip(1) * 255.0 - shift
        return (img01 - shift) / scale

    def denormalize(self, x: Tensor) -> Tensor:
        """Inverse of :meth:`normalize` (no clamping)."""
        shift = self._shift.to(x)
        scale = self._scale.to(x)
        if self.mode == "caffe":
            return ((x + shift) / 255.0).flip(1)
        return x * scale + shift

    def __repr__(self) -> str:
        return f"Preprocessor({self.mode!r})"


def _layer_index(name: str) -> int:
    if name in LAYER_INDEX:
        return LAYER_INDEX[name]
    raise KeyError(f"unknown VGG-19 layer {name!r}; layers are: {', '.join(LAYER_INDEX)}")


class FeatureExtractor(nn.Module):
    """Run ``features`` up to the deepest requested layer and return the named activations.

    The layers run in order from ``features`` itself (not a copy), so pruning
    masks applied to ``features`` after construction take effect.

    Args:
        features: VGG-19 ``features`` (``nn.Sequential``).
        layers: layer names from :data:`LAYER_INDEX`, e.g. ``["relu1_1", "relu4_2"]``.

    Returns (forward): ``dict`` layer name -> activation.
    """

    def __init__(self, features: nn.Sequential, layers: Iterable[str]) -> None:
        super().__init__()
        names = list(dict.fromkeys(layers))
        if not names:
            raise ValueError("layers is empty; name at least one VGG-19 layer, e.g. relu1_1")
        self.features = features
        self.layers = names
        self._by_index: Dict[int, List[str]] = {}
        for name in names:
            index = _layer_index(name)
            if index >= len(features):
                raise ValueError(f"layer {name!r} (index {index}) is beyond this network's {len(features)} modules")
            self._by_index.setdefault(index, []).append(name)
        self.last_index = max(self._by_index)
        # Each pooling before the deepest layer halves the image: it must stay at least 1 pixel.
        self.min_side = 2 ** sum(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) for m in list(features)[: self.last_index])

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        if min(x.shape[-2:]) < self.min_side:
            deepest = self._by_index[self.last_index][0]
            raise ValueError(
                f"an image of {x.shape[-1]}x{x.shape[-2]} px is too small for layer {deepest!r}: the "
                f"poolings before it need at least {self.min_side} px per side; use a larger image size"
            )
        out: Dict[str, Tensor] = {}
        for index, module in enumerate(self.features):
            x = module(x)
            for name in self._by_index.get(index, ()):
                out[name] = x
            if index >= self.last_index:
                break
        return out
