"""Where each conv's output channels go: the channel-flow analysis behind :func:`prunekit.compact`.

The model is traced with ``torch.fx``. From every conv with removable output
channels the analysis follows the tensor through the operations that keep the
channel dimension intact and treat channels independently, up to the layers
that consume it (the next conv, or the first Linear after a flatten). A removed
channel is a constant (it no longer depends on the input), so the analysis
also tracks that constant, channel by channel, for the consumer to fold into
its bias. Anything else on the way (additions, concatenations, grouped convs,
reshapes, a module called twice, ...) is refused with the layer's name.
"""

from __future__ import annotations

import builtins
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.tracing import TracingError, trace_graph
from prunekit.compact.modules import BorderBiasConv2d
from prunekit.layers import ELEMENTWISE_ACTIVATIONS

__all__ = ["CompactionPlan", "UnsupportedGraphError", "plan_compaction"]

_SUPPORTED = (
    "supported between a conv and the layer that consumes its channels: BatchNorm2d, "
    "element-wise activations, dropout, max/avg/adaptive pooling, upsampling, reflection/"
    "replication padding, and flatten followed by nn.Linear"
)

# Modules applied to each element on its own: a constant channel stays constant.
_POINTWISE_MODULES = ELEMENTWISE_ACTIVATIONS + (nn.Identity,)
# Identity in eval mode; in training mode they act per element (or per channel) at random.
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.FeatureAlphaDropout)
# Per-channel spatial operations that map a constant map to the same constant.
_CONSTANT_SPATIAL_MODULES = (
    nn.MaxPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Upsample,
    nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d,
    nn.ReflectionPad2d,
    nn.ReplicationPad2d,
)

_POINTWISE_FUNCTIONS: Set[Callable] = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.leaky_relu_,
    F.elu, F.elu_, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.hardtanh_, F.sigmoid, torch.sigmoid, F.tanh, torch.tanh, F.softplus,
    torch.clamp, torch.clip, torch.abs, torch.neg,
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
    torch.add, torch.sub, torch.mul, torch.div,
}  # fmt: skip
_DROPOUT_FUNCTIONS: Set[Callable] = {F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout, F.feature_alpha_dropout}
_CONSTANT_SPATIAL_FUNCTIONS: Set[Callable] = {
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate, F.upsample,
    F.upsample_nearest, F.upsample_bilinear,
}  # fmt: skip
_POINTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clamp_min",
    "clamp_max", "clip", "abs", "neg", "add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_",
    "contiguous", "clone", "detach",
}  # fmt: skip


class UnsupportedGraphError(ValueError):
    """The model has a pattern ``compact`` cannot handle safely; the message names the layer."""


