"""What a channel method prunes: a channel group (coupled convs), unit by unit.

A channel method (``"channel"``, ``"filter-norm"``) masks whole output channels. Where
channels are coupled (a residual stream, a depthwise conv and the conv feeding it, a
gate and the channels it scales; see :func:`prunekit.channel_groups`) it masks the
same *unit* in every member, so that :func:`prunekit.compact` can remove it: one
:class:`GroupBlock` per group, named by its first member. A conv coupled with nothing is
a group of one, whose units are its channels: the plain per-layer case.

A unit's score combines its members' channel scores. Each member's scores are divided
by their mean over the member's channels before they are summed over the members, so
that a member with large activations (or large weights) does not decide alone: a unit
is weak when it is weak in every member, relative to that member's other channels
(Torch-Pruning's group importance averages normalised member scores alike). A group of
one keeps its raw scores.

Example:
    >>> from torch import nn
    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.stem, self.a = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, padding=1)
    ...     def forward(self, x):
    ...         x = self.stem(x)
    ...         return torch.relu(x + self.a(x))
    >>> blocks = group_blocks(Block(), ["a"])
    >>> list(blocks), [m.conv_name for m in blocks["stem"].members]
    (['stem'], ['stem', 'a'])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

import torch
from torch import Tensor, nn

from prunekit.dependency import UnsupportedGraphError, channel_groups
from prunekit.layers import CHANNEL_LAYER_TYPES, ConvBlock, channel_weight, conv_block, output_channels

__all__ = ["GroupBlock", "group_blocks", "group_key", "unit_scores"]


@dataclass
class GroupBlock:
    """The members of one channel group (each a :class:`~prunekit.layers.ConvBlock`) and its units.

    Attributes:
        name: the group's name (its first member's).
        members: the member convs (and ``nn.Linear`` layers) with their BatchNorm and activation.
        units: for each unit, each member's output channels in it (same order as ``members``).
        fixed: for each unit, why it cannot be removed (empty when it can).
        norms: the LayerNorms (name, module) the channels pass through, masked with them.
        norm_units: for each unit, each norm's features in it (same order as ``norms``).
    """

    name: str
    members: List[ConvBlock]
    units: List[Tuple[Tuple[int, ...], ...]]
    fixed: List[Tuple[str, ...]]
    norms: List[Tuple[str, nn.Module]] = field(default_factory=list)
    norm_units: List[Tuple[Tuple[int, ...], ...]] = field(default_factory=list)

    @property
    def member_names(self) -> List[str]:
        return [member.conv_name for member in self.members]

    def norm_masks(self, removed_units: Tensor) -> List[Tensor]:
        """For each of :attr:`norms` (the LayerNorms the group's channels pass through), bool [features]: True on
        the features of the units in ``removed_units``, which are masked in its weight and bias with them."""
        return _unit_masks([norm.weight.shape[0] for _, norm in self.norms], self.norm_units, removed_units)

    @property
    def removable(self) -> Tensor:
        """Bool [units]: the units that may be masked."""
        return torch.tensor([not reasons for reasons in self.fixed], dtype=torch.bool)

    def channel_masks(self, removed_units: Tensor) -> List[Tensor]:
        """For each member, bool [out]: True on the channels of the units in ``removed_units`` (bool [units])."""
        return _unit_masks([output_channels(m.conv) for m in self.members], self.units, removed_units)

    def dead_units(self) -> Tensor:
        """Bool [units]: units whose channels have all-zero weights in every member."""
        dead = [(channel_weight(m.conv).detach().flatten(1) == 0).all(dim=1).cpu() for m in self.members]
        return torch.tensor([
            all(bool(d[list(channels)].all()) for d, channels in zip(dead, unit)) for unit in self.units
        ], dtype=torch.bool)


def _unit_masks(
    sizes: Sequence[int], units: Sequence[Tuple[Tuple[int, ...], ...]], removed_units: Tensor
) -> List[Tensor]:
    """Bool [size] per layer: True on that layer's channels of every unit in ``removed_units`` (``units[k]``: each
    layer's channels in unit k)."""
    masks = [torch.zeros(size, dtype=torch.bool) for size in sizes]
    if not masks:  # no such layers (a group without LayerNorms): no per-unit lists either
        return masks
    for k in torch.nonzero(removed_units).flatten().tolist():
        for mask, channels in zip(masks, units[k]):
            mask[list(channels)] = True
    return masks


def _single(model: nn.Module, layer: str) -> GroupBlock:
    block = conv_block(model, layer)
    channels = output_channels(block.conv)
    return GroupBlock(layer, [block], [((c,),) for c in range(channels)], [()] * channels)


def group_key(blocks: Mapping[str, GroupBlock], layer: str) -> str:
    """The name of the group in ``blocks`` that has ``layer`` as a member."""
    for name, block in blocks.items():
        if layer in block.member_names:
            return name
    raise KeyError(layer)


def group_blocks(model: nn.Module, layers: Iterable[str]) -> Dict[str, GroupBlock]:
    """The channel groups of ``layers`` (conv names), keyed by group name, in the order first met.

    A model ``torch.fx`` cannot trace has no known couplings: each layer is its own group
    (what ``compact`` can then do is decided when it runs).

    Raises:
        ValueError: a group couples a conv with a layer that channel methods do not prune (a
            transposed conv, ...; the message names it).
    """
    layers = list(layers)
    try:
        groups = channel_groups(model)
    except UnsupportedGraphError:
        return {layer: _single(model, layer) for layer in layers}
    by_member = {member: group for group in groups for member in group.members}
    blocks: Dict[str, GroupBlock] = {}
    for layer in layers:
        group = by_member.get(layer)
        if group is None:  # a conv the trace did not reach as a producer (called twice, ...)
            blocks.setdefault(layer, _single(model, layer))
            continue
        if group.name in blocks:
            continue
        if len(group.members) == 1 and not group.norms and all(len(u.channels[layer]) == 1 for u in group.units):
            single = _single(model, layer)
            single.fixed = [unit.fixed for unit in group.units]
            blocks[group.name] = single
            continue
        members = []
        for name in group.members:
            module = model.get_submodule(name)
            if not isinstance(module, CHANNEL_LAYER_TYPES):
                raise ValueError(
                    f"'{layer}' is coupled with {type(module).__name__} '{name}' (channel group '{group.name}'); "
                    "channel methods prune groups of convs, nn.Linear layers and attentions only: leave these layers out of "
                    "the plan"
                )
            members.append(conv_block(model, name))
        units = [tuple(unit.channels.get(name, ()) for name in group.members) for unit in group.units]
        norms = [(name, model.get_submodule(name)) for name in group.norms]
        norm_units = [tuple(unit.norms.get(name, ()) for name in group.norms) for unit in group.units]
        blocks[group.name] = GroupBlock(group.name, members, units, [unit.fixed for unit in group.units], norms,
                                        norm_units)
    return blocks


def unit_scores(block: GroupBlock, member_scores: Sequence[Tensor]) -> Tensor:
    """One score per unit from each member's per-channel scores (see the module docstring).

    Example:
        >>> block = GroupBlock("a", [], [((0,), (1,)), ((1,), (0,))], [(), ()])
        >>> unit_scores(block, [torch.tensor([1.0, 3.0]), torch.tensor([10.0, 30.0])]).tolist()
        [2.0, 2.0]
    """
    if len(member_scores) == 1 and all(len(unit[0]) == 1 for unit in block.units):
        values = member_scores[0].float()
        return values[[unit[0][0] for unit in block.units]]
    total = torch.zeros(len(block.units), dtype=torch.float64)
    for index, scores in enumerate(member_scores):
        scores = scores.detach().double().cpu()
        mean = float(scores.mean()) if scores.numel() else 0.0
        if mean <= 0:
            continue  # a member with no response anywhere says nothing about which unit to keep
        normalised = scores / mean
        total += torch.tensor([float(normalised[list(unit[index])].sum()) for unit in block.units], dtype=torch.float64)
    return total.float()
