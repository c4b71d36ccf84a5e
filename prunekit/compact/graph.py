"""What :func:`prunekit.compact` removes and folds: a compaction plan from the channel flow.

A channel unit (see :mod:`prunekit.dependency.flow`) is removed when every member channel
is dead: its weights are all zero, so it emits a constant (its bias, 0 when masked).
The constants are carried through the graph (BatchNorm with its running statistics,
activations, additions, concatenations) to the layers that read them, and folded into
their biases; each op's handler (:mod:`prunekit.dependency.handlers`) says what a constant
becomes there and how its layer loses channels. A unit whose channels are dead in some members only (a residual stream
masked in one branch) is refused naming both sides: it would not be constant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
import torch.fx as fx
from torch import Tensor, nn

from prunekit.dependency.flow import CONV, OUTPUT, ChannelFlow, UnsupportedGraphError, describe_node, trace_channel_flow
from prunekit.dependency.registry import handler_for, handler_of

__all__ = ["CompactionPlan", "UnsupportedGraphError", "plan_compaction", "removable_channels"]

_ADVICE = (
    "compact removes only channels that are dead in every layer they are coupled with (see "
    "prunekit.channel_groups(model)); mask the whole group, or unmask these channels"
)


@dataclass
class CompactionPlan:
    """What :func:`prunekit.compact` will do, by module name.

    Attributes:
        keep_out: for each conv / Linear whose output channels are removed, the kept ones.
        keep_in: for each consumer (conv or Linear), the kept input channels/features.
        folds: for each consumer, the removed inputs' constant contributions (float64):
            [out, kh, kw] for a conv, [out] for a Linear; for each LayerNorm, the constants its
            removed channels bring (it keeps their share of its statistics).
        keep_channels: for each BatchNorm2d / LayerNorm / per-channel PReLU on a path, the kept channels.
        keep_scales: for each per-channel parameter (a layer scale), its kept channels and the dim they lie along.
        pinned: layers with dead channels that reach the model output and are kept.
        batchnorm_constants: BatchNorms whose removed channels leave them as non-zero
            constants computed from their running statistics (exact in eval mode only: in
            training mode a BatchNorm normalises with batch statistics).
    """

    keep_out: Dict[str, Tensor] = field(default_factory=dict)
    keep_in: Dict[str, Tensor] = field(default_factory=dict)
    folds: Dict[str, Tensor] = field(default_factory=dict)
    keep_channels: Dict[str, Tensor] = field(default_factory=dict)
    keep_scales: Dict[str, Tuple[Tensor, int]] = field(default_factory=dict)
    pinned: List[str] = field(default_factory=list)
    batchnorm_constants: List[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """True when no channel is removed."""
        return not self.keep_out


def removable_channels(layer: nn.Module) -> Tuple[Tensor, Tensor]:
    """Bool mask [out] of the channels of a conv or Linear that no longer depend on the input, and the constant each emits.

    A channel whose weights are all zero outputs its bias everywhere (0 for a
    masked channel, whose bias is masked too). The layer's handler decides
    (:mod:`prunekit.dependency.handlers`).
    """
    return handler_of(layer).dead_channels(layer)


class _Constants:
    """The value every removed channel holds at each graph node (float64, by channel position)."""

    def __init__(self, flow: ChannelFlow, removed: Set[int], dead_constants: Dict[str, Tensor]):
        self.flow = flow
        self.removed = removed
        self.dead_constants = dead_constants
        self.values: Dict[fx.Node, Tensor] = {}
        self.batchnorms: List[str] = []
        self.norm_inputs: Dict[str, Tensor] = {}

    def mask(self, ids: Tuple[int, ...]) -> Tensor:
        return torch.tensor([self.flow.find(i) in self.removed for i in ids], dtype=torch.bool)

    def run(self) -> None:
        flow = self.flow
        for node in flow.graph.nodes:
            tracked = flow.values.get(node)
            if tracked is None:
                continue
            if not bool(self.mask(tracked.ids).any()):
                continue  # nothing removed flows here: no constant to carry
            self.values[node] = self._value(node)

    def at(self, node: Any, length: int) -> Tensor:
        value = self.values.get(node) if isinstance(node, fx.Node) else None
        return value if value is not None else torch.zeros(length, dtype=torch.float64)

    def incoming(self, node: fx.Node) -> Tensor:
        """The constants of ``node``'s first argument, one per channel of ``node``'s value."""
        return self.at(node.args[0], len(self.flow.values[node].ids))

    def _value(self, node: fx.Node) -> Tensor:
        module = self.flow.modules.get(node.target) if node.op == "call_module" else None
        return handler_for(node, self.flow.modules).constant(self, node, module)

    def evaluate(self, node: fx.Node, module: Optional[nn.Module]) -> Tensor:
        """Apply an element-wise op to the constants of its operands."""
        flow = self.flow

        def substitute(value: Any) -> Any:
            if isinstance(value, fx.Node) and value.op == "get_attr":
                return flow.attribute(value.target).detach().double().cpu()  # a layer scale, [C, 1, 1] or [C]
            if isinstance(value, fx.Node):
                tracked = flow.values.get(value)
                if tracked is None:
                    raise UnsupportedGraphError(
                        f"cannot carry the removed channels' constants through {describe_node(node, flow.modules)}"
                    )
                constant = self.at(value, len(tracked.ids))
                return constant.view(1, -1, 1, 1) if tracked.layout == CONV else constant.view(1, -1)
            return value

        args = fx.node.map_aggregate(node.args, substitute)
        kwargs = fx.node.map_aggregate(node.kwargs, substitute)
        with torch.no_grad():
            if module is not None:
                out = module(args[0])  # parameter-free and element-wise (handlers/elementwise.py)
            elif node.op == "call_method":
                out = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                out = node.target(*args, **kwargs)
        return out.reshape(-1).double()


def _unit_members(flow: ChannelFlow, dead: Dict[str, Tensor]) -> Dict[int, List[Tuple[str, int, bool]]]:
    units: Dict[int, List[Tuple[str, int, bool]]] = {}
    for name, ids in flow.producers.items():
        for channel, i in enumerate(ids):
            units.setdefault(flow.find(i), []).append((name, channel, bool(dead[name][channel])))
    return units


def _channels_text(members: List[Tuple[str, int, bool]], want_dead: bool) -> str:
    by_layer: Dict[str, List[int]] = {}
    for name, channel, is_dead in members:
        if is_dead == want_dead:
            by_layer.setdefault(name, []).append(channel)
    return ", ".join(f"'{name}' channel{'s' if len(ch) > 1 else ''} {', '.join(map(str, ch[:6]))}{'...' if len(ch) > 6 else ''}" for name, ch in by_layer.items())


def plan_compaction(model: nn.Module, prune_output_channels: bool = False) -> CompactionPlan:
    """Decide which channels of ``model`` to remove and what each consumer must fold.

    ``model`` must have no pruning reparametrization left (its ``weight`` tensors are the effective ones).

    Raises:
        UnsupportedGraphError: dead channels that cannot be removed exactly (coupled with live
            channels, or with an operation prunekit does not follow); the message names the layer.
    """
    flow = trace_channel_flow(model)
    modules = flow.modules
    dead: Dict[str, Tensor] = {}
    dead_constants: Dict[str, Tensor] = {}
    for name in flow.producers:
        dead[name], dead_constants[name] = removable_channels(modules[name])
    plan = CompactionPlan()
    removed: Set[int] = set()
    partial: List[Tuple[str, int, bool]] = []
    partial_joins: List[str] = []
    for unit, members in _unit_members(flow, dead).items():
        states = [is_dead for _, _, is_dead in members]
        if not any(states):
            continue
        if not all(states):
            partial.extend(members)
            partial_joins.extend(j for j in flow.where_joined(unit) if j not in partial_joins)
            continue
        reasons = flow.reasons(unit)
        blocking = [r for r in reasons if r != OUTPUT or not prune_output_channels]
        if blocking == [OUTPUT]:
            plan.pinned.extend(name for name, _, _ in members if name not in plan.pinned)
            continue
        if blocking:
            raise UnsupportedGraphError(
                f"cannot remove the dead {_channels_text(members, True)}: {blocking[0]}. compact resizes "
                "only what it can keep exact (convs, Linear layers, BatchNorm, element-wise ops, pooling, "
                "residual additions, concatenation, grouped convs, flatten into nn.Linear); leave "
                "these layers out of the pruning plan (for an encoder and a decoder around a per-channel op "
                "such as AdaIN, use prunekit.compact_chain(encoder, decoder))"
            )
        removed.add(unit)
    if partial:
        joined = "; ".join(partial_joins[:3])
        raise UnsupportedGraphError(
            f"cannot remove the dead {_channels_text(partial, True)}: they are coupled"
            f"{f' (through {joined})' if joined else ''} with {_channels_text(partial, False)}, "
            f"which are not dead. {_ADVICE}"
        )
    # A layer keeps at least one (constant) channel.
    changed = True
    while changed:
        changed = False
        for name, ids in flow.producers.items():
            if all(flow.find(i) in removed for i in ids):
                removed.discard(flow.find(ids[0]))
                changed = True
    if not removed:
        return plan

    constants = _Constants(flow, removed, dead_constants)
    constants.run()
    plan.batchnorm_constants = constants.batchnorms
    for name, ids in flow.producers.items():
        gone = constants.mask(ids)
        if bool(gone.any()):
            plan.keep_out[name] = torch.nonzero(~gone).flatten()
    for name, ids in flow.per_channel.items():
        gone = constants.mask(ids)
        if bool(gone.any()):
            plan.keep_channels[name] = torch.nonzero(~gone).flatten()
            if name in constants.norm_inputs:
                plan.folds[name] = constants.norm_inputs[name][gone]
    for target, (ids, dim) in flow.scales.items():
        gone = constants.mask(ids)
        if bool(gone.any()):
            plan.keep_scales[target] = (torch.nonzero(~gone).flatten(), dim)
    for name, consumer in flow.consumers.items():
        gone = constants.mask(consumer.ids)
        if not bool(gone.any()):
            continue
        layer = modules[name]
        removed_positions = torch.nonzero(gone).flatten()
        constant = constants.at(consumer.node.args[0], len(consumer.ids))[removed_positions].to(layer.weight.device)
        keep_in, fold = handler_of(layer).fold(name, layer, consumer, torch.nonzero(~gone).flatten(), removed_positions, constant)
        plan.keep_in[name] = keep_in
        if fold is not None:
            plan.folds[name] = fold
    return plan
