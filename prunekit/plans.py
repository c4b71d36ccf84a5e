"""Per-layer sparsity plans: checking them and applying them (final sparsities) with a method from the registry.

``finalize``, ``copy_model`` and ``pruned_tensors`` live in :mod:`prunekit.reparametrization` and are
re-exported here.
"""

from __future__ import annotations

import numbers
from typing import Any, Dict, Mapping, Optional, Tuple

from torch import nn

from prunekit._rollback import rollback_on_error
from prunekit.layers import check_prunable, resolve_layers
from prunekit.methods.registry import METHODS, prepared_method
from prunekit.reparametrization import copy_model, finalize, pruned_tensors

__all__ = [
    "METHODS", "apply_plan", "check_plan", "copy_model", "finalize", "plan_blocks", "pruned_tensors", "uniform_plan",
]


def check_plan(
    model: nn.Module, plan: Mapping[str, float], types: Tuple[type, ...] = (nn.Conv2d,)
) -> Dict[str, float]:
    """Validate ``plan`` against ``model``: layer names (of ``types``), sparsities in [0, 1]; return it as floats."""
    if not isinstance(plan, Mapping):
        raise TypeError(
            f"plan must map conv layer names to sparsities, got {type(plan).__name__}"
        )
    layers = resolve_layers(model, list(plan), types) if plan else {}
    checked = {}
    for name in layers:
        value = plan[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"plan[{name!r}]={value!r} is not a number; use a sparsity in [0, 1]")
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"plan[{name!r}]={value} is outside [0, 1]; use a final sparsity in [0, 1]")
        checked[name] = float(value)
    return checked


def plan_blocks(model: nn.Module, plan: Mapping[str, float], pruning: Any) -> Tuple[Dict[str, Any], Dict[str, float]]:
    """What a checked ``plan`` prunes with ``pruning``: its blocks and each block's level, keyed alike.

    A channel method prunes channel groups: a level given to any member applies to the
    whole group (the key is the group's name, its first member's).

    Raises:
        ValueError: two members of one group are given different levels (the message names both);
            a member cannot be pruned alone (tied or parametrized weights).
    """
    blocks = pruning.blocks(model, plan)
    owner = {layer: key for key, block in blocks.items() for layer in pruning.block_layers(block)}
    levels: Dict[str, float] = {}
    named: Dict[str, str] = {}
    for layer, level in plan.items():
        key = owner[layer]
        if key in levels and levels[key] != level:
            raise ValueError(
                f"plan gives {named[key]!r} {levels[key]:g} and {layer!r} {level:g}, but their channels are coupled "
                f"(channel group {key!r}: {', '.join(pruning.block_layers(blocks[key]))}) and are pruned at one "
                "level; give them the same level (prunekit report MODEL --groups lists the groups)"
            )
        levels[key], named[key] = level, layer
    check_prunable(model, list(owner))
    return blocks, levels


def apply_plan(
    model: nn.Module,
    plan: Mapping[str, float],
    method: Any = "fine-grained",
    stats: Optional[Mapping[str, object]] = None,
    criterion: Optional[str] = None,
) -> nn.Module:
    """Prune each layer named in ``plan`` to its FINAL sparsity; return ``model``.

    Values are final sparsities, not fractions of what remains: applying a plan
    twice, or a new plan over an older one, gives exactly the planned sparsity
    (only the missing zeros are added, through torch's ``PruningContainer``).
    A value of 0 leaves a dense layer untouched. If anything fails, the model is
    left as it was.

    Args:
        model: the model to prune in place.
        plan: layer name -> final sparsity in [0, 1]: a conv (see :func:`prunekit.conv_layers`), or an
            ``nn.Linear`` for the methods whose ``layer_types`` include it (fine-grained, 2:4, the
            channel methods: its output features, coupled as a conv's channels are).
        method: a name from :func:`prunekit.methods.registry.method_names`, or a method object (one
            :meth:`~prunekit.methods.base.PruningMethod.prepare` gave owns what it scores by):
            ``"fine-grained"`` (:class:`FineGrainedL1` on the weight), ``"channel"``
            (:class:`ChannelActivation` by activation statistics; the value is the fraction of
            output channels masked, and the BatchNorm that follows the conv is masked too) or
            ``"filter-norm"`` (channels with the smallest filter L1 norms; no statistics needed).
            The channel methods prune channel groups: a level given to a conv applies to every
            conv coupled with it (:func:`prunekit.channel_groups`), masked at the same channels.
        stats: for ``"channel"`` given by name, layer name -> :class:`ChannelStats` (or score tensor),
            for every conv of the planned groups (or pass the prepared method instead).
        criterion: for ``"channel"``, ``"l2"`` or ``"l0"`` (default: the method's own, ``"l2"``).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
        >>> model = apply_plan(model, {"0": 0.5, "2": 0.75})
        >>> float((model[2].weight == 0).float().mean())
        0.75
    """
    pruning = prepared_method(method, stats, criterion)
    checked = check_plan(model, plan, pruning.layer_types)
    check_prunable(model, checked)
    blocks, levels = plan_blocks(model, checked, pruning)
    scores = pruning.scores(model, blocks) or {}
    touched = [module for block in blocks.values() for module, _ in pruning.targets(block)]
    with rollback_on_error(list(dict.fromkeys(touched))):
        for key, sparsity in levels.items():
            pruning.apply(blocks[key], key, sparsity, scores.get(key))
    return model


def uniform_plan(model: nn.Module, level: float, method: Any = "fine-grained") -> Dict[str, float]:
    """A plan that prunes everything ``method`` can prune to ``level``: for fine-grained pruning every layer it
    prunes, for a channel method every channel group with at least two removable units (its convs and ``nn.Linear``
    layers, a ConvNeXt's and a transformer's MLPs included; never a classifier's outputs), keyed by the group's
    first member.

    Raises:
        ValueError: ``level`` is outside [0, 1].

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
        >>> uniform_plan(model, 0.5, "filter-norm")
        {'0': 0.5}
        >>> uniform_plan(model, 0.5)
        {'0': 0.5, '3': 0.5}
    """
    if isinstance(level, bool) or not isinstance(level, numbers.Real) or not 0.0 <= float(level) <= 1.0:
        raise ValueError(f"level={level!r} is not a sparsity: use a number in [0, 1]")
    pruning = prepared_method(method, None, None)
    layers = resolve_layers(model, None, pruning.layer_types)
    if pruning.unit != "channels":
        return {name: float(level) for name in layers}
    from prunekit.dependency import UnsupportedGraphError, channel_groups

    try:
        groups = channel_groups(model)
    except UnsupportedGraphError:  # no known couplings: each conv alone (compact decides what it can remove)
        return {name: float(level) for name in resolve_layers(model)}
    return {group.members[0]: float(level) for group in groups
            if len(group.removable_units) >= 2 and all(name in layers for name in group.members)}