@dataclass
class CompactionPlan:
    """What :func:`prunekit.compact` will do, by module name.

    Attributes:
        keep_out: for each conv whose channels are removed, the kept output channels.
        keep_in: for each consumer (conv or Linear), the kept input channels/features.
        folds: for each consumer, the removed inputs' constant contributions (float64):
            [out, kh, kw] for a conv, [out] for a Linear.
        keep_channels: for each BatchNorm2d / per-channel PReLU on a path, the kept channels.
        pinned: convs with removable channels that reach the model output and are kept.
        batchnorm_constants: convs whose removed channels reach the next layer as non-zero
            constants computed by a BatchNorm from its running statistics (exact in eval
            mode only: in training mode a BatchNorm normalises with batch statistics).
    """

    keep_out: Dict[str, Tensor] = field(default_factory=dict)
    keep_in: Dict[str, Tensor] = field(default_factory=dict)
    folds: Dict[str, Tensor] = field(default_factory=dict)
    keep_channels: Dict[str, Tensor] = field(default_factory=dict)
    pinned: List[str] = field(default_factory=list)
    batchnorm_constants: List[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """True when no channel is removed."""
        return not self.keep_out


def trace(model: nn.Module) -> fx.Graph:
    """Trace ``model`` with prunekit's tracer; raise UnsupportedGraphError with advice if it cannot be traced."""
    try:
        return trace_graph(model)[0]
    except TracingError as err:
        raise UnsupportedGraphError(
            f"compact could not trace {type(model).__name__} with torch.fx "
            f"({err}); compact needs a forward without data-dependent "
            "control flow, such as an nn.Sequential stack or torchvision's VGG; compact the traceable "
            "parts instead (an encoder and a decoder together: prunekit.compact_chain(encoder, decoder))"
        ) from None


def removable_channels(conv: nn.Conv2d) -> Tuple[Tensor, Tensor]:
    """Bool mask [out] of the channels that no longer depend on the input, and the constant each emits.

    A channel whose weights are all zero outputs its bias everywhere (0 for a
    masked channel, whose bias is masked too).
    """
    weight = conv.weight.detach()
    dead = (weight.flatten(1) == 0).all(dim=1)
    border = getattr(conv, "border_weight", None)
    if border is not None:
        dead &= (border.detach().flatten(1) == 0).all(dim=1)
    if conv.bias is None:
        constant = torch.zeros(conv.out_channels, dtype=torch.float64, device=weight.device)
    else:
        constant = conv.bias.detach().double().clone()
    return dead, constant


def _describe(node: fx.Node, modules: Dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} '{node.target}'"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return f"{name}() (graph node '{node.name}')"
    if node.op == "call_method":
        return f"tensor.{node.target}() (graph node '{node.name}')"
    return f"{node.op} '{node.target}'"


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _is_batch_size(value: Any, source: fx.Node) -> bool:
    """``x.size(0)`` or ``x.shape[0]`` of ``source``."""
    if not isinstance(value, fx.Node):
        return False
    if value.op == "call_method" and value.target == "size":
        return value.args[0] is source and _arg(value, 1, "dim", None) == 0
    if value.op == "call_function" and value.target is operator.getitem:
        shape = value.args[0]
        return (
            isinstance(shape, fx.Node)
            and shape.op == "call_function"
            and shape.target is builtins.getattr
            and shape.args[0] is source
            and shape.args[1] == "shape"
            and value.args[1] == 0
        )
    return False


def _is_flatten(node: fx.Node, source: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    """Does ``node`` flatten [N, C, H, W] to [N, C*H*W] (each channel a contiguous block)?"""
    if node.op == "call_module":
        module = modules[node.target]
        return type(module) is nn.Flatten and module.start_dim == 1 and module.end_dim in (-1, 3)
    if (node.op == "call_function" and node.target is torch.flatten) or (
        node.op == "call_method" and node.target == "flatten"
    ):
        return _arg(node, 1, "start_dim", 0) == 1 and _arg(node, 2, "end_dim", -1) in (-1, 3)
    if node.op == "call_method" and node.target in ("view", "reshape"):
        shape = node.args[1:]
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return len(shape) == 2 and _is_batch_size(shape[0], source) and shape[1] == -1
    return False


def _is_shape_query(node: fx.Node, source: fx.Node) -> bool:
    """A use of ``source`` that reads only its batch size (as in ``x.view(x.size(0), -1)``)."""
    if node.op == "call_method" and node.target == "size":
        return _arg(node, 1, "dim", None) == 0
    if node.op == "call_function" and node.target is builtins.getattr and node.args[1] == "shape":
        return all(
            user.op == "call_function" and user.target is operator.getitem and user.args[1] == 0
            for user in node.users
        )
    return False


def _evaluate(node: fx.Node, source: fx.Node, constant: Tensor, module: Optional[nn.Module]) -> Optional[Tensor]:
    """Apply the element-wise op of ``node`` to the constants; None if it has another tensor input."""
    value = constant.view(1, -1, 1, 1).clone()

    def substitute(arg: Any) -> Any:
        if arg is source:
            return value
        if isinstance(arg, fx.Node):
            raise _OtherTensor
        return arg

    try:
        args = fx.node.map_aggregate(node.args, substitute)
        kwargs = fx.node.map_aggregate(node.kwargs, substitute)
    except _OtherTensor:
        return None
    with torch.no_grad():
        if module is not None:
            out = _call_module(module, value)
        elif node.op == "call_method":
            out = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            out = node.target(*args, **kwargs)
    if not isinstance(out, Tensor) or out.numel() != constant.numel():
        return None
    return out.reshape(-1).double()


class _OtherTensor(Exception):
    pass


def _call_module(module: nn.Module, value: Tensor) -> Tensor:
    if isinstance(module, nn.PReLU):
        return F.prelu(value, module.weight.detach().double())
    return module(value)


def _bn_constant(bn: nn.BatchNorm2d, constant: Tensor) -> Tensor:
    """A BatchNorm's output for constant input channels, with its running statistics (eval mode)."""
    if bn.running_mean is not None and bn.running_var is not None:
        mean = bn.running_mean.detach().double()
        var = bn.running_var.detach().double()
        out = (constant - mean) / torch.sqrt(var + bn.eps)
    else:
        out = torch.zeros_like(constant)  # batch statistics of a constant channel: (c - c) / std
    if bn.affine:
        out = out * bn.weight.detach().double() + bn.bias.detach().double()
    return out


def _avg_pool_keeps_constants(pool: nn.AvgPool2d) -> bool:
    padding = pool.padding if isinstance(pool.padding, tuple) else (pool.padding,)
    no_padding = all(p == 0 for p in padding)
    return pool.divisor_override is None and (no_padding or not pool.count_include_pad)


@dataclass
class _Walk:
    """The state of one conv's channel flow."""

    conv: str
    channels: int
    removed: Tensor  # bool [C]
    consumers: List[Tuple[str, str, Tensor]] = field(default_factory=list)
    per_channel: List[str] = field(default_factory=list)
    reaches_output: bool = False
    through_batchnorm: bool = False
    problem: Optional[str] = None


def _consumer_check(walk: _Walk, node: fx.Node, source: fx.Node, module: nn.Module, flat: bool) -> Optional[str]:
    if len(node.args) != 1 or node.kwargs or node.args[0] is not source:
        return f"{_describe(node, {node.target: module})} is called with extra arguments"
    if isinstance(module, nn.Conv2d):
        if flat:
            return f"conv '{node.target}' receives a flattened tensor"
        if type(module) not in (nn.Conv2d, BorderBiasConv2d):
            return f"'{node.target}' is a {type(module).__name__} (an nn.Conv2d subclass compact cannot rebuild)"
        if module.groups != 1:
            return (
                f"conv '{node.target}' is grouped (groups={module.groups}); compact removes "
                "channels only between convs with groups=1"
            )
        if module.in_channels != walk.channels:
            return f"conv '{node.target}' expects {module.in_channels} input channels, not {walk.channels}"
        return None
    if not flat:
        return f"nn.Linear '{node.target}' is applied to a 4-D tensor, not after a flatten"
    if type(module) is not nn.Linear:
        return f"'{node.target}' is a {type(module).__name__}, not a plain nn.Linear"
    if module.in_features % walk.channels:
        return (
            f"nn.Linear '{node.target}' has {module.in_features} input features, not a multiple of "
            f"the {walk.channels} channels flattened into it"
        )
    return None


def _follow(
    walk: _Walk,
    source: fx.Node,
    constant: Tensor,
    modules: Dict[str, nn.Module],
    flat: bool = False,
) -> None:
    """Follow the channels of ``source`` to their consumers, recording them in ``walk``."""
    removed_constants = constant[walk.removed]
    all_zero = bool((removed_constants == 0).all())
    for node in list(source.users):
        if walk.problem is not None:
            return
        nxt: Optional[Tensor] = None
        next_flat = flat
        module = modules.get(node.target) if node.op == "call_module" else None
        if node.op == "output":
            walk.reaches_output = True
            continue
        if not flat and _is_shape_query(node, source):
            continue
        if module is not None and isinstance(module, (nn.Conv2d, nn.Linear)):
            problem = _consumer_check(walk, node, source, module, flat)
            if problem is not None:
                walk.problem = problem
                return
            walk.consumers.append((node.target, "linear" if flat else "conv", constant))
            continue
        if module is not None and not flat and isinstance(module, nn.BatchNorm2d):
            if type(module) is not nn.BatchNorm2d or module.num_features != walk.channels:
                walk.problem = f"{_describe(node, modules)} does not match the {walk.channels} channels"
                return
            walk.per_channel.append(node.target)
            walk.through_batchnorm = True
            nxt = _bn_constant(module, constant)
        elif module is not None and isinstance(module, _POINTWISE_MODULES):
            if isinstance(module, nn.PReLU) and module.num_parameters != 1:
                if flat or module.num_parameters != walk.channels or type(module) is not nn.PReLU:
                    walk.problem = f"{_describe(node, modules)} has {module.num_parameters} parameters"
                    return
                walk.per_channel.append(node.target)
            nxt = _evaluate(node, source, constant, module)
        elif module is not None and isinstance(module, _DROPOUT_MODULES):
            nxt = constant
        elif module is not None and not flat and isinstance(module, _CONSTANT_SPATIAL_MODULES):
            if isinstance(module, nn.MaxPool2d) and module.return_indices:
                walk.problem = f"{_describe(node, modules)} returns indices"
                return
            nxt = constant
        elif module is not None and not flat and isinstance(module, nn.AvgPool2d):
            # With zero padding counted in the average, a constant is not constant at the border.
            if _avg_pool_keeps_constants(module) or all_zero:
                nxt = constant
            else:
                walk.problem = (
                    f"{_describe(node, modules)} averages in zero padding, so the removed channels' "
                    "non-zero constants would vary at the border"
                )
                return
        elif module is not None and not flat and isinstance(module, (nn.ZeroPad2d, nn.ConstantPad2d)):
            if all_zero and module.value == 0:
                nxt = constant
            else:
                walk.problem = (
                    f"{_describe(node, modules)} pads with {module.value}, but removed channels "
                    "carry non-zero constants"
                )
                return
        elif not flat and _is_flatten(node, source, modules):
            nxt, next_flat = constant, True
        elif node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS:
            nxt = constant
        elif node.op == "call_function" and not flat and node.target in _CONSTANT_SPATIAL_FUNCTIONS:
            nxt = constant
        elif node.op == "call_function" and not flat and node.target is F.max_pool2d:
            if _arg(node, 6, "return_indices", False):
                walk.problem = f"{_describe(node, modules)} returns indices"
                return
            nxt = constant
        elif node.op == "call_function" and not flat and node.target in (F.avg_pool2d, F.pad):
            if node.target is F.pad:
                keeps = _arg(node, 2, "mode", "constant") in ("reflect", "replicate", "circular")
                pads_zeros = not _arg(node, 3, "value", None)
            else:
                padding = _arg(node, 3, "padding", 0)
                no_padding = all(p == 0 for p in (padding if isinstance(padding, (tuple, list)) else (padding,)))
                keeps = _arg(node, 6, "divisor_override", None) is None and (
                    no_padding or not _arg(node, 5, "count_include_pad", True)
                )
                pads_zeros = True  # an average of zeros is zero whatever the divisor
            if keeps or (all_zero and pads_zeros):
                nxt = constant
            else:
                walk.problem = (
                    f"{_describe(node, modules)} may pad with zeros, but removed channels carry "
                    "non-zero constants"
                )
                return
        elif (node.op == "call_function" and node.target in _POINTWISE_FUNCTIONS) or (
            node.op == "call_method" and node.target in _POINTWISE_METHODS
        ):
            nxt = _evaluate(node, source, constant, None)
        if nxt is None:
            walk.problem = f"{_describe(node, modules)} is not supported"
            return
        _follow(walk, node, nxt, modules, next_flat)


def plan_compaction(model: nn.Module, prune_output_channels: bool = False) -> CompactionPlan:
    """Decide which channels of ``model`` to remove and what each consumer must fold.

    ``model`` must have no pruning reparametrization left (its ``weight`` tensors are the effective ones).

    Raises:
        UnsupportedGraphError: a conv with removable channels feeds an operation compact
            does not handle, or a layer to resize is shared, grouped or hooked.
    """
    graph = trace(model)
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    plan = CompactionPlan()
    walks: List[_Walk] = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.Conv2d):
            continue
        conv = modules[node.target]
        removed, constant = removable_channels(conv)
        if not bool(removed.any()):
            continue
        if type(conv) not in (nn.Conv2d, BorderBiasConv2d):
            raise UnsupportedGraphError(
                f"cannot remove channels of '{node.target}': it is a {type(conv).__name__}, an "
                "nn.Conv2d subclass compact cannot rebuild; use a plain nn.Conv2d"
            )
        if conv.groups != 1:
            raise UnsupportedGraphError(
                f"cannot remove channels of conv '{node.target}': it is grouped "
                f"(groups={conv.groups}); compact handles only convs with groups=1 (no depthwise)"
            )
        if bool(removed.all()):
            removed = removed.clone()
            removed[0] = False  # keep one (constant) channel: a conv needs at least one
        walk = _Walk(node.target, conv.out_channels, removed)
        _follow(walk, node, constant, modules)
        if walk.reaches_output and not prune_output_channels:
            plan.pinned.append(node.target)
            continue
        if walk.problem is not None:
            raise UnsupportedGraphError(
                f"cannot remove the {int(removed.sum())} zero channels of conv '{node.target}': "
                f"{walk.problem}. compact refuses graphs it cannot resize exactly (residual "
                f"additions, concatenations, grouped convs, reshapes); {_SUPPORTED}. Unmask the "
                f"channels of '{node.target}' or leave this layer out of the pruning plan (for an "
                "encoder and a decoder around a per-channel op such as AdaIN, use "
                "prunekit.compact_chain(encoder, decoder))"
            )
        walks.append(walk)

    resized = [w.conv for w in walks] + [c[0] for w in walks for c in w.consumers]
    resized += [name for w in walks for name in w.per_channel]
    for name in dict.fromkeys(resized):
        module = modules[name]
        if calls[name] != 1:
            raise UnsupportedGraphError(
                f"cannot resize '{name}': the module is called {calls[name]} times in the forward "
                "pass; compact resizes only modules used once"
            )
        if module._forward_hooks or module._forward_pre_hooks or getattr(module, "_backward_hooks", None):
            raise UnsupportedGraphError(
                f"cannot resize '{name}': it has hooks registered; remove them (they may depend on "
                "the channel count) before compact"
            )

    for walk in walks:
        keep = torch.nonzero(~walk.removed).flatten()
        plan.keep_out[walk.conv] = keep
        for name in walk.per_channel:
            plan.keep_channels[name] = keep
        for name, kind, constant in walk.consumers:
            weights = modules[name].weight.detach()
            gone = torch.nonzero(walk.removed).flatten()
            scale = constant.to(weights.device)[gone]
            if kind == "conv":
                plan.keep_in[name] = keep.to(weights.device)
                # [out, removed, kh, kw] weighted by each removed channel's constant.
                fold = torch.einsum("okhw,k->ohw", weights.index_select(1, gone).double(), scale)
            else:
                block = modules[name].in_features // walk.channels
                features = (keep.view(-1, 1) * block + torch.arange(block, device=keep.device)).flatten()
                plan.keep_in[name] = features.to(weights.device)
                columns = (gone.view(-1, 1) * block + torch.arange(block, device=gone.device)).flatten()
                per_feature = scale.repeat_interleave(block)
                fold = weights.index_select(1, columns.to(weights.device)).double() @ per_feature
            plan.folds[name] = fold
            if walk.through_batchnorm and bool(fold.abs().sum() > 0) and walk.conv not in plan.batchnorm_constants:
                plan.batchnorm_constants.append(walk.conv)
    return plan

