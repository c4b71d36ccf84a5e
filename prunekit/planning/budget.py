"""Fit a plan to a budget: "half the MACs", "a third of the weights", spent where the scan says it hurts least.

A :class:`Budget` names what the pruned model may cost, as fractions of the dense model's
MACs per sample and parameters. :func:`fit_budget` walks the scan's curves: from dense, it
repeatedly raises the layer (or channel group) whose next level buys the most of the budget
per unit of predicted score drop (the single-layer drops the scan measured, each curve made
non-decreasing; a step may jump levels, so a curve that is flat and then falls is not
cut short), counting every step's cost on the model ``compact`` will build
(:mod:`prunekit.planning.costs`: removing a group's channels also shrinks the layers that
read them; a unit ``compact`` keeps costs what it did). The last step is then narrowed to
the fewest units (or weights) that meet the budget, so the plan lands on the budget rather
than a scanned level past it. The plan found is scored once with every layer pruned
together, and, for a channel plan, compacted on a copy to count what the small model really
costs. With ``max_drop`` as well, a plan beyond the tolerance is refused, saying by how much.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from prunekit.sensitivity import OutputDistortion, scan
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> metric = OutputDistortion(torch.randn(2, 3, 16, 16))
    >>> result = scan(model, metric, method="filter-norm", progress=False)
    >>> fit = fit_budget(model, metric, result, Budget(macs=0.6), method="filter-norm")
    >>> fit.measured.macs <= 0.6 * fit.dense.macs
    True
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from prunekit.methods.base import PruningMethod
from prunekit.methods.registry import prepared_method
from prunekit.planning.costs import Cost, PlanCosts, measured_costs, nonzero_costs, plan_costs, scanned_weights
from prunekit.planning.fitted import PlanFit
from prunekit.sensitivity.result import SensitivityResult
from prunekit.sensitivity.scoring import evaluate_plan
from prunekit.sensitivity.tolerance import check_tolerance, score_drop, within_tolerance

__all__ = ["Budget", "BudgetError", "BudgetFit", "fit_budget", "smallest_cost"]

_KINDS = {"macs": "MACs", "params": "parameters"}


class BudgetError(ValueError):
    """A budget that cannot be met (by any plan the scan offers, or within the tolerance)."""


@dataclass(frozen=True)
class Budget:
    """What the pruned model may cost, as fractions of the dense model's (each in (0, 1]; None: no limit).

    Attributes:
        macs: multiply-accumulates per sample (``0.5``: half the dense MACs).
        params: parameters.

    Example:
        >>> Budget(macs=0.5)
        Budget(macs=0.5, params=None)
        >>> Budget(macs=0)
        Traceback (most recent call last):
        ...
        ValueError: macs=0 is not a fraction of the dense model's MACs in (0, 1]; pass e.g. 0.5 to keep half of them
    """

    macs: Optional[float] = None
    params: Optional[float] = None

    def __post_init__(self) -> None:
        for kind, value in self.targets().items():
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
                    or not 0 < value <= 1:
                raise ValueError(f"{kind}={value!r} is not a fraction of the dense model's {_KINDS[kind]} in (0, 1]; "
                                 f"pass e.g. 0.5 to keep half of them")
        if not self.targets():
            raise ValueError("a Budget needs macs or params (fractions of the dense model's), e.g. Budget(macs=0.5)")

    def targets(self) -> Dict[str, float]:
        """``{"macs": fraction, "params": fraction}`` for the limits given."""
        return {kind: getattr(self, kind) for kind in _KINDS if getattr(self, kind) is not None}

    def excess(self, cost: Cost, dense: Cost) -> float:
        """How far ``cost`` is over the budget, summed over the limits as fractions of the dense costs (0: met)."""
        return sum(max(0.0, getattr(cost, kind) / max(getattr(dense, kind), 1) - target)
                   for kind, target in self.targets().items())

    def __str__(self) -> str:
        return ", ".join(f"{_KINDS[kind]} <= {target:g} of dense" for kind, target in self.targets().items())


@dataclass(frozen=True)
class BudgetFit(PlanFit):
    """A plan fitted to a budget (see :class:`~prunekit.planning.fitted.PlanFit` for the plan and its score).

    Attributes:
        budget: what was asked for.
        dense: the dense model's cost; ``cost``: the plan's, counted without building it.
        measured: the cost counted on the model built (a channel plan: compacted on a copy; a
            fine-grained one: its non-zero weights); None when it could not be built.
        predicted_drop: the scan's single-layer drops of the plan's levels, added up.
        drop: the measured drop of ``score`` with every layer pruned together.
        dense_hardware: whether the costs hold on dense hardware (False for fine-grained plans:
            only hardware that skips zeros sees them).
    """

    budget: Optional[Budget] = None
    dense: Optional[Cost] = None
    cost: Optional[Cost] = None
    measured: Optional[Cost] = None
    predicted_drop: float = 0.0
    drop: float = 0.0
    dense_hardware: bool = True

    def summary(self) -> str:
        """One line: the costs as fractions of dense, and the drop."""
        cost = self.measured or self.cost
        params, macs = cost.fraction_of(self.dense)
        where = "" if self.dense_hardware else " (non-zero weights: only hardware that skips zeros runs them)"
        return (f"budget {self.budget}: the plan keeps {macs:.3f} of the MACs and {params:.3f} of the "
                f"parameters{where}; score drop {self.drop:.4g} with every layer pruned (predicted {self.predicted_drop:.4g})")


class _Curve:
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


def _curves(result: SensitivityResult, relative: bool, ceilings: Mapping[str, float]) -> Dict[str, _Curve]:
    curves = {}
    for layer in result.layers:
        pairs = [(level, score_drop(score, result.baseline, result.higher_is_better, relative))
                 for level, score in zip(result.sparsities, result.scores[layer])
                 if level <= ceilings[layer] + 1e-12 and score is not None]
        curves[layer] = _Curve([p[0] for p in pairs], [p[1] for p in pairs])
    return curves


def _ceilings(method: PruningMethod, costs: PlanCosts) -> Dict[str, float]:
    return {layer: float(method.max_sparsity(block)) for layer, block in costs.blocks.items()}


def smallest_cost(
    model: nn.Module, method: PruningMethod, layers: Sequence[str], levels: Sequence[float], input_size: Sequence[int],
) -> Tuple[Cost, Cost]:
    """``(dense, smallest)``: the cost with every layer at its highest of ``levels`` it can take (before any scan)."""
    costs = plan_costs(model, method, layers, input_size)
    ceilings = _ceilings(method, costs)
    plan = {}
    for layer in layers:
        usable = [level for level in levels if level <= ceilings[layer] + 1e-12]
        if usable:
            plan[layer] = max(usable)
    return costs.dense, costs.of(plan)


def check_reachable(budget: Budget, dense: Cost, smallest: Cost, what: str) -> None:
    """Refuse a budget below ``smallest`` (the cost ``what``, e.g. "with every layer at its highest level"), naming both."""
    if budget.excess(smallest, dense) > 0:
        params, macs = smallest.fraction_of(dense)
        raise BudgetError(
            f"the budget ({budget}) is out of reach: {what} the plan keeps {macs:.3f} of the MACs and {params:.3f} "
            "of the parameters at best; loosen the budget, scan higher levels (--sparsities up to 0.95) or prune more layers"
        )


def _input_size(evaluate: Any) -> Tuple[int, ...]:
    batches = getattr(evaluate, "batches", None)
    if callable(batches):
        for inputs, _ in batches(torch.device("cpu")):
            return tuple(int(v) for v in inputs.shape[1:])
    raise ValueError("fit_budget needs the input size to count MACs: pass input_size=(C, H, W)")


def fit_budget(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    result: SensitivityResult,
    budget: Budget,
    *,
    method: Any = None,
    stats: Optional[Mapping[str, Any]] = None,
    criterion: Optional[str] = None,
    input_size: Optional[Sequence[int]] = None,
    max_drop: Optional[float] = None,
    relative: bool = False,
    check: bool = True,
) -> BudgetFit:
    """The plan that meets ``budget`` with the smallest predicted drop along the scan's curves; see the module docstring.

    Args:
        model: the dense model that was scanned (left as it was).
        evaluate: the scan's metric; the plan is scored once with it, every layer pruned.
        result: the finished scan.
        budget: what the plan may cost.
        method, stats, criterion: the method scanned (prepared: it owns its scores' data), as for
            :func:`~prunekit.planning.fit_plan`.
        input_size: ``(C, H, W)`` the MACs are counted at (default: the metric's first batch).
        max_drop, relative: a tolerance the plan must hold as well (None: report the drop only).
        check: count the costs on the model built (compacted on a copy for a channel plan).

    Raises:
        BudgetError: no plan the scan offers meets the budget, or the one that does is beyond ``max_drop``.
    """
    if not result.complete:
        raise ValueError("the scan is not complete; finish it (e.g. with --resume) before fitting a plan")
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a prunekit.planning.Budget, e.g. Budget(macs=0.5); got {budget!r}")
    if max_drop is not None:
        check_tolerance(max_drop, float(result.baseline), relative)
    pruning = prepared_method(result.method if method is None else method, stats, criterion)
    if pruning.name != result.method:
        raise ValueError(f"method {pruning.name!r} is not the scan's ({result.method!r}); fit with the method scanned")
    size = tuple(input_size) if input_size is not None else _input_size(evaluate)
    costs = plan_costs(model, pruning, result.layers, size)
    curves = _curves(result, relative, _ceilings(pruning, costs))
    weights = scanned_weights(model, result)
    # a level counts whole units: a channel group's units, a fine-grained layer's weights
    units = {layer: len(block.units) for layer, block in costs.blocks.items()} if pruning.unit == "channels" else weights
    plan = _spend(budget, costs, curves, units)
    predicted = sum(curves[layer].at(level) for layer, level in plan.items() if level > 0)
    score = float(evaluate_plan(model, evaluate, plan, method=pruning)) if any(plan.values()) else float(result.baseline)
    drop = score_drop(score, float(result.baseline), result.higher_is_better, relative)
    cost = costs.of(plan)
    if max_drop is not None and not within_tolerance(score, float(result.baseline), result.higher_is_better,
                                                     relative, max_drop):
        params, macs = cost.fraction_of(costs.dense)
        raise BudgetError(
            f"the plan that meets the budget ({budget}; {macs:.3f} of the MACs, {params:.3f} of the parameters) drops "
            f"the score by {drop:.4g} with every layer pruned, beyond max_drop={max_drop:g}: loosen the budget or "
            "raise --max-drop"
        )
    measured = None
    if check:  # a plan that prunes nothing builds the dense model: its cost is the count
        measured = _built_cost(model, plan, pruning, size, costs) if any(plan.values()) else cost
    sparsity = sum(level * weights[layer] for layer, level in plan.items()) / (sum(weights.values()) or 1)
    return BudgetFit(plan=dict(plan), score=score, sparsity=sparsity, budget=budget, dense=costs.dense, cost=cost,
                     measured=measured, predicted_drop=float(predicted), drop=float(drop),
                     dense_hardware=costs.dense_hardware)


def _spend(budget: Budget, costs: PlanCosts, curves: Mapping[str, _Curve], units: Mapping[str, int]) -> Dict[str, float]:
    """The greedy walk along the curves, then the last step narrowed to the budget (module docstring)."""
    plan = {layer: 0.0 for layer in curves}
    dense = costs.dense
    tally = costs.tally(plan)
    excess = budget.excess(tally.cost, dense)
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
                gained = excess - budget.excess(tally.trial(layer, level), dense)
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
        excess = budget.excess(tally.cost, dense)
    if excess > 0:
        check_reachable(budget, dense, tally.cost, "with every layer at its highest scanned level")
    if last is not None:
        layer, start = last
        plan[layer] = _narrowed(budget, tally, layer, start, units[layer])
    return {layer: level for layer, level in plan.items() if level > 0}


def _narrowed(budget: Budget, tally: Any, layer: str, start: float, units: int) -> float:
    """The lowest level of ``layer`` above ``start`` (whole units) at which the tally's plan still meets the budget."""
    low = round(start * units)  # does not meet it (the walk took a step from here)
    high = round(tally.plan[layer] * units)  # meets it
    while high - low > 1:
        middle = (low + high) // 2
        if budget.excess(tally.trial(layer, middle / units), tally.costs.dense) > 0:
            low = middle
        else:
            high = middle
    return high / units


def _built_cost(model: nn.Module, plan: Mapping[str, float], method: PruningMethod, size: Sequence[int],
                costs: PlanCosts) -> Optional[Cost]:
    """What the model built from ``plan`` costs: compacted on a copy (channels), or its non-zero weights."""
    from prunekit.compact import UnsupportedGraphError, compact
    from prunekit.plans import apply_plan
    from prunekit.reparametrization import copy_model

    pruned = apply_plan(copy_model(model), plan, method=method)
    if not costs.dense_hardware:
        return nonzero_costs(pruned, size)
    parameter = next(model.parameters())
    try:
        small = compact(pruned, torch.zeros((1, *size), dtype=parameter.dtype, device=parameter.device))
    except (UnsupportedGraphError, ValueError):
        return None
    return measured_costs(small, size)

