"""Round a channel plan's kept widths up to what this machine runs as fast, measured rather than fixed.

A conv's time is a staircase in its channels, not a line: the kernels work on blocks of
channels (8, 16 ... wide on this CPU's vector units, more on a GPU's tensor cores), so 57
output channels cost about what 64 do, and 65 cost a step more. The latency model
(:mod:`prunekit.planning.latency`) times a coarse grid and interpolates between its
points, so it cannot see the steps; a plan fitted on it may keep 57 channels where 64
would run as fast and keep more of the model. Torch-Pruning's ``round_to`` rounds every
layer to one fixed multiple, whatever it costs. Here each channel group of a plan is tried
at its fitted width and at the next multiples of :data:`MULTIPLES` above it (never past its
dense width); the layers the group's channels pass through (the convs that emit them and
the convs and Linears that read them) are timed at each width on this machine
(:func:`~prunekit.planning.latency.time_widths`, interleaved; with a timed cost model, plus the
latency model's share of the BatchNorms, activations and adds on the wider outputs), and the
group keeps the widest width whose time is within :data:`SLACK` of the fitted one's. Rounding only keeps
channels the fit removed. The budget fit (:func:`~prunekit.planning.budget.fit_budget`) rounds
its final plan, once its target is met: the rounded plan's compacted copy is timed beside the
dense model and the plan scored, and it is kept only when it still meets the target and scores
at least as well as the plan as fitted (rounding inside the target's corrections was measured
worse: each correction took back elsewhere, by sensitivity, the channels rounding added). MACs and parameter budgets are not rounded (a wider plan would break them).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from prunekit.methods.registry import get_method
    >>> from prunekit.planning.costs import plan_costs
    >>> model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 8, 3))
    >>> costs = plan_costs(model, get_method("filter-norm"), ["0"], (3, 24, 24))
    >>> rounded = round_widths(model, {"0": 39 / 64}, costs, (3, 24, 24), repeats=3)
    >>> rounded.widths["0"][0], rounded.widths["0"][1] in (25, 28, 32)  # fitted, then itself or a multiple above
    (25, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Sequence, Tuple

from torch import nn

from prunekit.planning.costs import ChannelCosts
from prunekit.planning.latency import time_widths

__all__ = ["MULTIPLES", "SLACK", "RoundedPlan", "round_widths"]

#: The multiples a group's kept width is tried at (the next one of each above the fitted width).
MULTIPLES = (4, 8, 16, 32)
#: A wider width is taken when its measured time is at most this fraction above the fitted width's.
SLACK = 0.03


@dataclass
class RoundedPlan:
    """A plan with its groups' widths rounded up where that costs no time (see the module docstring).

    Attributes:
        plan: the rounded plan (each level a whole number of units, as fitted ones are).
        widths: per group that was tried, ``(fitted kept units, rounded kept units)``.
        seconds: per group that was tried, ``(fitted time, rounded time)`` of the layers its channels pass through.
    """

    plan: Dict[str, float]
    widths: Dict[str, Tuple[int, int]] = field(default_factory=dict)
    seconds: Dict[str, Tuple[float, float]] = field(default_factory=dict)

    @property
    def changed(self) -> Dict[str, Tuple[int, int]]:
        """The groups whose width was rounded up."""
        return {group: pair for group, pair in self.widths.items() if pair[1] != pair[0]}

    @property
    def added(self) -> int:
        """How many units (channels) rounding keeps that the plan as fitted removed."""
        return sum(after - before for before, after in self.widths.values())

    def summary(self) -> str:
        """One line: how many groups were rounded up and how many channels that kept."""
        changed = self.changed
        if not changed:
            return f"widths: none of {len(self.widths)} groups runs as fast wider; kept as fitted"
        return (f"widths: {len(changed)} of {len(self.widths)} groups rounded up to widths this machine runs as fast "
                f"(+{self.added} channels kept)")


def _candidates(kept: int, units: int, multiples: Sequence[int]) -> List[int]:
    """The next multiple of each of ``multiples`` above ``kept`` (at most ``units``), ascending."""
    return sorted({min(units, math.ceil(kept / m) * m) for m in multiples} - {kept})


def round_widths(
    model: nn.Module,
    plan: Mapping[str, float],
    costs: ChannelCosts,
    input_size: Sequence[int],
    *,
    batch: int = 1,
    repeats: int = 9,
    slack: float = SLACK,
    multiples: Sequence[int] = MULTIPLES,
) -> RoundedPlan:
    """Round each pruned group of ``plan`` up to the widest width that runs as fast here (module docstring).

    Args:
        model: the dense model the plan prunes, on the device it will run on (not changed).
        plan: a channel plan, ``{group: level}``.
        costs: the plan's cost model (:func:`~prunekit.planning.costs.plan_costs` of a channel method over
            the plan's groups): which layers a group's channels pass through, and their widths.
        input_size: one input's shape without the batch; ``batch``: the batch each layer is timed at.
        repeats: timed rounds per width (their median).
        slack: how much slower (a fraction) a wider width may measure and still be taken.
        multiples: the multiples tried above each fitted width.
    """
    if not isinstance(costs, ChannelCosts):
        raise TypeError("round_widths rounds channel plans: pass the ChannelCosts of a channel method's plan")
    if not (0 <= slack < 1):
        raise ValueError(f"slack={slack!r} is not a fraction in [0, 1); pass e.g. 0.03 for 3 %")
    if not multiples or any(int(m) != m or m < 2 for m in multiples):
        raise ValueError(f"multiples={tuple(multiples)!r} are not ints >= 2; pass e.g. (8, 16)")
    latency = costs.latency

    def rest(name: str, kept_out: int) -> float:
        """The time of what runs on a layer's outputs besides the convs (BatchNorms, activations, adds): the
        latency model's share per output element, when the costs were timed (``timed_costs``); else 0."""
        if latency is None:
            return 0.0
        return latency.rest_per_element * kept_out * latency.elements_per_channel.get(name, 0.0)

    rounded = RoundedPlan(dict(plan))
    for group in sorted(plan, key=lambda name: -plan[name]):
        level = plan[group]
        if group not in costs.blocks or level <= 0:
            continue
        units = len(costs.blocks[group].units)
        kept = units - round(level * units)
        options = [kept] + _candidates(kept, units, multiples)
        if len(options) == 1:
            continue
        trials = {width: dict(rounded.plan, **{group: (units - width) / units}) for width in options}
        per_width = {width: costs.layer_widths(trial) for width, trial in trials.items()}
        layers = sorted({name for width in options for name in per_width[width]
                         if per_width[width][name] != per_width[kept][name]})
        if not layers:
            continue  # nothing the group emits is removed (its channels are kept by compact)
        try:
            times = time_widths(model, input_size, {name: [per_width[w][name] for w in options] for name in layers},
                                batch=batch, repeats=repeats)
        except ValueError:
            continue  # a width no layer of this kind can take (a grouped conv's groups): kept as fitted
        total = {width: sum(times[name][per_width[width][name]] + rest(name, per_width[width][name][1])
                            for name in layers) for width in options}
        best = max(width for width in options if total[width] <= total[kept] * (1 + slack))
        rounded.widths[group] = (kept, best)
        rounded.seconds[group] = (total[kept], total[best])
        rounded.plan[group] = trials[best][group]
    return rounded
