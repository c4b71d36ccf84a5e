"""Channel flow: which channels of a model are one and the same, traced with ``torch.fx``.

Every output channel of a conv or ``nn.Linear`` gets an id. The ids travel with the
tensor through the operations that keep channels apart (BatchNorm, element-wise
activations, pooling, dropout, flatten, concatenation), and
the operations that combine two tensors channel by channel (residual additions, the
products of squeeze-and-excitation gates) join the ids they meet: those channels can
only be removed together. A grouped conv joins each group's input and output channels
(one depthwise channel with the channel that feeds it). What remains after the whole
graph is a union-find of channel *units*: the sets of (layer, channel) that stand or fall
together.

Channels are *fixed* where removing them would change what the model is: channels of
the model's input, channels that reach its output, and channels that meet anything this
module does not know to be per-channel (a reshape that mixes channels, a channel
shuffle, LayerNorm across channels, a module called twice, a tensor attribute added to
them). A fixed unit keeps the reason, with the graph node's name.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.stem, self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 2, 1)
    ...     def forward(self, x):
    ...         x = self.stem(x)
    ...         return self.b(x + self.a(x))
    >>> flow = trace_channel_flow(Block())
    >>> sorted({flow.find(i) for i in flow.producers["stem"]}) == sorted({flow.find(i) for i in flow.producers["a"]})
    True
"""

from __future__ import annotations

import builtins
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from prunekit._rollback import eval_mode
from prunekit.compact.modules import BorderBiasConv2d
from prunekit.layers import ELEMENTWISE_ACTIVATIONS
from prunekit.tracing import TracingError, trace_graph

__all__ = ["ChannelFlow", "UnsupportedGraphError", "describe_node", "trace_channel_flow"]


class UnsupportedGraphError(ValueError):
    """The model has a pattern prunekit cannot resize exactly; the message names the layer or node."""


# Modules applied to each element on its own: a constant channel stays constant.
POINTWISE_MODULES: Tuple[type, ...] = ELEMENTWISE_ACTIVATIONS + (nn.Identity,)
# Identity in eval mode; in training mode they act per element (or per channel) at random.
DROPOUT_MODULES: Tuple[type, ...] = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.FeatureAlphaDropout)
# Per-channel spatial operations that map a constant map to the same constant.
CONSTANT_SPATIAL_MODULES: Tuple[type, ...] = (
    nn.MaxPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Upsample,
    nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d,
    nn.ReflectionPad2d,
    nn.ReplicationPad2d,
)
# Per-channel spatial operations that keep a constant only under conditions (see graph.py).
PADDING_SPATIAL_MODULES: Tuple[type, ...] = (nn.AvgPool2d, nn.ZeroPad2d, nn.ConstantPad2d)

POINTWISE_FUNCTIONS: Set[Callable] = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.leaky_relu_,
    F.elu, F.elu_, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.hardtanh_, F.sigmoid, torch.sigmoid, F.tanh, torch.tanh, F.softplus,
    torch.clamp, torch.clip, torch.abs, torch.neg,
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.iadd, operator.imul,
    torch.add, torch.sub, torch.mul, torch.div,
}  # fmt: skip
POINTWISE_METHODS: Set[str] = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clamp_min",
    "clamp_max", "clip", "abs", "neg", "add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_",
    "contiguous", "clone", "detach",
}  # fmt: skip
DROPOUT_FUNCTIONS: Set[Callable] = {F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout, F.feature_alpha_dropout}
CONSTANT_SPATIAL_FUNCTIONS: Set[Callable] = {
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate, F.upsample,
    F.upsample_nearest, F.upsample_bilinear, F.max_pool2d,
}  # fmt: skip
PADDING_SPATIAL_FUNCTIONS: Set[Callable] = {F.avg_pool2d, F.pad}

# Layouts of a tracked tensor: channels on dim 1 of [N, C, H, W]; on dim 1 of a flattened
# [N, C * block] (each channel a contiguous block of features); on the last dim (an nn.Linear's output).
CONV, FLAT, LAST = "conv", "flat", "last"
OUTPUT = "reaches the model output"


@dataclass(frozen=True)
class Tracked:
    """The channel ids of one graph value, in order, and where its channels sit."""

    ids: Tuple[int, ...]
    layout: str


@dataclass
class Consumer:
    """A conv or Linear reading tracked channels: its input ids (per input channel) and their layout."""

    name: str
    ids: Tuple[int, ...]
    layout: str
    node: fx.Node


