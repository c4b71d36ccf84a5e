"""Finding the prunable conv layers of a model and the modules that follow them.

A "conv block" is a ``Conv2d`` with the ``BatchNorm2d`` and activation that
follow it inside the same ``nn.Sequential`` (as in torchvision's VGG
``features``). Channel statistics are measured at the end of the block, and
channel masks cover the conv and its BatchNorm together.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn

__all__ = [
    "captured_outputs",
    "model_device",
    "record_outputs",
    "ELEMENTWISE_ACTIVATIONS",
    "ConvBlock",
    "conv_block",
    "check_prunable",
    "conv_layers",
    "get_module",
    "output_channels",
    "CHANNEL_LAYER_TYPES",
    "channel_tensor_names",
    "channel_weight",
    "prunable_layers",
    "resolve_layers",
]

# Element-wise activations: a channel that is zero before them is zero (or a
# constant) after them, so they belong to the conv block.
ELEMENTWISE_ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
)


def conv_layers(model: nn.Module) -> "OrderedDict[str, nn.Conv2d]":
    """Return the prunable ``Conv2d`` layers of ``model``, by qualified name, in definition order.

    Example:
        >>> import torchvision
        >>> list(conv_layers(torchvision.models.vgg11()))[:3]
        ['features.0', 'features.3', 'features.6']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    return OrderedDict(
        (name, module) for name, module in model.named_modules() if isinstance(module, nn.Conv2d)
    )


def prunable_layers(model: nn.Module, types: Tuple[type, ...] = (nn.Conv2d,)) -> "OrderedDict[str, nn.Module]":
    """The layers of ``model`` of the given ``types`` (``nn.Conv2d``, ``nn.Linear``), in module order.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 2))
        >>> list(prunable_layers(model, (nn.Conv2d, nn.Linear)))
        ['0', '2']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    return OrderedDict((name, module) for name, module in model.named_modules() if isinstance(module, types))


def _kinds(types: Tuple[type, ...]) -> str:
    names = [t.__name__ for t in types]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def resolve_layers(
    model: nn.Module, layers: Optional[Iterable[str]] = None, types: Tuple[type, ...] = (nn.Conv2d,),
    default_types: Optional[Tuple[type, ...]] = None,
) -> "OrderedDict[str, nn.Module]":
    """Return the layers of ``types`` named in ``layers``, checking every name; when ``layers`` is ``None``, every
    layer of ``default_types`` (default: of ``types``).

    Raises:
        KeyError: a name is not such a layer of ``model``; the message lists the valid names.
        ValueError: ``layers`` is empty or names a layer twice.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
        >>> list(resolve_layers(model, ["2"]))
        ['2']
    """
    if layers is None and default_types is not None:
        types = default_types
    found = prunable_layers(model, types)
    what = "conv layers" if types == (nn.Conv2d,) else f"{_kinds(types)} layers"
    if not found:
        raise ValueError(f"{type(model).__name__} has no {_kinds(types)} layer to prune")
    if layers is None:
        return found
    if isinstance(layers, str):
        layers = [layers]
    names = list(layers)
    if not names:
        raise ValueError("layers is empty; pass None for every layer or name at least one")
    seen = set()
    for name in names:
        if name not in found:
            raise KeyError(f"unknown layer {name!r}; {what} are: {', '.join(found)}")
        if name in seen:
            raise ValueError(f"layer {name!r} is named twice; name each layer once")
        seen.add(name)
    return OrderedDict((name, found[name]) for name in names)


def get_module(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule ``name`` of ``model`` (``""`` is the model itself).

    Raises:
        KeyError: no such submodule; the message lists the conv layers.
    """
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise KeyError(
            f"unknown module {name!r}; conv layers are: {', '.join(conv_layers(model))}"
        ) from None


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model without tensors.

    Example:
        >>> model_device(nn.Conv2d(1, 1, 1))
        device(type='cpu')
    """
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def record_outputs(
    model: nn.Module, names: Iterable[str], store: Dict[str, Any], keep: Optional[Callable[[Any], Any]] = None
) -> List[Any]:
    """Hook each named submodule so that its output lands in ``store[name]`` (through ``keep`` when given).

    Returns the hook handles (``handle.remove()`` each to stop). The one output recorder of
    prunekit: metrics (a detached copy), recovery and the training regularizer (the live tensor).

    Example:
        >>> model, seen = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), {}
        >>> handles = record_outputs(model, ["0"], seen)
        >>> _ = model(torch.zeros(1, 1, 5, 5)); [h.remove() for h in handles] and sorted(seen)
        ['0']
    """
    handles: List[Any] = []

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            store[name] = output if keep is None else keep(output)

        return hook

    try:
        for name in names:
            handles.append(get_module(model, name).register_forward_hook(hook_for(name)))
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return handles


@contextlib.contextmanager
def captured_outputs(
    model: nn.Module, names: Iterable[str], keep: Optional[Callable[[Any], Any]] = None
) -> Iterator[Dict[str, Any]]:
    """The outputs of the named submodules during the block, as a dict (hooks removed after it).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
        >>> with captured_outputs(model, ["0"]) as seen:
        ...     _ = model(torch.zeros(1, 1, 5, 5))
        >>> seen["0"].shape
        torch.Size([1, 2, 3, 3])
    """
    store: Dict[str, Any] = {}
    handles = record_outputs(model, names, store, keep)
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class ConvBlock:
    """A conv layer with the BatchNorm and activation that directly follow it (either may be absent)."""

    conv_name: str
    conv: nn.Conv2d
    batchnorm_name: Optional[str] = None
    batchnorm: Optional[nn.BatchNorm2d] = None
    activation_name: Optional[str] = None
    activation: Optional[nn.Module] = None

    @property
    def output_name(self) -> str:
        """Name of the last module of the block: where the block's response is read."""
        return self.activation_name or self.batchnorm_name or self.conv_name

    @property
    def output_module(self) -> nn.Module:
        """The last module of the block."""
        return self.activation or self.batchnorm or self.conv


