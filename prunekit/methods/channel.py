"""Structured pruning of conv output channels chosen from activation statistics."""

from __future__ import annotations

import numbers
from typing import Any, Callable, ClassVar, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn.utils import prune

from prunekit._rollback import rollback_on_error
from prunekit.defaults import CRITERIA, check_criterion
from prunekit.dependency.flow import OUTPUT
from prunekit.methods._amount import Amount, check_amount, count_to_prune
from prunekit.methods.base import PruningMethod, Target
from prunekit.layers import CHANNEL_LAYER_TYPES, channel_tensor_names, output_channels
from prunekit.methods.groups import GroupBlock, group_blocks, unit_scores
from prunekit.methods.registry import register_method

__all__ = [
    "CRITERIA",
    "ChannelActivation",
    "alive_channels",
    "channel_activation",
    "ChannelMethod",
    "channel_scores",
    "channel_targets",
    "layer_scores",
    "lowest_channels",
    "mask_channels",
    "masked_channels",
    "norm_targets",
]


Stats = Union[torch.Tensor, Any]  # a 1-D score tensor or a prunekit.ChannelStats


def channel_scores(stats: Stats, criterion: str = "l2") -> torch.Tensor:
    """Return the per-channel score tensor [C] of ``stats`` (a ChannelStats or a 1-D tensor).

    Example:
        >>> channel_scores(torch.tensor([0.5, 0.0, 2.0])).tolist()
        [0.5, 0.0, 2.0]
    """
    check_criterion(criterion)
    if isinstance(stats, torch.Tensor):
        scores = stats
    elif hasattr(stats, "score"):
        scores = stats.score(criterion)
    else:
        raise TypeError(
            f"stats has type {type(stats).__name__}; pass a ChannelStats from "
            "prunekit.collect_channel_stats or a 1-D tensor of per-channel scores"
        )
    if scores.dim() != 1:
        raise ValueError(
            f"channel scores must be 1-D (one per channel), got shape {tuple(scores.shape)}"
        )
    return scores.detach().float()


def layer_scores(
    stats: Optional[Mapping[str, Any]], layers: Iterable[str], criterion: str = "l2"
) -> Dict[str, torch.Tensor]:
    """Per-layer channel scores from ``{layer: ChannelStats or tensor}``, checking every layer has them.

    Example:
        >>> layer_scores({"0": torch.tensor([1.0, 0.0])}, ["0"])["0"].tolist()
        [1.0, 0.0]
    """
    check_criterion(criterion)
    if stats is None:
        raise ValueError(
            "method='channel' needs activation statistics: pass method=get_method('channel').prepare(model, "
            "batches) (or stats=prunekit.collect_channel_stats(model, data))"
        )
    if not isinstance(stats, Mapping):
        raise TypeError(f"stats must map layer names to ChannelStats, got {type(stats).__name__}")
    names = list(layers)
    missing = [name for name in names if name not in stats]
    if missing:
        raise KeyError(
            f"stats missing for layer {missing[0]!r}; collect them with "
            f"prunekit.collect_channel_stats(model, data, layers={missing!r})"
        )
    scores = {name: channel_scores(stats[name], criterion) for name in names}
    for name, values in scores.items():
        bad = ~torch.isfinite(values)
        if bool(bad.any()):
            raise ValueError(
                f"the channel statistics of layer {name!r} hold {int(bad.sum())} NaN/inf values "
                f"(channel {int(bad.nonzero()[0])} first); channels would be chosen by position, not "
                "response: collect them again on finite inputs (prunekit.collect_channel_stats)"
            )
    return scores


def _check_selection(amount: Optional[Amount], threshold: Optional[float]) -> None:
    if (amount is None) == (threshold is None):
        raise ValueError(
            "pass exactly one of amount (how many channels to prune) or threshold "
            f"(prune channels scoring <= threshold); got amount={amount!r}, threshold={threshold!r}"
        )
    if amount is not None:
        check_amount(amount)
    elif isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"threshold={threshold!r} must be a number")


