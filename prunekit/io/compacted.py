"""A compacted model saved without pickling: the architecture it came from, its layers' shapes, its weights.

``compact`` builds a model whose layers have fewer channels than its architecture's; a
state_dict alone cannot be loaded back into that architecture, and pickling the whole
module would make loading it run code stored in the file. A compacted checkpoint records
instead, for every conv, BatchNorm, PReLU, Linear layer, shrunk LayerNorm
(:class:`~prunekit.dependency.partial_layer_norm.PartialLayerNorm`, with its removed channels'
count, mean and variance) and attention that lost heads
(:class:`~prunekit.dependency.pruned_attention.PrunedMultiheadAttention`), the arguments that build it (read as plain numbers and names,
never as code), the shape of every other parameter (a layer scale ``compact`` resized),
the architecture's spec and the state_dict. Loading builds the architecture, swaps in
layers and parameters of the recorded shapes (made on the ``meta`` device, so the file's
weights are the only memory they take) and loads the weights strictly: every key and shape
must match.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torch.nn.utils import prune
    >>> from prunekit.compact import compact
    >>> def build():
    ...     return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> model = build()
    >>> _ = prune.ln_structured(model[0], "weight", amount=0.5, n=2, dim=0)
    >>> small = compact(model)
    >>> save_compacted(small, "small.pt", arch=None)
    >>> rebuilt = rebuild_compacted(build(), torch.load("small.pt", weights_only=True), "small.pt")
    >>> rebuilt[2].in_channels, torch.equal(rebuilt[2].weight, small[2].weight)
    (4, True)
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from prunekit.dependency.border_bias import BorderBiasConv2d
from prunekit.dependency.partial_layer_norm import PartialLayerNorm
from prunekit.dependency.pruned_attention import PrunedMultiheadAttention

__all__ = ["COMPACTED_FORMAT", "compacted_checkpoint", "is_compacted_checkpoint", "rebuild_compacted", "save_compacted"]

#: The ``format`` field of a compacted checkpoint.
COMPACTED_FORMAT = "prunekit-compacted-v1"

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_CONV_FIELDS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")


def _conv_arguments(module: nn.Module) -> Dict[str, Any]:
    arguments = {field: getattr(module, field) for field in _CONV_FIELDS}
    arguments.update(bias=module.bias is not None, padding_mode=module.padding_mode)
    if isinstance(module, nn.ConvTranspose2d):
        arguments["output_padding"] = module.output_padding
    return arguments


def _batchnorm_arguments(module: nn.Module) -> Dict[str, Any]:
    return {"num_features": module.num_features, "eps": module.eps, "momentum": module.momentum,
            "affine": module.affine, "track_running_stats": module.track_running_stats}


def _partial_layer_norm_arguments(module: PartialLayerNorm) -> Dict[str, Any]:
    return {"channels": module.channels, "eps": module.eps, "elementwise_affine": module.elementwise_affine,
            "bias": module.bias is not None, "channels_last": module.channel_dim == -1,
            "removed_count": module.removed_count, "removed_mean": module.removed_mean,
            "removed_variance": module.removed_variance}


def _partial_layer_norm(channels: int, eps: float, elementwise_affine: bool, bias: bool, channels_last: bool,
                        removed_count: int, removed_mean: float, removed_variance: float,
                        device=None) -> PartialLayerNorm:
    if not (math.isfinite(removed_mean) and math.isfinite(removed_variance) and removed_variance >= 0):
        raise ValueError(f"the removed channels' mean {removed_mean!r} and variance {removed_variance!r} are not "
                         "a finite mean and a variance >= 0")
    norm = PartialLayerNorm(channels, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                            channel_dim=-1 if channels_last else 1, device=device)
    norm.add_removed_statistics(removed_count, removed_mean, removed_variance)
    return norm


def _attention_arguments(module: PrunedMultiheadAttention) -> Dict[str, Any]:
    return {"embed_dim": module.embed_dim, "num_heads": module.num_heads, "head_dim": module.head_dim,
            "bias": module.in_proj_bias is not None, "dropout": module.dropout, "batch_first": module.batch_first}


# The layers compact builds (plain torch layers, its BorderBiasConv2d and PartialLayerNorm), by exact type: how to
# read the arguments that built one, and what builds one from them.
_LAYERS: Dict[str, Tuple[type, Callable[[nn.Module], Dict[str, Any]]]] = {
    "Conv2d": (nn.Conv2d, _conv_arguments),
    "BorderBiasConv2d": (BorderBiasConv2d, _conv_arguments),
    "ConvTranspose2d": (nn.ConvTranspose2d, _conv_arguments),
    "BatchNorm2d": (nn.BatchNorm2d, _batchnorm_arguments),
    "PReLU": (nn.PReLU, lambda module: {"num_parameters": module.num_parameters}),
    "Linear": (nn.Linear, lambda module: {"in_features": module.in_features, "out_features": module.out_features,
                                          "bias": module.bias is not None}),
    "PartialLayerNorm": (PartialLayerNorm, _partial_layer_norm_arguments),
    "PrunedMultiheadAttention": (PrunedMultiheadAttention, _attention_arguments),
}
_BUILDERS: Dict[str, Callable[..., nn.Module]] = {"PartialLayerNorm": _partial_layer_norm}  # others: the class
_MAX_PARAMETER_DIMS = 8
_TYPE_NAMES = {cls: name for name, (cls, _) in _LAYERS.items()}


def _plain(value: Any) -> Any:
    """Tuples as lists: a checkpoint holds numbers, strings, booleans, None and lists of them."""
    return [_plain(item) for item in value] if isinstance(value, (tuple, list)) else value


def compacted_checkpoint(model: nn.Module, arch: Optional[str]) -> Dict[str, Any]:
    """What a compacted checkpoint file holds for ``model`` (``torch.save`` it, or :func:`prunekit.save_compacted`).

    Args:
        model: a model ``compact`` built (any model of the architecture: layers of other types keep theirs).
        arch: the spec that rebuilds the architecture (``"hed"``, ``"resnet18"``, ...), or None when the
            loader builds it itself (:func:`rebuild_compacted`).
    """
    layers, parameters = OrderedDict(), OrderedDict()
    whole = []  # recorded layers that build their own children (an attention's out_proj)
    for name, module in model.named_modules():
        if any(name.startswith(f"{parent}.") for parent in whole):
            continue
        kind = _TYPE_NAMES.get(type(module))
        if kind is not None and name:
            if next(module.children(), None) is not None:
                whole.append(name)
            layers[name] = {"type": kind, "arguments": {key: _plain(value) for key, value in
                                                        _LAYERS[kind][1](module).items()}}
            continue
        for key, parameter in module.named_parameters(recurse=False):  # a layer scale compact may have resized
            parameters[f"{name}.{key}" if name else key] = list(parameter.shape)
    state = OrderedDict((key, value.detach().cpu().clone()) for key, value in model.state_dict().items())
    return {"format": COMPACTED_FORMAT, "arch": arch, "layers": dict(layers), "parameters": dict(parameters),
            "state_dict": state}


def save_compacted(model: nn.Module, path: Any, arch: Optional[str]) -> None:
    """Write ``model`` (compacted) to ``path`` atomically as a compacted checkpoint.

    With ``arch`` (``"hed"``, ``"resnet18"``, ``package.module:factory``), ``prunekit.models.zoo.load_model(path)``
    and every command's CHECKPOINT argument load it back safely; without, :func:`rebuild_compacted`
    does, given the architecture.
    """
    from prunekit.io.files import save_torch

    save_torch(compacted_checkpoint(model, arch), path)


def is_compacted_checkpoint(obj: Any) -> bool:
    """Whether ``obj`` (a loaded file) is a compacted checkpoint."""
    return isinstance(obj, Mapping) and obj.get("format") == COMPACTED_FORMAT


def _checked_argument(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, str)):
        if isinstance(value, str) and value not in ("same", "valid") + _PADDING_MODES:
            raise ValueError(f"{where} is {value!r}, not a padding or padding mode torch knows")
        return value
    if isinstance(value, numbers.Integral):
        if not 0 <= int(value) <= 1 << 24:
            raise ValueError(f"{where} is {value!r}, out of range for a layer's size")
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (list, tuple)) and len(value) <= 3:
        return tuple(_checked_argument(item, where) for item in value)
    raise ValueError(f"{where} is a {type(value).__name__}, not a layer argument")


# The arguments each type records, read once off a small one (on meta: nothing is allocated).
_SMALL = {"Conv2d": {"in_channels": 1, "out_channels": 1, "kernel_size": 1}, "BatchNorm2d": {"num_features": 1},
          "PReLU": {}, "Linear": {"in_features": 1, "out_features": 1}, "PartialLayerNorm": {"channels": 1},
          "PrunedMultiheadAttention": {"embed_dim": 1, "num_heads": 1, "head_dim": 1}}
_ARGUMENTS = {kind: frozenset(read(cls(**_SMALL.get(kind, _SMALL["Conv2d"]), device="meta")))
              for kind, (cls, read) in _LAYERS.items()}


def _built(kind: str, arguments: Any, where: str) -> nn.Module:
    if kind not in _LAYERS:
        raise ValueError(f"{where} has type {kind!r}; a compacted checkpoint holds only {', '.join(_LAYERS)}")
    cls, expected = _LAYERS[kind][0], _ARGUMENTS[kind]
    if not isinstance(arguments, Mapping) or set(arguments) != expected:
        raise ValueError(f"{where} ({kind}) records arguments {sorted(arguments) if isinstance(arguments, Mapping) else arguments!r}; "
                         f"expected {sorted(expected)}")
    checked = {key: _checked_argument(value, f"{where}'s {key}") for key, value in arguments.items()}
    try:
        return _BUILDERS.get(kind, cls)(**checked, device="meta")
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{where} ({kind}) cannot be built from {checked}: {err}") from None




def _resize_parameters(model: nn.Module, shapes: Any, path: Any) -> None:
    """Give each parameter ``shapes`` records (outside the recorded layers) that shape, on ``meta``: the file's
    tensor then fills it."""
    if not isinstance(shapes, Mapping):
        raise ValueError(f"compacted checkpoint {str(path)!r} records its parameters as a {type(shapes).__name__}, "
                         "not a mapping of names to shapes")
    for name, shape in shapes.items():
        where = f"compacted checkpoint {str(path)!r}: parameter {name!r}"
        owner_name, _, key = name.rpartition(".") if isinstance(name, str) else ("", "", "")
        try:
            owner = model.get_submodule(owner_name)
        except AttributeError:
            owner = None
        current = owner._parameters.get(key) if owner is not None and key else None
        if current is None:
            raise ValueError(f"{where} is not a parameter of {type(model).__name__}; was the file saved from another "
                             "architecture?")
        if (not isinstance(shape, (list, tuple)) or len(shape) > _MAX_PARAMETER_DIMS
                or not all(isinstance(size, numbers.Integral) and not isinstance(size, bool) and 0 <= size <= 1 << 31
                           for size in shape)):
            raise ValueError(f"{where} has shape {shape!r}, not a list of at most {_MAX_PARAMETER_DIMS} sizes")
        if tuple(current.shape) != tuple(shape):
            owner._parameters[key] = nn.Parameter(torch.empty([int(size) for size in shape], device="meta"),
                                                  requires_grad=current.requires_grad)


def rebuild_compacted(model: nn.Module, document: Mapping[str, Any], path: Any) -> nn.Module:
    """Turn ``model`` (the architecture, freshly built) into the compacted model ``document`` records.

    ``model`` is changed in place and returned: each recorded layer is replaced by one of the
    recorded type and shape, then the state_dict is loaded strictly (``assign``: the file's
    tensors become the weights). ``path`` names the file in errors.

    Raises:
        ValueError: a layer the architecture does not have, a type or argument a compacted
            checkpoint never holds, or weights that do not fit the recorded layers (the message
            names the layer or key).
    """
    layers, state = document.get("layers"), document.get("state_dict")
    if not isinstance(layers, Mapping) or not isinstance(state, Mapping):
        raise ValueError(f"compacted checkpoint {str(path)!r} lacks its layers or its state_dict; re-save it with "
                         "prunekit.save_compacted")
    modules = dict(model.named_modules())
    for name, record in layers.items():
        where = f"compacted checkpoint {str(path)!r}: layer {name!r}"
        if not isinstance(name, str) or name not in modules or not name:
            raise ValueError(f"{where} is not a layer of {type(model).__name__}; was the file saved from another "
                             "architecture?")
        if not isinstance(record, Mapping):
            raise ValueError(f"{where} is recorded as a {type(record).__name__}, not a layer")
        parent_name, _, child = name.rpartition(".")
        layer = _built(record.get("type"), record.get("arguments"), where).train(modules[name].training)
        setattr(modules[parent_name] if parent_name else model, child, layer)
    _resize_parameters(model, document.get("parameters", {}), path)
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"compacted checkpoint {str(path)!r}: state_dict entry {key!r} is not a named tensor")
    try:
        model.load_state_dict(dict(state), strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"compacted checkpoint {str(path)!r}: its weights do not fit its layers: "
                         f"{' '.join(str(err).split())}") from None
    left = [name for name, tensor in list(model.named_parameters()) + list(model.named_buffers()) if tensor.is_meta]
    if left:
        raise ValueError(f"compacted checkpoint {str(path)!r} has no values for {', '.join(left[:3])}")
    return model