#: The layers whose output channels channel pruning removes (a Linear's are its output features; an attention's,
#: the rows of its query, key and value projections, removed a head at a time).
CHANNEL_LAYER_TYPES: Tuple[type, ...] = (nn.Conv2d, nn.Linear, nn.MultiheadAttention)


def _is_attention(layer: nn.Module) -> bool:
    """``nn.MultiheadAttention``, or the attention ``compact`` makes of it (it has the same tensors)."""
    return isinstance(getattr(layer, "in_proj_weight", None), torch.Tensor) and hasattr(layer, "num_heads")


def channel_tensor_names(layer: nn.Module) -> Tuple[str, ...]:
    """The names of ``layer``'s tensors whose rows are its output channels: its weight and bias, or an attention's
    ``in_proj_weight`` and ``in_proj_bias`` (without a bias: the weight alone).

    Example:
        >>> channel_tensor_names(nn.Conv2d(3, 4, 1, bias=False)), channel_tensor_names(nn.MultiheadAttention(8, 2))
        (('weight',), ('in_proj_weight', 'in_proj_bias'))
    """
    names = ("in_proj_weight", "in_proj_bias") if _is_attention(layer) else ("weight", "bias")
    return names if getattr(layer, names[1], None) is not None else names[:1]


def channel_weight(layer: nn.Module) -> torch.Tensor:
    """The weight whose rows are ``layer``'s output channels (an attention's: ``in_proj_weight``).

    Example:
        >>> tuple(channel_weight(nn.MultiheadAttention(8, 2)).shape)
        (24, 8)
    """
    return getattr(layer, channel_tensor_names(layer)[0])


def output_channels(layer: nn.Module) -> int:
    """The output channels of a conv (``out_channels``), an ``nn.Linear`` (``out_features``) or an attention (its
    ``3 * embed_dim`` query, key and value rows).

    Example:
        >>> output_channels(nn.Linear(3, 5)), output_channels(nn.Conv2d(3, 4, 1)), output_channels(nn.MultiheadAttention(8, 2))
        (5, 4, 24)
    """
    if _is_attention(layer):
        return int(layer.in_proj_weight.shape[0])
    if isinstance(layer, nn.Linear):
        return layer.out_features
    if isinstance(layer, nn.Conv2d):
        return layer.out_channels
    raise TypeError(f"{type(layer).__name__} is no nn.Conv2d, nn.Linear or nn.MultiheadAttention; it has no output "
                    "channels")


