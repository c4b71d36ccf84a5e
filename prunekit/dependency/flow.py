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
shuffle, a module called twice, a tensor attribute that does not lie along them added to
them). A fixed unit keeps the reason, with the graph node's name.

The walk knows no op: each node's handler (:mod:`prunekit.dependency.registry`, the rules
in :mod:`prunekit.dependency.handlers`) says how its channels pass; a node without one is
not followed.

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
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch.fx as fx
from torch import nn
from torch.nn.utils import prune

from prunekit._rollback import eval_mode
from prunekit.dependency.registry import handler_for
from prunekit.dependency.trace import TracingError, trace_graph

__all__ = [
    "CONV",
    "FLAT",
    "LAST",
    "OUTPUT",
    "PAIR",
    "ChannelFlow",
    "Consumer",
    "FlowTracer",
    "Tracked",
    "UnsupportedGraphError",
    "arg",
    "describe_node",
    "tensor_args",
    "trace_channel_flow",
]


class UnsupportedGraphError(ValueError):
    """The model has a pattern prunekit cannot resize exactly; the message names the layer or node."""


# Layouts of a tracked tensor: channels on dim 1 of [N, C, H, W]; on dim 1 of a flattened
# [N, C * block] (each channel a contiguous block of features); on the last dim (an nn.Linear's output); on the
# last dim of the first item of an (output, weights) pair (what nn.MultiheadAttention returns).
CONV, FLAT, LAST, PAIR = "conv", "flat", "last", "pair"
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
        per_channel: BatchNorm / LayerNorm / per-channel PReLU name -> the ids of its channels.
        norms: the LayerNorms among them, whose weight must be masked with a removed channel (a
            LayerNorm mixes its channels' statistics: a channel is constant after it only when masked there).
        scales: a module's own parameter applied per channel (a layer scale, ``gamma * x``) -> the ids
            of its channels and the dimension of the parameter they lie along.
        values: graph node -> its tracked channels (only for nodes that carry channels).
        fixed: per unit, the reasons it cannot be removed (see :meth:`reasons`).
        joins: per unit, the graph nodes that joined its channels (see :meth:`where_joined`).
    """

    graph: fx.Graph
    modules: Dict[str, nn.Module]
    producers: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    consumers: Dict[str, Consumer] = field(default_factory=dict)
    per_channel: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    norms: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    scales: Dict[str, Tuple[Tuple[int, ...], int]] = field(default_factory=dict)
    values: Dict[fx.Node, Tracked] = field(default_factory=dict)
    fixed: Dict[int, List[str]] = field(default_factory=dict)
    joins: Dict[int, List[str]] = field(default_factory=dict)
    _parent: List[int] = field(default_factory=list)

    def attribute(self, target: str) -> Any:
        """The tensor a ``get_attr`` node reads (``"features.1.0.layer_scale"``)."""
        owner, _, name = target.rpartition(".")
        return getattr(self.modules[owner], name)

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


def _is_shape_query(node: fx.Node) -> bool:
    """A node that reads only a shape (``x.size(0)``, ``x.shape``, ``x.dim()``)."""
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    return node.op == "call_function" and node.target is builtins.getattr and node.args[1] in ("shape", "ndim")


def hooks_key(model: nn.Module) -> Tuple[bool, ...]:
    """Which modules carry hooks other than torch's pruning (the flow refuses to resize those)."""
    return tuple(_foreign_hooks(module) for module in model.modules())


def _foreign_hooks(module: nn.Module) -> bool:
    """Hooks other than torch's pruning reparametrization (which only recomputes ``weight`` from its mask)."""
    pre = [h for h in module._forward_pre_hooks.values() if not isinstance(h, prune.BasePruningMethod)]
    return bool(pre or module._forward_hooks or getattr(module, "_backward_hooks", None))


def tensor_args(node: fx.Node) -> List[fx.Node]:
    """The graph values among ``node``'s arguments, in order."""
    found: List[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


class FlowTracer:
    """Walks the graph once, in order, giving every value its channel ids; each op's handler says how.

    Handlers (:mod:`prunekit.dependency.registry`) build on the steps below: :meth:`pass_through`
    (the same channels out), :meth:`join` (operands joined channel by channel), :meth:`unsupported`
    (the channels that meet the node are fixed), and the ``flow`` they write into.
    """

    def __init__(self, model: nn.Module, graph: fx.Graph):
        self.flow = ChannelFlow(graph=graph, modules=dict(model.named_modules()))
        self.modules = self.flow.modules
        self.calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
        # How many nodes read each attribute (a layer scale read once can be resized with its channels).
        self.attribute_uses = Counter()
        for node in graph.nodes:
            if node.op == "get_attr":
                self.attribute_uses[node.target] += len(node.users)
        self.shapes: Set[fx.Node] = set()  # values computed from shapes only: scalars, not channels

    def tracked(self, value: Any) -> Optional[Tracked]:
        """The channels ``value`` carries (None: not a tracked graph value)."""
        return self.flow.values.get(value) if isinstance(value, fx.Node) else None

    def input_ids(self, count: int, reason: str) -> Tuple[int, ...]:
        """New ids for ``count`` channels prunekit did not follow (the model's input, say), fixed for ``reason``."""
        ids = self.flow.new_ids(count)
        self.flow.fix(ids, reason)
        return ids

    def unsupported(self, node: fx.Node, why: str = "is not supported") -> None:
        """Fix every tracked input of ``node``; its result is untracked."""
        reason = f"{describe_node(node, self.modules)} {why}"
        for source in tensor_args(node):
            tracked = self.flow.values.get(source)
            if tracked is not None:
                self.flow.fix(tracked.ids, reason)

    def run(self) -> ChannelFlow:
        for node in self.flow.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                continue
            if node.op == "output":
                for source in tensor_args(node):
                    tracked = self.flow.values.get(source)
                    if tracked is not None:
                        self.flow.fix(tracked.ids, OUTPUT)
                continue
            if node.op != "call_module" and (
                _is_shape_query(node) or all(a in self.shapes for a in tensor_args(node))
            ):
                self.shapes.add(node)  # x.size(0), x.shape[-2:], arithmetic on them
                continue
            self._step(node)
        return self.flow

    def _step(self, node: fx.Node) -> None:
        module = self.modules[node.target] if node.op == "call_module" else None
        handler = handler_for(node, self.modules)
        if handler is None:
            self.unsupported(node)
            return
        if module is not None and handler.resizable:
            calls = self.calls[node.target]
            if calls != 1:
                self.unsupported(node, f"is called {calls} times in the forward pass (only modules used once can be resized)")
                return
            if _foreign_hooks(module):
                self.unsupported(node, "has hooks registered (they may depend on the channel count; remove them first)")
                return
        handler.trace(self, node, module)

    # --- steps the handlers share ------------------------------------------------------
    def single(self, node: fx.Node) -> Optional[Tracked]:
        """The channels of ``node``'s one argument (None: other arguments too, or untracked)."""
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            return None
        return self.flow.values.get(node.args[0])

    def single_conv_source(self, node: fx.Node) -> bool:
        """Is ``node``'s first argument tracked as [N, C, H, W], and its only tensor argument?"""
        source = node.args[0] if node.args else None
        tracked = self.tracked(source)
        others = [s for s in tensor_args(node) if s is not source and s not in self.shapes]
        return tracked is not None and tracked.layout == CONV and not others

    def pass_through(self, node: fx.Node, layouts: Tuple[str, ...] = (CONV, FLAT, LAST)) -> None:
        """One tracked tensor in, the same channels out (any other tensor argument: not followed)."""
        sources = [s for s in tensor_args(node) if s in self.flow.values]
        others = [s for s in tensor_args(node) if s not in self.flow.values and s not in self.shapes]
        if len(sources) != 1 or others or node.args[0] is not sources[0] or self.flow.values[sources[0]].layout not in layouts:
            self.unsupported(node)
            return
        self.flow.values[node] = self.flow.values[sources[0]]

    def join(self, node: fx.Node) -> None:
        """Element-wise ops: tracked operands of one layout and length are joined channel by channel."""
        sources = [s for s in tensor_args(node) if s not in self.shapes]
        tracked = [self.flow.values.get(s) for s in sources]
        if any(t is None for t in tracked):
            # An untracked tensor (an input, a parameter, an unknown op's result) may vary by channel.
            self.unsupported(node, "combines them with a tensor whose channels prunekit does not follow")
            return
        first = tracked[0]
        if first.layout == PAIR:
            self.unsupported(node, "combines (output, weights) pairs, not tensors")
            return
        if any(t.layout != first.layout or len(t.ids) != len(first.ids) for t in tracked[1:]):
            self.unsupported(node, "combines tensors whose channels do not line up")
            return
        where = describe_node(node, self.modules)
        for other in tracked[1:]:
            for a, b in zip(first.ids, other.ids):
                self.flow.union(a, b, where)
        self.flow.values[node] = first


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
    return FlowTracer(model, graph).run()
