"""Channel groups: the layers whose output channels can only be removed together.

A residual stream couples every conv that adds into it; a depthwise conv couples its
channels with the conv that feeds it; a squeeze-and-excitation gate couples with the
channels it scales. :func:`channel_groups` lists these groups, each made of *units*
(one channel of every member, or one whole group of a grouped conv's channels) that
a pruning method removes as one, and says which units cannot be removed and why.

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 2, 1))
    >>> [(g.members, len(g.units), len(g.removable_units)) for g in channel_groups(model)]
    [(('0', '2'), 8, 8), (('3',), 2, 0)]
    >>> channel_groups(model)[1].fixed_reasons
    ('reaches the model output',)
"""

from __future__ import annotations

import difflib
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor, nn

from prunekit.dependency.flow import ChannelFlow, hooks_key, trace_channel_flow
from prunekit.dependency.registry import handler_of
from prunekit.dependency.trace import structure_key

__all__ = ["ChannelGroup", "ChannelUnit", "channel_groups", "group_of", "unit_masks"]

# Per model, while its structure and hooks stay the same: the groups are immutable, so shared.
_GROUPS: "weakref.WeakKeyDictionary[nn.Module, Tuple[Any, Tuple[ChannelGroup, ...]]]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ChannelUnit:
    """Channels removed as one: for each member layer, its output channel indices.

    Attributes:
        channels: member name -> its output channels in this unit (one, or a grouped conv's group).
        fixed: why this unit cannot be removed (empty when it can).
        norms: LayerNorm name -> its channels in this unit, masked with them (see :attr:`ChannelGroup.norms`).
    """

    channels: Dict[str, Tuple[int, ...]]
    fixed: Tuple[str, ...] = ()
    norms: Dict[str, Tuple[int, ...]] = field(default_factory=dict)

    @property
    def removable(self) -> bool:
        return not self.fixed