def conv_block(model: nn.Module, conv_name: str) -> ConvBlock:
    """Find the BatchNorm2d and activation that follow conv ``conv_name``.

    They are found only where the order of execution is certain: the modules
    after the conv inside the same ``nn.Sequential``. Elsewhere the block is the
    conv alone. An ``nn.Linear``'s block is the layer and the activation directly
    after it in its ``nn.Sequential`` (ConvNeXt's and the transformers' MLPs); an attention's is the attention.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> conv_block(model, "0").output_name
        '2'
    """
    convs = conv_layers(model)
    if conv_name not in convs:
        module = dict(model.named_modules()).get(conv_name)
        if isinstance(module, nn.Linear):
            return _linear_block(model, conv_name, module)
        if module is not None and _is_attention(module):
            return ConvBlock(conv_name, module)  # type: ignore[arg-type]  (its response: its in-projection)
        raise KeyError(f"unknown layer {conv_name!r}; conv layers are: {', '.join(convs)}")
    conv = convs[conv_name]
    children, prefix, index = _following(model, conv_name)
    if children is None:
        return ConvBlock(conv_name, conv)
    bn_name = bn = act_name = act = None
    for key, module in children[index + 1 :]:
        if (
            bn is None
            and act is None
            and isinstance(module, nn.BatchNorm2d)
            and module.num_features == conv.out_channels
        ):
            bn_name, bn = prefix + key, module
        elif act is None and isinstance(module, ELEMENTWISE_ACTIVATIONS):
            act_name, act = prefix + key, module
            break
        else:
            break
    return ConvBlock(conv_name, conv, bn_name, bn, act_name, act)


def _following(model: nn.Module, name: str) -> Tuple[Optional[List[Tuple[str, nn.Module]]], str, int]:
    """The children of the ``nn.Sequential`` holding ``name``, its prefix and ``name``'s index (None: no Sequential)."""
    parent_name, _, child = name.rpartition(".")
    parent = get_module(model, parent_name)
    if not isinstance(parent, nn.Sequential):
        return None, "", -1
    children = list(parent._modules.items())
    return children, f"{parent_name}." if parent_name else "", [key for key, _ in children].index(child)


def _linear_block(model: nn.Module, name: str, linear: nn.Linear) -> ConvBlock:
    children, prefix, index = _following(model, name)
    if children is not None and index + 1 < len(children):
        key, module = children[index + 1]
        if isinstance(module, ELEMENTWISE_ACTIVATIONS):
            return ConvBlock(name, linear, activation_name=prefix + key, activation=module)
    return ConvBlock(name, linear)  # type: ignore[arg-type]


def check_prunable(model: nn.Module, layers: Iterable[str]) -> None:
    """Refuse layers whose weight prunekit cannot prune alone: tied to another module, or parametrized.

    A Parameter shared by two convs (tied weights) would be pruned in both by a scan
    (which swaps its data) but in one by ``apply_plan`` (torch's reparametrization
    replaces it in one module only), so their results would disagree; a weight
    under ``torch.nn.utils.parametrize`` (``weight_norm``, ``spectral_norm``) or an
    old-style ``weight_norm`` hook is not a plain Parameter torch's pruning can mask.

    Raises:
        ValueError: naming the layer, the modules it shares a weight with, or its parametrization.

    Example:
        >>> first, second = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
        >>> second.weight = first.weight
        >>> check_prunable(nn.Sequential(first, nn.ReLU(), second), ["0"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: layer '0' shares its weight with '2' (tied parameters): ...
    """
    import torch.nn.utils.parametrize as parametrize

    # A module reused at two places is one module (pruning it prunes both uses alike);
    # the trouble is one Parameter held by two different modules.
    owners: dict = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), {}).setdefault(id(module), name)
    for layer in layers:
        module = get_module(model, layer)
        if parametrize.is_parametrized(module):
            raise ValueError(
                f"layer {layer!r} has a parametrization on {', '.join(module.parametrizations.keys())} "
                "(weight_norm, spectral_norm, ...): prunekit masks plain weights; remove it first with "
                f"torch.nn.utils.parametrize.remove_parametrizations(model.get_submodule({layer!r}), 'weight')"
            )
        if "weight_g" in module._parameters and "weight_v" in module._parameters:
            raise ValueError(
                f"layer {layer!r} uses the old torch.nn.utils.weight_norm (weight_g/weight_v): prunekit masks "
                f"plain weights; remove it first with torch.nn.utils.remove_weight_norm(model.get_submodule({layer!r}))"
            )
        for param_name in ("weight", "bias", "weight_orig", "bias_orig"):
            param = module._parameters.get(param_name)
            if param is None:
                continue
            others = sorted(name for key, name in owners.get(id(param), {}).items() if key != id(module))
            if others:
                raise ValueError(
                    f"layer {layer!r} shares its {param_name.replace('_orig', '')} with {', '.join(map(repr, others))} "
                    "(tied parameters): pruning it would prune them too in a scan but not under apply_plan; "
                    "untie them (give each module its own nn.Parameter) before pruning"
                )