class ChannelActivation(prune.BasePruningMethod):
    """Mask whole channels along ``dim`` whose activation score is lowest.

    The scores come from activation statistics (see
    :func:`prunekit.collect_channel_stats`), not from the weights: a channel
    whose response after the activation is weak (``l2``) or rarely non-zero
    (``l0``) is removed whatever its weight magnitude.

    Args:
        scores: one score per channel (1-D tensor).
        amount: an int prunes that many lowest-scoring channels, a float in [0, 1]
            that fraction of the channels.
        threshold: instead of ``amount``, prune every channel with score <= threshold
            (``threshold=0`` with ``l0`` scores: the channels that never fire).
        dim: the channel dimension (0: output channels of a conv weight).

    Example:
        >>> conv = nn.Conv2d(3, 4, 3)
        >>> ChannelActivation.apply(conv, "weight", scores=torch.tensor([3., 0., 2., 1.]), amount=2)  # doctest: +ELLIPSIS
        <...ChannelActivation object at ...>
        >>> conv.weight_mask.flatten(1).amax(1).tolist()
        [1.0, 0.0, 1.0, 0.0]
    """

    PRUNING_TYPE = "structured"

    def __init__(
        self,
        scores: torch.Tensor,
        amount: Optional[Amount] = None,
        threshold: Optional[float] = None,
        dim: int = 0,
    ) -> None:
        _check_selection(amount, threshold)
        self.scores = channel_scores(scores)
        self.amount = amount
        self.threshold = threshold
        self.dim = dim

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        dim = self.dim if self.dim >= 0 else t.dim() + self.dim
        if not 0 <= dim < t.dim():
            raise IndexError(f"dim={self.dim} is out of range for a tensor of shape {tuple(t.shape)}")
        channels = t.shape[dim]
        if self.scores.numel() != channels:
            raise ValueError(
                f"the statistics have {self.scores.numel()} channels but the tensor has "
                f"{channels} along dim {dim}; collect the statistics on this layer"
            )
        scores = self.scores.to(t.device)
        if self.amount is not None:
            count = count_to_prune(self.amount, channels, what="channels")
            everyone = torch.ones(channels, dtype=torch.bool, device=scores.device)
            pruned = lowest_channels(scores, everyone, count).nonzero().flatten()
        else:
            pruned = torch.nonzero(scores <= self.threshold).flatten()
        mask = default_mask.clone(memory_format=torch.contiguous_format)
        mask.index_fill_(dim, pruned, 0)
        return mask

    @classmethod
    def apply(  # type: ignore[override]
        cls,
        module: nn.Module,
        name: str,
        scores: torch.Tensor,
        amount: Optional[Amount] = None,
        threshold: Optional[float] = None,
        dim: int = 0,
        importance_scores: Optional[torch.Tensor] = None,
    ) -> prune.BasePruningMethod:
        """Mask channels of ``module.<name>`` in place, like ``prune.ln_structured``.

        On an already pruned tensor torch's ``PruningContainer`` hands the method
        only the channels still alive, so the scores are narrowed to them here.
        """
        scores = channel_scores(scores)
        alive = alive_channels(module, name, dim)
        if alive is not None:
            if scores.numel() != alive.numel():
                raise ValueError(
                    f"the statistics have {scores.numel()} channels but {name!r} has "
                    f"{alive.numel()}; collect the statistics on this layer"
                )
            scores = scores[alive.to(scores.device)]
        # torch's container cannot slice a 1-D tensor by channel (it sums over no
        # dims, i.e. over everything); per entry is the same thing for 1-D.
        one_d = getattr(module, name).dim() == 1 and cls is ChannelActivation
        method_cls = _PerEntryChannelActivation if one_d else cls
        return super(ChannelActivation, method_cls).apply(
            module,
            name,
            scores=scores,
            amount=amount,
            threshold=threshold,
            dim=dim,
            importance_scores=importance_scores,
        )


class _PerEntryChannelActivation(ChannelActivation):
    """ChannelActivation on a 1-D tensor (bias, BatchNorm), where each entry is a channel."""

    PRUNING_TYPE = "unstructured"