@dataclass(frozen=True)
class ChannelGroup:
    """Layers (convs, ``nn.Linear``) whose output channels are removed together, unit by unit.

    Attributes:
        members: the layers, in the order the forward pass runs them; ``members[0]`` names the group.
        units: the units, in the order of the first member's channels.
        joined_by: the graph nodes that couple the members (``add()``, a grouped conv, ...).
        norms: the LayerNorms the group's channels pass through. A LayerNorm mixes its channels'
            statistics: a removed channel is constant after it (and ``compact`` can remove it) only
            when the LayerNorm's weight and bias are masked at that channel too.
    """

    members: Tuple[str, ...]
    units: Tuple[ChannelUnit, ...]
    joined_by: Tuple[str, ...] = ()
    norms: Tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The group's name: its first member's."""
        return self.members[0]

    @property
    def removable_units(self) -> Tuple[int, ...]:
        """Indices of the units that can be removed."""
        return tuple(k for k, unit in enumerate(self.units) if unit.removable)

    @property
    def fixed_reasons(self) -> Tuple[str, ...]:
        """Why some units cannot be removed, each reason once."""
        return tuple(dict.fromkeys(reason for unit in self.units for reason in unit.fixed))

    def __str__(self) -> str:
        removable = len(self.removable_units)
        text = f"{self.name}: {len(self.members)} layer{'s' if len(self.members) > 1 else ''}, {removable}/{len(self.units)} units removable"
        if len(self.members) > 1:
            text += f" ({', '.join(self.members)})"
        if removable < len(self.units):
            text += f"; fixed: {'; '.join(self.fixed_reasons)}"
        return text


def channel_groups(model: nn.Module) -> List[ChannelGroup]:
    """The channel groups of ``model`` (traced with ``torch.fx`` in eval mode; the model is not changed).

    Every conv and ``nn.Linear`` belongs to exactly one group. A unit is fixed when its
    channels reach the model's output, come from its input, or meet an operation prunekit
    does not follow (a reshape that mixes channels, a channel shuffle, attention); the reason
    names the graph node, so that the layer can be left out.

    The groups are computed once per model while its modules (and their hooks) stay the same.

    Raises:
        prunekit.UnsupportedGraphError: ``torch.fx`` cannot trace the model.
    """
    key = (structure_key(model), hooks_key(model))
    kept = _GROUPS.get(model)
    if kept is not None and kept[0] == key:
        return list(kept[1])
    groups = _channel_groups(trace_channel_flow(model))
    _GROUPS[model] = (key, tuple(groups))
    return groups


def _channel_groups(flow: ChannelFlow) -> List[ChannelGroup]:
    order = list(flow.producers)
    units: Dict[int, Dict[str, List[int]]] = {}
    for name in order:
        for channel, i in enumerate(flow.producers[name]):
            units.setdefault(flow.find(i), {}).setdefault(name, []).append(channel)
    # Members connected through a shared unit form one group (union over member names).
    parent = {name: name for name in order}

    def find(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for members in units.values():
        names = list(members)
        for other in names[1:]:
            a, b = find(names[0]), find(other)
            if a != b:
                parent[max(a, b, key=order.index)] = min(a, b, key=order.index)
    norms: Dict[int, Dict[str, List[int]]] = {}
    for name, ids in flow.norms.items():
        for channel, i in enumerate(ids):
            norms.setdefault(flow.find(i), {}).setdefault(name, []).append(channel)
    grouped: Dict[str, List[int]] = {}
    for root, members in units.items():
        grouped.setdefault(find(next(iter(members))), []).append(root)
    groups = []
    for head in order:
        if head not in grouped:
            continue
        roots = grouped[head]
        members = tuple(name for name in order if find(name) == head)
        roots.sort(key=lambda r: min(units[r].get(head, [len(flow.producers[head])])))
        group_units = tuple(
            ChannelUnit({name: tuple(units[r][name]) for name in members if name in units[r]}, tuple(flow.reasons(r)),
                        {name: tuple(norms[r][name]) for name in norms.get(r, {})})
            for r in roots
        )
        joined = tuple(dict.fromkeys(w for r in roots for w in flow.where_joined(r)))
        group_norms = tuple(dict.fromkeys(name for r in roots for name in norms.get(r, {})))
        groups.append(ChannelGroup(members, group_units, joined, group_norms))
    return groups


def group_of(groups: List[ChannelGroup], layer: str) -> ChannelGroup:
    """The group ``layer`` is a member of.

    Raises:
        KeyError: ``layer`` is no conv or Linear of the model (the message lists close names).
    """
    for group in groups:
        if layer in group.members:
            return group
    names = [m for g in groups for m in g.members]
    close = difflib.get_close_matches(layer, names, n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise KeyError(f"'{layer}' is not a conv or nn.Linear of the model{hint}")


def unit_masks(model: nn.Module, group: ChannelGroup, removed: List[int]) -> Dict[str, Tensor]:
    """For each member of ``group`` (and each of its :attr:`~ChannelGroup.norms`), a bool [out] mask that is
    False on the channels of the ``removed`` units: mask each layer's weight and bias with it (an attention's
    ``in_proj_weight`` and ``in_proj_bias``, whose rows are its channels).

    Raises:
        ValueError: a removed unit is fixed (the message says why).
    """
    masks = {}
    for name in group.members:
        layer = model.get_submodule(name)
        channels = handler_of(layer).channels(layer)[1]
        masks[name] = torch.ones(channels, dtype=torch.bool, device=next(layer.parameters()).device)
    for name in group.norms:
        norm = model.get_submodule(name)
        masks[name] = torch.ones(norm.weight.shape[0], dtype=torch.bool, device=norm.weight.device)
    for k in removed:
        unit = group.units[k]
        if unit.fixed:
            raise ValueError(f"unit {k} of channel group '{group.name}' cannot be removed: {unit.fixed[0]}")
        for name, channels in list(unit.channels.items()) + list(unit.norms.items()):
            masks[name][list(channels)] = False
    return masks
