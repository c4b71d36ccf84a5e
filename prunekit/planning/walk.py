"""The budget fit's walk along the scan's curves: raise the layer whose next level buys the most budget per predicted drop.

From dense, each step raises the layer (or channel group) whose next level (a step may jump
levels, so a curve that is flat and then falls is not cut short) removes the most of the
budget's excess per unit of predicted score drop (the single-layer drops the scan measured,
each curve made non-decreasing), the costs counted by a :class:`~prunekit.planning.costs.Tally`.
The last step is then narrowed to the fewest whole units (or weights) that meet the budget.

Example:
    >>> curve = Curve([0.4, 0.6], [0.01, 0.005])
    >>> curve.drops, curve.at(0.5)
    ([0.0, 0.01, 0.01], 0.01)
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

from prunekit.planning.costs import Cost, PlanCosts, Tally
from prunekit.sensitivity.result import SensitivityResult
from prunekit.sensitivity.tolerance import score_drop

__all__ = ["Curve", "curves_of", "scaled", "walk"]

#: How far a cost is over the budget (0: met), from the cost alone.
Excess = Callable[[Cost], float]


class Curve:
    """One layer's scanned levels and predicted drops, from (0, 0), made non-decreasing."""

    def __init__(self, levels: Sequence[float], drops: Sequence[float]) -> None:
        self.levels, self.drops = [0.0], [0.0]
        for level, drop in zip(levels, drops):
            if math.isfinite(drop):
                self.levels.append(float(level))
                self.drops.append(max(self.drops[-1], drop))

    def at(self, level: float) -> float:
        """The predicted drop at ``level``: linear between scanned levels."""
        for k in range(1, len(self.levels)):
            if level <= self.levels[k] + 1e-12:
                low, high = self.levels[k - 1], self.levels[k]
                share = 0.0 if high == low else (level - low) / (high - low)
                return self.drops[k - 1] + share * (self.drops[k] - self.drops[k - 1])
        return self.drops[-1]


def curves_of(result: SensitivityResult, relative: bool, ceilings: Mapping[str, float]) -> Dict[str, Curve]:
    """Each scanned layer's :class:`Curve`, up to its ``ceilings`` level (the most its method may remove)."""
    curves = {}
    for layer in result.layers:
        pairs = [(level, score_drop(score, result.baseline, result.higher_is_better, relative))
                 for level, score in zip(result.sparsities, result.scores[layer])
                 if level <= ceilings[layer] + 1e-12 and score is not None]
        curves[layer] = Curve([p[0] for p in pairs], [p[1] for p in pairs])
    return curves


def walk(excess_of: Excess, costs: PlanCosts, curves: Mapping[str, Curve],
         units: Mapping[str, int]) -> Tuple[Dict[str, float], Tally]:
    """The plan the walk reaches (only its pruned layers) and its tally; the excess is > 0 when nothing more could be raised."""
    plan = {layer: 0.0 for layer in curves}
    tally = costs.tally(plan)
    excess = excess_of(tally.cost)
    scale = max([curve.drops[-1] for curve in curves.values()] + [0.0])
    floor = 1e-6 * scale if scale > 0 else 1e-12  # a step the scan saw cost nothing is not quite free
    last: Optional[Tuple[str, float]] = None
    while excess > 0:
        best: Optional[Tuple[float, float, str, float]] = None
        for layer, curve in curves.items():
            here = curve.at(plan[layer])
            for level in curve.levels:
                if level <= plan[layer] + 1e-12:
                    continue
                gained = excess - excess_of(tally.trial(layer, level))
                if gained <= 0:
                    continue
                ratio = (max(0.0, curve.at(level) - here) + floor) / gained
                if best is None or (ratio, -gained) < (best[0], -best[1]):
                    best = (ratio, gained, layer, level)
        if best is None:
            break  # nothing left to raise
        _, _, layer, level = best
        last = (layer, plan[layer])
        plan[layer] = level
        tally.set(layer, level)
        excess = excess_of(tally.cost)
    if excess <= 0 and last is not None:
        layer, start = last
        narrowed = _narrowed(excess_of, tally, layer, start, units[layer])
        tally.set(layer, narrowed)
        plan[layer] = narrowed
    return {layer: level for layer, level in plan.items() if level > 0}, tally


def _narrowed(excess_of: Excess, tally: Tally, layer: str, start: float, units: int) -> float:
    """The lowest level of ``layer`` above ``start`` (whole units) at which the tally's plan still meets the budget."""
    low = round(start * units)  # does not meet it (the walk took a step from here)
    high = round(tally.plan[layer] * units)  # meets it
    while high - low > 1:
        middle = (low + high) // 2
        if excess_of(tally.trial(layer, middle / units)) > 0:
            low = middle
        else:
            high = middle
    return high / units


def scaled(shape: Mapping[str, float], excess_of: Excess, costs: PlanCosts, ceilings: Mapping[str, float],
           units: Mapping[str, int]) -> Optional[Dict[str, float]]:
    """The plan ``{layer: min(ceiling, scale * shape[layer])}`` (whole units) at the least scale that meets the budget.

    ``shape`` gives each layer's level relative to the others (all 1: one level for every layer).
    None when even every layer at its ceiling does not meet the budget.

    Example:
        >>> from torch import nn
        >>> from prunekit.methods.registry import get_method
        >>> from prunekit.planning.costs import plan_costs
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> costs = plan_costs(model, get_method("filter-norm"), ["0", "2"], (3, 16, 16))
        >>> half = lambda cost: max(0.0, cost.macs / costs.dense.macs - 0.5)
        >>> scaled({"0": 1.0, "2": 1.0}, half, costs, {"0": 0.9, "2": 0.9}, {"0": 8, "2": 8})
        {'0': 0.375, '2': 0.375}
    """

    def plan_at(scale: float) -> Dict[str, float]:
        return {layer: min(ceilings[layer], round(min(1.0, scale * weight) * units[layer]) / units[layer])
                for layer, weight in shape.items() if weight > 0}

    top = max((ceilings[layer] / weight for layer, weight in shape.items() if weight > 0), default=0.0)
    if top <= 0 or excess_of(costs.of(plan_at(top))) > 0:
        return None
    low, high = 0.0, top
    for _ in range(40):
        middle = (low + high) / 2
        if excess_of(costs.of(plan_at(middle))) > 0:
            low = middle
        else:
            high = middle
    return {layer: level for layer, level in plan_at(high).items() if level > 0}