@dataclass
class ChannelFlow:
    """The channel units of a traced model.

    Attributes:
        graph: the fx graph (traced in eval mode).
        modules: ``dict(model.named_modules())`` of the traced model.
        producers: conv / Linear name -> the ids of its output channels.
        consumers: conv / Linear name -> what it reads.
        per_channel: BatchNorm / per-channel PReLU name -> the ids of its channels.
        values: graph node -> its tracked channels (only for nodes that carry channels).
        fixed: per unit, the reasons it cannot be removed (see :meth:`reasons`).
        joins: per unit, the graph nodes that joined its channels (see :meth:`where_joined`).
    """

    graph: fx.Graph
    modules: Dict[str, nn.Module]
    producers: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    consumers: Dict[str, Consumer] = field(default_factory=dict)
    per_channel: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    values: Dict[fx.Node, Tracked] = field(default_factory=dict)
    fixed: Dict[int, List[str]] = field(default_factory=dict)
    joins: Dict[int, List[str]] = field(default_factory=dict)
    _parent: List[int] = field(default_factory=list)

    # --- union-find -------------------------------------------------------------------
    def new_ids(self, count: int) -> Tuple[int, ...]:
        start = len(self._parent)
        self._parent.extend(range(start, start + count))
        return tuple(range(start, start + count))

    def find(self, i: int) -> int:
        """The unit an id belongs to (its union-find root)."""
        parent = self._parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    def union(self, a: int, b: int, where: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if rb < ra:
            ra, rb = rb, ra
        self._parent[rb] = ra
        self.fixed.setdefault(ra, []).extend(self.fixed.pop(rb, []))
        joined = self.joins.setdefault(ra, [])
        joined.extend(self.joins.pop(rb, []))
        if where not in joined:
            joined.append(where)

    def fix(self, ids: Sequence[int], reason: str) -> None:
        for i in ids:
            reasons = self.fixed.setdefault(self.find(i), [])
            if reason not in reasons:
                reasons.append(reason)

    def reasons(self, unit: int) -> List[str]:
        """Why the unit with root ``unit`` cannot be removed (empty: it can)."""
        return self.fixed.get(self.find(unit), [])

    def where_joined(self, unit: int) -> List[str]:
        """The graph nodes that joined the unit's channels (additions, products, grouped convs)."""
        return self.joins.get(self.find(unit), [])


def describe_node(node: fx.Node, modules: Dict[str, nn.Module]) -> str:
    """``"BatchNorm2d 'features.1'"`` or ``"add() (graph node 'add_3')"``: a node as a user finds it."""
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} '{node.target}'"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return f"{name}() (graph node '{node.name}')"
    if node.op == "call_method":
        return f"tensor.{node.target}() (graph node '{node.name}')"
    return f"{node.op} '{node.target}'"


def arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    """Positional argument ``index`` of ``node``, or keyword ``name``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _is_batch_size(value: Any, source: fx.Node) -> bool:
    """``x.size(0)`` or ``x.shape[0]`` of ``source``."""
    if not isinstance(value, fx.Node):
        return False
    if value.op == "call_method" and value.target == "size":
        return value.args[0] is source and arg(value, 1, "dim", None) == 0
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


def is_flatten(node: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    """Does ``node`` flatten [N, C, H, W] to [N, C*H*W] (each channel a contiguous block)?"""
    if node.op == "call_module":
        module = modules[node.target]
        return type(module) is nn.Flatten and module.start_dim == 1 and module.end_dim in (-1, 3)
    if (node.op == "call_function" and node.target is torch.flatten) or (
        node.op == "call_method" and node.target == "flatten"
    ):
        return arg(node, 1, "start_dim", 0) == 1 and arg(node, 2, "end_dim", -1) in (-1, 3)
    if node.op == "call_method" and node.target in ("view", "reshape"):
        shape = node.args[1:]
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return len(shape) == 2 and _is_batch_size(shape[0], node.args[0]) and shape[1] == -1
    return False


def is_spatial_mean(node: fx.Node) -> bool:
    """``x.mean((2, 3))`` or ``torch.mean(x, [-2, -1], keepdim=True)``: global average pooling by hand."""
    if not ((node.op == "call_method" and node.target == "mean") or (node.op == "call_function" and node.target is torch.mean)):
        return False
    dims = arg(node, 1, "dim", None)
    dims = tuple(dims) if isinstance(dims, (list, tuple)) else (dims,)
    return sorted(d for d in dims if isinstance(d, int)) in ([2, 3], [-2, -1]) and len(dims) == 2


def _is_shape_query(node: fx.Node) -> bool:
    """A node that reads only a shape (``x.size(0)``, ``x.shape``, ``x.dim()``)."""
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    return node.op == "call_function" and node.target is builtins.getattr and node.args[1] in ("shape", "ndim")


def _foreign_hooks(module: nn.Module) -> bool:
    """Hooks other than torch's pruning reparametrization (which only recomputes ``weight`` from its mask)."""
    pre = [h for h in module._forward_pre_hooks.values() if not isinstance(h, prune.BasePruningMethod)]
    return bool(pre or module._forward_hooks or getattr(module, "_backward_hooks", None))