def lowest_channels(scores: torch.Tensor, remaining: torch.Tensor, count: int) -> torch.Tensor:
    """Bool tensor of the ``count`` remaining channels with the lowest scores (ties: lower index first).

    The one channel selection of prunekit's channel methods: :func:`channel_activation`
    (torch's reparametrization) and a scan's masks both call it.

    Example:
        >>> lowest_channels(torch.tensor([3., 0., 2., 0.]), torch.ones(4, dtype=torch.bool), 2).tolist()
        [False, True, False, True]
    """
    order = torch.argsort(torch.where(remaining, scores.to(remaining.device), torch.inf), stable=True)
    chosen = torch.zeros(scores.numel(), dtype=torch.bool, device=remaining.device)
    chosen[order[:count]] = True
    return chosen


def channel_targets(conv: nn.Conv2d, batchnorm: Optional[nn.BatchNorm2d] = None) -> List[Tuple[nn.Module, str]]:
    """The tensors that carry a conv's output channels: its weight and bias (an attention's ``in_proj_weight`` and
    ``in_proj_bias``; the border bias of a conv ``compact`` built,
    :class:`~prunekit.dependency.border_bias.BorderBiasConv2d`), and the BatchNorm's affine pair."""
    targets: List[Tuple[nn.Module, str]] = [(conv, name) for name in channel_tensor_names(conv)]
    if isinstance(getattr(conv, "border_weight", None), nn.Parameter) or "border_weight_orig" in conv._parameters:
        targets.append((conv, "border_weight"))
    if batchnorm is not None and batchnorm.affine:
        targets += [(batchnorm, "weight"), (batchnorm, "bias")]
    return targets


def norm_targets(norm: nn.Module) -> List[Tuple[nn.Module, str]]:
    """The tensors that carry a LayerNorm's features: its weight and its bias (when it has one)."""
    return [(norm, "weight")] + ([(norm, "bias")] if getattr(norm, "bias", None) is not None else [])


def mask_channels(targets: Sequence[Tuple[nn.Module, str]], removed: torch.Tensor) -> None:
    """Mask the channels ``removed`` (bool [C]) in every one of ``targets``, through torch's reparametrization.

    A channel already masked in any of them is masked in all of them; each tensor gets a
    :class:`ChannelActivation` whose ``scores`` are that final selection (0 = masked). Nothing
    is changed if one of them fails.

    Example:
        >>> linear = nn.Linear(2, 3)
        >>> mask_channels([(linear, "weight"), (linear, "bias")], torch.tensor([False, True, False]))
        >>> linear.bias_mask.tolist()
        [1.0, 0.0, 1.0]
    """
    selection = (~(masked_channels(targets) | removed.cpu())).float()
    with rollback_on_error(list(dict.fromkeys(m for m, _ in targets))):
        for target, name in targets:
            ChannelActivation.apply(target, name, scores=selection, threshold=0.0)


def masked_channels(targets: Sequence[Tuple[nn.Module, str]], everywhere: bool = False) -> torch.Tensor:
    """Bool tensor of the channels masked in ANY of ``targets`` (in ALL of them with ``everywhere``).

    ``targets`` as from :func:`channel_targets`; an unpruned tensor masks no channel.
    """
    channels = getattr(targets[0][0], targets[0][1]).shape[0]
    masked = []
    for module, name in targets:
        alive = alive_channels(module, name)
        masked.append(torch.zeros(channels, dtype=torch.bool) if alive is None else ~alive.cpu())
    stacked = torch.stack(masked)
    return stacked.all(dim=0) if everywhere else stacked.any(dim=0)


def alive_channels(module: nn.Module, name: str, dim: int = 0) -> Optional[torch.Tensor]:
    """Bool tensor of the channels of ``module.<name>`` not yet masked; ``None`` if it is not pruned.

    A channel counts as masked when its whole slice of the mask is zero, the
    rule torch's ``PruningContainer`` uses for structured methods.
    """
    if not any(
        isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == name
        for hook in module._forward_pre_hooks.values()
    ):
        return None
    mask = getattr(module, name + "_mask")
    d = dim if dim >= 0 else mask.dim() + dim
    other = [i for i in range(mask.dim()) if i != d]
    return (mask.sum(dim=other) != 0) if other else mask != 0


def channel_activation(
    module: nn.Module,
    stats: Stats,
    amount: Optional[Amount] = None,
    threshold: Optional[float] = None,
    criterion: str = "l2",
    batchnorm: Optional[nn.BatchNorm2d] = None,
) -> nn.Module:
    """Mask the output channels of conv (or ``nn.Linear``) ``module`` with the lowest activation scores; return it.

    The conv's ``weight`` and ``bias`` are masked for the same channels (a zeroed
    weight with a live bias is not a dead channel), and so are the ``weight`` and
    ``bias`` of ``batchnorm`` when given, so a masked channel outputs exactly 0.
    Channels already masked in any of these tensors (by an earlier call, or by
    another method such as ``prune.ln_structured``) are masked in all of them and
    do not count towards ``amount``, which, as in torch, is taken among the
    channels still alive. Each tensor gets a :class:`ChannelActivation` whose
    ``scores`` are that final selection (0 = masked). Nothing is changed if any
    check fails.

    Args:
        module: an ``nn.Conv2d`` or an ``nn.Linear`` (its output features).
        stats: a :class:`prunekit.ChannelStats` for this conv, or a 1-D score tensor.
        amount: count (int) or fraction (float) of channels to mask.
        threshold: instead of ``amount``, mask channels scoring <= threshold.
        criterion: ``"l2"`` (mean response norm) or ``"l0"`` (firing frequency).
        batchnorm: the ``nn.BatchNorm2d`` that follows the conv, if any.

    Example:
        >>> conv = channel_activation(nn.Conv2d(3, 4, 3), torch.tensor([3., 0., 2., 1.]), threshold=0)
        >>> conv.bias_mask.tolist()
        [1.0, 0.0, 1.0, 1.0]
    """
    if not isinstance(module, CHANNEL_LAYER_TYPES):
        raise TypeError(
            f"channel_activation prunes the output channels of an nn.Conv2d, nn.Linear or nn.MultiheadAttention; got "
            f"{type(module).__name__}. Pass the conv layer (see prunekit.conv_layers(model))"
        )
    if batchnorm is not None and not isinstance(batchnorm, nn.BatchNorm2d):
        raise TypeError(f"batchnorm must be an nn.BatchNorm2d, got {type(batchnorm).__name__}")
    _check_selection(amount, threshold)
    scores = channel_scores(stats, criterion)
    channels = output_channels(module)
    if scores.numel() != channels:
        raise ValueError(
            f"the statistics have {scores.numel()} channels but the layer has {channels} output "
            "channels; collect the statistics on this layer of this model"
        )
    if batchnorm is not None and batchnorm.num_features != channels:
        raise ValueError(
            f"batchnorm has {batchnorm.num_features} features but the conv has {channels} "
            "output channels; pass the BatchNorm2d that follows this conv"
        )
    targets = channel_targets(module, batchnorm)
    dead = masked_channels(targets)
    remaining = ~dead
    if amount is not None:
        chosen = lowest_channels(scores, remaining, count_to_prune(amount, int(remaining.sum()), what="channels"))
    else:
        chosen = remaining & (scores <= threshold)
    # The channels are chosen once, over the channels alive in every tensor, and
    # each tensor is then masked for exactly those (plus any channel already dead
    # in one of them): torch would otherwise pick per tensor, among that tensor's
    # own live channels, and the weight, bias and BatchNorm could disagree.
    mask_channels(targets, chosen)
    return module