def _tensor_args(node: fx.Node) -> List[fx.Node]:
    found: List[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


class _Tracer:
    """Walks the graph once, in order, giving every value its channel ids."""

    def __init__(self, model: nn.Module, graph: fx.Graph):
        self.flow = ChannelFlow(graph=graph, modules=dict(model.named_modules()))
        self.modules = self.flow.modules
        self.calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
        self.shapes: Set[fx.Node] = set()  # values computed from shapes only: scalars, not channels

    # The value of a node that is not tracked (an input, a buffer, an unknown op's result).
    def _ids_for(self, node: Any, count: int, reason: str) -> Tuple[int, ...]:
        tracked = self.flow.values.get(node) if isinstance(node, fx.Node) else None
        if tracked is not None:
            return tracked.ids
        ids = self.flow.new_ids(count)
        self.flow.fix(ids, reason)
        return ids

    def _unsupported(self, node: fx.Node, why: str = "is not supported") -> None:
        """Fix every tracked input of ``node``; its result is untracked."""
        reason = f"{describe_node(node, self.modules)} {why}"
        for source in _tensor_args(node):
            tracked = self.flow.values.get(source)
            if tracked is not None:
                self.flow.fix(tracked.ids, reason)

    def run(self) -> ChannelFlow:
        for node in self.flow.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                continue
            if node.op == "output":
                for source in _tensor_args(node):
                    tracked = self.flow.values.get(source)
                    if tracked is not None:
                        self.flow.fix(tracked.ids, OUTPUT)
                continue
            if node.op != "call_module" and (
                _is_shape_query(node) or all(a in self.shapes for a in _tensor_args(node))
            ):
                self.shapes.add(node)  # x.size(0), x.shape[-2:], arithmetic on them
                continue
            if node.op == "call_module":
                self._module(node)
            else:
                self._function(node)
        return self.flow

    # --- modules ----------------------------------------------------------------------
    def _module(self, node: fx.Node) -> None:
        name = node.target
        module = self.modules[name]
        resizable = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.BatchNorm2d, nn.PReLU)
        if self.calls[name] != 1 and isinstance(module, resizable):
            self._unsupported(node, f"is called {self.calls[name]} times in the forward pass (only modules used once can be resized)")
            return
        if isinstance(module, resizable) and _foreign_hooks(module):
            self._unsupported(node, "has hooks registered (they may depend on the channel count; remove them first)")
            return
        if isinstance(module, nn.Conv2d):
            self._conv(node, module)
        elif type(module) is nn.ConvTranspose2d and module.groups == 1 and len(node.args) == 1 and not node.kwargs:
            self._conv_transpose(node, module)
        elif isinstance(module, nn.Linear):
            self._linear(node, module)
        elif isinstance(module, nn.BatchNorm2d):
            tracked = self._single(node)
            if tracked is None or tracked.layout != CONV or type(module) is not nn.BatchNorm2d or module.num_features != len(tracked.ids):
                self._unsupported(node, "does not match the channels it receives")
                return
            self.flow.per_channel[name] = tracked.ids
            self.flow.values[node] = tracked
        elif isinstance(module, nn.PReLU) and module.num_parameters != 1:
            tracked = self._single(node)
            if tracked is None or tracked.layout != CONV or type(module) is not nn.PReLU or module.num_parameters != len(tracked.ids):
                self._unsupported(node, f"has {module.num_parameters} parameters that do not match its channels")
                return
            self.flow.per_channel[name] = tracked.ids
            self.flow.values[node] = tracked
        elif isinstance(module, POINTWISE_MODULES + DROPOUT_MODULES):
            self._pass(node)
        elif isinstance(module, CONSTANT_SPATIAL_MODULES + PADDING_SPATIAL_MODULES):
            if isinstance(module, nn.MaxPool2d) and module.return_indices:
                self._unsupported(node, "returns indices")
                return
            self._pass(node, layouts=(CONV,))
        elif is_flatten(node, self.modules):
            self._flatten(node)
        elif type(module).__name__ == "StochasticDepth":
            self._pass(node)  # torchvision.ops: identity in eval mode, where compaction is exact
        else:
            self._unsupported(node)

    def _single(self, node: fx.Node) -> Optional[Tracked]:
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            return None
        return self.flow.values.get(node.args[0])

    def _conv_transpose(self, node: fx.Node, conv: nn.ConvTranspose2d) -> None:
        """A transposed conv (a U-Net's upsampling): it reads channels and makes new ones, like a conv."""
        flow = self.flow
        tracked = flow.values.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        if tracked is not None and (tracked.layout != CONV or len(tracked.ids) != conv.in_channels):
            self._unsupported(node, f"expects {conv.in_channels} input channels laid out as [N, C, H, W]")
            tracked = None
        in_ids = tracked.ids if tracked is not None else self._ids_for(None, conv.in_channels, "channels of the model's input")
        out_ids = flow.new_ids(conv.out_channels)
        flow.producers[node.target] = out_ids
        flow.consumers[node.target] = Consumer(node.target, in_ids, CONV, node)
        flow.values[node] = Tracked(out_ids, CONV)

    def _conv(self, node: fx.Node, conv: nn.Conv2d) -> None:
        name = node.target
        flow = self.flow
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        tracked = flow.values.get(source) if isinstance(source, fx.Node) else None
        plain = type(conv) in (nn.Conv2d, BorderBiasConv2d)
        out_ids = flow.new_ids(conv.out_channels)
        if not plain or source is None:
            why = (
                f"is a {type(conv).__name__} (an nn.Conv2d subclass prunekit cannot rebuild)"
                if not plain
                else "is called with extra arguments"
            )
            self._unsupported(node, why)
            flow.fix(out_ids, f"{describe_node(node, self.modules)} {why}")
            return
        if tracked is not None and (tracked.layout != CONV or len(tracked.ids) != conv.in_channels):
            self._unsupported(node, f"expects {conv.in_channels} input channels laid out as [N, C, H, W]")
            tracked = None
        in_ids = tracked.ids if tracked is not None else self._ids_for(None, conv.in_channels, "channels of the model's input")
        flow.producers[name] = out_ids
        flow.consumers[name] = Consumer(name, in_ids, CONV, node)
        flow.values[node] = Tracked(out_ids, CONV)
        if conv.groups > 1:
            where = f"grouped conv '{name}' (groups={conv.groups})"
            per_in, per_out = conv.in_channels // conv.groups, conv.out_channels // conv.groups
            for group in range(conv.groups):
                members = list(in_ids[group * per_in : (group + 1) * per_in]) + list(
                    out_ids[group * per_out : (group + 1) * per_out]
                )
                for other in members[1:]:
                    flow.union(members[0], other, where)

    def _linear(self, node: fx.Node, linear: nn.Linear) -> None:
        name = node.target
        flow = self.flow
        tracked = self._single(node)
        out_ids = flow.new_ids(linear.out_features)
        if type(linear) is not nn.Linear:
            why = f"is a {type(linear).__name__}, not a plain nn.Linear"
            self._unsupported(node, why)
            flow.fix(out_ids, f"{describe_node(node, self.modules)} {why}")
            return
        if tracked is not None:
            ok = (tracked.layout == LAST and len(tracked.ids) == linear.in_features) or (
                tracked.layout == FLAT and linear.in_features % len(tracked.ids) == 0
            )
            if not ok:
                self._unsupported(
                    node,
                    f"has {linear.in_features} input features, which do not match the {len(tracked.ids)} "
                    "channels it receives (nn.Linear is resized after a flatten or another nn.Linear)",
                )
                tracked = None
        if tracked is None:
            tracked = Tracked(self._ids_for(None, linear.in_features, "features of the model's input"), LAST)
        flow.producers[name] = out_ids
        flow.consumers[name] = Consumer(name, tracked.ids, tracked.layout, node)
        flow.values[node] = Tracked(out_ids, LAST)

    # --- functions and methods ---------------------------------------------------------
    def _function(self, node: fx.Node) -> None:
        target = node.target
        if node.op == "call_function" and target is operator.getitem:
            self._getitem(node)
            return
        if node.op == "call_function" and target is torch.cat:
            self._cat(node)
            return
        if (node.op == "call_function" and target in (torch.chunk, torch.split)) or (
            node.op == "call_method" and target in ("chunk", "split")
        ):
            # The forward's code splits at fixed sizes: removing a channel would move the split.
            self._unsupported(node, "splits the channels at fixed sizes (removing one would move the split)")
            return
        if is_flatten(node, self.modules):
            self._flatten(node)
            return
        if node.op == "call_function" and target in DROPOUT_FUNCTIONS:
            self._pass(node)
        elif node.op == "call_function" and target in CONSTANT_SPATIAL_FUNCTIONS | PADDING_SPATIAL_FUNCTIONS:
            if target is F.max_pool2d and arg(node, 6, "return_indices", False):
                self._unsupported(node, "returns indices")
                return
            self._pass(node, layouts=(CONV,))
        elif (node.op == "call_function" and target in POINTWISE_FUNCTIONS) or (
            node.op == "call_method" and target in POINTWISE_METHODS
        ):
            self._pointwise(node)
        elif is_spatial_mean(node) and self._single_conv_source(node):
            source = self.flow.values[node.args[0]]
            keepdim = arg(node, 2, "keepdim", False) is True
            # x.mean((2, 3), keepdim=True) keeps [N, C, 1, 1]; without keepdim, [N, C] feeds a Linear.
            self.flow.values[node] = source if keepdim else Tracked(source.ids, FLAT)
        else:
            self._unsupported(node)

    def _single_conv_source(self, node: fx.Node) -> bool:
        source = node.args[0] if node.args else None
        tracked = self.flow.values.get(source) if isinstance(source, fx.Node) else None
        others = [s for s in _tensor_args(node) if s is not source and s not in self.shapes]
        return tracked is not None and tracked.layout == CONV and not others

    def _pass(self, node: fx.Node, layouts: Tuple[str, ...] = (CONV, FLAT, LAST)) -> None:
        """One tracked tensor in, the same channels out."""
        sources = [s for s in _tensor_args(node) if s in self.flow.values]
        others = [s for s in _tensor_args(node) if s not in self.flow.values and s not in self.shapes]
        if len(sources) != 1 or others or node.args[0] is not sources[0] or self.flow.values[sources[0]].layout not in layouts:
            self._unsupported(node)
            return
        self.flow.values[node] = self.flow.values[sources[0]]

    def _pointwise(self, node: fx.Node) -> None:
        """Element-wise ops: tracked operands of one layout and length are joined channel by channel."""
        sources = [s for s in _tensor_args(node) if s not in self.shapes]
        tracked = [self.flow.values.get(s) for s in sources]
        if any(t is None for t in tracked):
            # An untracked tensor (an input, a parameter, an unknown op's result) may vary by channel.
            self._unsupported(node, "combines them with a tensor whose channels prunekit does not follow")
            return
        first = tracked[0]
        if any(t.layout != first.layout or len(t.ids) != len(first.ids) for t in tracked[1:]):
            self._unsupported(node, "combines tensors whose channels do not line up")
            return
        where = describe_node(node, self.modules)
        for other in tracked[1:]:
            for a, b in zip(first.ids, other.ids):
                self.flow.union(a, b, where)
        self.flow.values[node] = first

    def _flatten(self, node: fx.Node) -> None:
        tracked = self.flow.values.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if tracked is None or tracked.layout != CONV:
            self._unsupported(node)
            return
        self.flow.values[node] = Tracked(tracked.ids, FLAT)

    def _cat(self, node: fx.Node) -> None:
        parts = arg(node, 0, "tensors", ())
        dim = arg(node, 1, "dim", 0)
        tracked = [self.flow.values.get(p) if isinstance(p, fx.Node) else None for p in parts]
        if not tracked or any(t is None for t in tracked):
            self._unsupported(node, "concatenates tensors whose channels prunekit does not follow")
            return
        layout = tracked[0].layout
        ok_dim = dim == 1 if layout in (CONV, FLAT) else dim == -1
        if not ok_dim or any(t.layout != layout for t in tracked) or layout == FLAT:
            self._unsupported(node, f"concatenates along dim {dim}, not the channels")
            return
        self.flow.values[node] = Tracked(tuple(i for t in tracked for i in t.ids), layout)

    def _getitem(self, node: fx.Node) -> None:
        self._unsupported(node, "indexes the tensor (prunekit follows only whole channels)")


def trace_channel_flow(model: nn.Module) -> ChannelFlow:
    """Trace ``model`` (in eval mode) and follow its channels.

    Raises:
        UnsupportedGraphError: ``torch.fx`` cannot trace the model (data-dependent control flow).
    """
    with eval_mode(model):
        try:
            graph = trace_graph(model)[0]
        except TracingError as err:
            raise UnsupportedGraphError(
                f"prunekit could not trace {type(model).__name__} with torch.fx "
                f"({err}); channel pruning and compact need a forward without data-dependent "
                "control flow, such as an nn.Sequential stack or a torchvision classifier; compact the "
                "traceable parts instead (an encoder and a decoder together: prunekit.compact_chain(encoder, decoder))"
            ) from None
    return _Tracer(model, graph).run()