@register_method
class ChannelMethod(PruningMethod):
    """``"channel"``: whole output channels of the weakest response (--criterion l2) or rarest firing (l0) on the data.

    What it prunes is a channel group (:class:`~prunekit.methods.groups.GroupBlock`): a conv
    alone, or the convs whose channels are coupled (a residual stream, a depthwise conv and
    the conv feeding it), masked at the same units so that :func:`prunekit.compact` can
    remove them. A sparsity is the fraction of the group's units masked, in every member's
    weight and bias and in the BatchNorm that follows it. The scores are ``stats[layer]``
    under a criterion (``l2``: response magnitude, ``l0``: firing frequency), measured on
    images with :func:`prunekit.collect_channel_stats` for every member, and combined per
    unit (:func:`~prunekit.methods.groups.unit_scores`).
    """

    name = "channel"
    unit = "channels"
    layer_types = CHANNEL_LAYER_TYPES
    # A Linear is scanned when named (ConvNeXt's MLPs), never a classifier unasked; an attention's heads always are.
    default_layer_types = (nn.Conv2d, nn.MultiheadAttention)
    needs_statistics = True
    needs_data = True
    data_kind = "channel statistics"
    default_options: ClassVar[Dict[str, Any]] = {"criterion": "l2"}

    def check_options(self, options: Mapping[str, Any]) -> None:
        if "criterion" in options:  # a subclass scoring by something else takes none
            check_criterion(options["criterion"])

    def prepare(
        self, model: nn.Module, batches: Iterable[Any], layers: Optional[Iterable[str]] = None, progress: bool = False
    ) -> "ChannelMethod":
        """A copy holding the activation statistics measured on ``batches``: of every conv of the groups of ``layers``
        (default: of every conv)."""
        if not self.needs_data:
            return self
        from prunekit.stats import collect_channel_stats

        stats = collect_channel_stats(model, batches, layers=self.data_layers(model, layers), progress=progress)
        return self.with_data(stats)

    def describe_data(self, source: str) -> Optional[str]:
        if not self.needs_data:
            return None
        return f"{self.data_kind} ({self._options['criterion']}) measured on {source}"

    def block(self, model: nn.Module, layer: str) -> GroupBlock:
        return next(iter(group_blocks(model, [layer]).values()))

    def blocks(self, model: nn.Module, layers: Iterable[str]) -> Dict[str, GroupBlock]:
        return group_blocks(model, layers)

    def block_layers(self, block: GroupBlock) -> List[str]:
        return block.member_names

    def targets(self, block: GroupBlock) -> List[Target]:
        members = [target for member in block.members for target in channel_targets(member.conv, member.batchnorm)]
        return members + [target for _, norm in block.norms for target in norm_targets(norm)]

    def current_sparsity(self, block: GroupBlock) -> float:
        return float(block.dead_units().float().mean())

    def member_scores(self, model: nn.Module, blocks: Mapping[str, GroupBlock]) -> Dict[str, torch.Tensor]:
        """Each member conv's per-channel scores (here: from the statistics :meth:`prepare` measured)."""
        return layer_scores(self.data, self.statistics_layers(blocks), self._options["criterion"])

    def scores(self, model: nn.Module, blocks: Mapping[str, Any]) -> Optional[Dict[str, torch.Tensor]]:
        per_layer = self.member_scores(model, blocks)
        for block in blocks.values():
            for member in block.members:
                values = per_layer[member.conv_name]
                if values.numel() != output_channels(member.conv):
                    raise ValueError(
                        f"stats for {member.conv_name!r} have {values.numel()} channels but the layer has "
                        f"{output_channels(member.conv)}; collect them on this model"
                    )
        return {
            key: unit_scores(block, [per_layer[name] for name in block.member_names]) for key, block in blocks.items()
        }

    def max_sparsity(self, block: GroupBlock) -> float:
        return float(self._selectable(block).float().mean())

    @staticmethod
    def _selectable(block: GroupBlock) -> torch.Tensor:
        """Units a plan may mask: the removable ones; of a single conv, also those fixed only for reaching the
        model's output (``compact`` keeps them, pinned). A unit that meets an op prunekit does not follow is
        never masked: ``compact`` would refuse it afterwards."""
        if len(block.members) == 1 and all(len(unit[0]) == 1 for unit in block.units):
            return torch.tensor([all(reason == OUTPUT for reason in fixed) for fixed in block.fixed], dtype=torch.bool)
        return block.removable

    @staticmethod
    def _masked_units(block: GroupBlock, everywhere: bool = False) -> torch.Tensor:
        """Bool [units]: masked in any tensor of any member (in every tensor of every member and norm, ``everywhere``)."""
        per_member = [
            masked_channels(channel_targets(m.conv, m.batchnorm), everywhere=everywhere) for m in block.members
        ]
        units = list(block.units)
        if everywhere and block.norms:  # a norm left unmasked at a unit keeps it alive (compact would refuse it)
            per_member += [masked_channels(norm_targets(norm), everywhere=True) for _, norm in block.norms]
            units = [unit + norms for unit, norms in zip(units, block.norm_units)]
        combine = all if everywhere else any
        return torch.tensor([
            combine(bool(masked[list(channels)].all() if everywhere else masked[list(channels)].any())
                    for masked, channels in zip(per_member, unit) if channels)
            for unit in units
        ], dtype=torch.bool)

    def apply(self, block: GroupBlock, layer: str, sparsity: float, scores: Optional[torch.Tensor]) -> None:
        assert scores is not None, "scores come from ChannelMethod.scores"
        units = len(block.units)
        target = round(sparsity * units)
        masked = self._masked_units(block)
        done = int(masked.sum())
        what = "channels" if len(block.members) == 1 else f"units of channel group {block.name!r}"
        if done > target:
            raise ValueError(
                f"layer {layer!r} already has {done} of {units} {what} masked, above the planned "
                f"{sparsity:.4f}; a plan sets final sparsities and cannot regrow channels: "
                "apply it to the unpruned model"
            )
        # A channel masked in the weight alone (say by fine-grained pruning) still
        # emits its bias: the channel method then masks it in every tensor.
        consistent = torch.equal(masked, self._masked_units(block, everywhere=True))
        if target == done and consistent:
            return
        remaining = ~masked & self._selectable(block)
        if target - done > int(remaining.sum()):
            reasons = sorted({r for fixed in block.fixed for r in fixed})
            if int(remaining.sum()) + done == 0:
                raise ValueError(
                    f"{layer!r} cannot be channel-pruned: none of its {units} {what} can be removed "
                    f"({'; '.join(reasons[:2])}); leave it out of the plan (compact would refuse it)"
                )
            raise ValueError(
                f"{layer!r} at {sparsity:.4f} needs {target} of the {units} {what} masked, but only "
                f"{int(remaining.sum()) + done} can be ({'; '.join(reasons[:2])}); plan a lower level"
            )
        removed = masked | lowest_channels(scores, remaining, target - done)
        members = [m for member in block.members for m in (member.conv, member.batchnorm) if m is not None]
        with rollback_on_error(members + [norm for _, norm in block.norms]):
            for member, gone in zip(block.members, block.channel_masks(removed)):
                channel_activation(member.conv, (~gone).float(), threshold=0.0, batchnorm=member.batchnorm)
            for (_, norm), gone in zip(block.norms, block.norm_masks(removed)):
                mask_channels(norm_targets(norm), gone)

    def mask_maker(self, block: GroupBlock, scores: Optional[torch.Tensor]) -> Callable[[float], List[torch.Tensor]]:
        assert scores is not None, "scores come from the method's scores()"
        units = len(block.units)
        remaining = self._selectable(block)
        values = channel_scores(scores)

        def masks(sparsity: float) -> List[torch.Tensor]:
            count = round(sparsity * units)
            if count > int(remaining.sum()):
                raise ValueError(
                    f"channel group {block.name!r} at {sparsity:.4f} needs {count} of its {units} units, but only "
                    f"{int(remaining.sum())} can be removed; scan lower levels"
                )
            removed = lowest_channels(values, remaining, count)
            layers = [channel_targets(member.conv, member.batchnorm) for member in block.members]
            layers += [norm_targets(norm) for _, norm in block.norms]
            out = []
            for targets, gone in zip(layers, block.channel_masks(removed) + block.norm_masks(removed)):
                keep = ~gone
                for module, name in targets:
                    tensor = module._parameters[name]
                    shape = (keep.numel(),) + (1,) * (tensor.dim() - 1)
                    out.append(keep.to(device=tensor.device, dtype=tensor.dtype).reshape(shape).expand_as(tensor).contiguous())
            return out

        return masks
