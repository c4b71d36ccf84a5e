"""Fit a plan to a budget: "half the MACs", "2x faster", "under 20 ms", spent where the scan says it hurts least.

A :class:`Budget` names what the pruned model may cost: fractions of the dense model's
MACs per sample and parameters, a speed-up over the dense model, or a latency per forward
(both timed on this machine at the budget's batch, 1 by default, by :mod:`prunekit.planning.latency`'s per-layer
model rather than guessed from MACs). :func:`fit_budget` walks the scan's curves
(:mod:`prunekit.planning.walk`): from dense, it
repeatedly raises the layer (or channel group) whose next level buys the most of the budget
per unit of predicted score drop (the single-layer drops the scan measured, each curve made
non-decreasing; a step may jump levels, so a curve that is flat and then falls is not
cut short), counting every step's cost on the model ``compact`` will build
(:mod:`prunekit.planning.costs`: removing a group's channels also shrinks the layers that
read them; a unit ``compact`` keeps costs what it did). The last step is then narrowed to
the fewest units (or weights) that meet the budget, so the plan lands on the budget rather
than a scanned level past it. Single-layer drops add up poorly when many layers are pruned at
once, so the walk's plan is compared with one level for every layer and a blend of the two
(:func:`~prunekit.planning.walk.scaled`), each meeting the budget, all scored with every layer
pruned together on the scan's data; the best is kept and, for a channel plan, compacted on
a copy to count what the small model really costs. A speed-up or latency budget is then checked where it matters: the compacted copy is
timed beside the dense model (interleaved rounds, as ``prunekit compact`` times them), and
when the measured speed-up misses the target by more than :data:`SPEEDUP_TOLERANCE`, the
target is corrected by the ratio measured over predicted and the walk run again (at most
:data:`CORRECTIONS` times; the closest plan is kept). With ``max_drop`` as well, a plan
beyond the tolerance is refused, saying by how much.

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
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from prunekit.methods.base import PruningMethod
from prunekit.methods.registry import prepared_method
from prunekit.planning.costs import ChannelCosts, Cost, PlanCosts, measured_costs, nonzero_costs, plan_costs, scanned_weights
from prunekit.planning.fitted import PlanFit
from prunekit.planning.rounding import round_widths
from prunekit.planning.walk import curves_of, scaled, walk
from prunekit.sensitivity.result import SensitivityResult
from prunekit.sensitivity.scoring import evaluate_plan
from prunekit.sensitivity.tolerance import check_tolerance, score_drop, within_tolerance

__all__ = ["Budget", "BudgetError", "BudgetFit", "CORRECTIONS", "SPEEDUP_TOLERANCE", "fit_budget", "smallest_cost",
           "timed_costs"]

_FRACTIONS = {"macs": "MACs", "params": "parameters"}

#: A timed budget is met when the measured speed-up is within this fraction of the target's.
SPEEDUP_TOLERANCE = 0.05
#: How many times a timed budget's target is corrected by what the compacted model measured.
CORRECTIONS = 3


class BudgetError(ValueError):
    """A budget that cannot be met (by any plan the scan offers, or within the tolerance)."""


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


@dataclass(frozen=True)
class Budget:
    """What the pruned model may cost (None: no limit).

    Attributes:
        macs: multiply-accumulates per sample, a fraction of the dense model's in (0, 1] (``0.5``: half).
        params: parameters, a fraction in (0, 1].
        speedup: how many times faster than the dense model (> 1), timed on this machine at ``batch``.
        latency: seconds per forward of ``batch`` inputs on this machine (``0.02``: 20 ms).
        batch: how many inputs a timed forward takes (1: the latency of one request; more: a server's
            batch, where the wider layers' arithmetic weighs more than their overheads).
        round_widths: with a speed-up or latency budget, try each group's kept channels rounded up to
            the widest width this machine runs as fast (measured: :mod:`prunekit.planning.rounding`); the
            rounded plan is timed and scored and kept only when it still meets the target and scores at
            least as well. False keeps the widths as fitted. MACs and parameter budgets are never rounded.

    Example:
        >>> Budget(macs=0.5)
        Budget(macs=0.5, params=None, speedup=None, latency=None, batch=1, round_widths=True)
        >>> str(Budget(speedup=2, latency=0.02))
        'speed-up >= 2x, latency <= 20 ms'
        >>> Budget(macs=0)
        Traceback (most recent call last):
        ...
        ValueError: macs=0 is not a fraction of the dense model's MACs in (0, 1]; pass e.g. 0.5 to keep half of them
    """

    macs: Optional[float] = None
    params: Optional[float] = None
    speedup: Optional[float] = None
    latency: Optional[float] = None
    batch: int = 1
    round_widths: bool = True

    def __post_init__(self) -> None:
        for kind in _FRACTIONS:
            value = getattr(self, kind)
            if value is not None and not (_is_number(value) and 0 < value <= 1):
                raise ValueError(f"{kind}={value!r} is not a fraction of the dense model's {_FRACTIONS[kind]} in (0, 1]; "
                                 f"pass e.g. 0.5 to keep half of them")
        if self.speedup is not None and not (_is_number(self.speedup) and self.speedup > 1):
            raise ValueError(f"speedup={self.speedup!r} is not a speed-up over the dense model (> 1); "
                             "pass e.g. 2 for twice as fast")
        if self.latency is not None and not (_is_number(self.latency) and self.latency > 0):
            raise ValueError(f"latency={self.latency!r} is not a time per forward in seconds (> 0); pass e.g. 0.02 for 20 ms")
        if isinstance(self.batch, bool) or not isinstance(self.batch, numbers.Integral) or self.batch < 1:
            raise ValueError(f"batch={self.batch!r} is not a batch size; pass an int >= 1 (the inputs a timed forward takes)")
        if self.batch != 1 and not self.timed:
            raise ValueError(f"batch={self.batch} sets what a speed-up or latency is timed at; a MACs or parameters "
                             "budget counts per input: drop batch, or add speedup/latency")
        if not isinstance(self.round_widths, bool):
            raise ValueError(f"round_widths={self.round_widths!r} is not True or False")
        if not self.targets():
            raise ValueError("a Budget needs macs, params (fractions of the dense model's), speedup or latency, "
                             "e.g. Budget(macs=0.5) or Budget(speedup=2)")

    def targets(self) -> Dict[str, float]:
        """The limits given, by name (``{"macs": 0.5, "speedup": 2.0}``)."""
        return {kind: getattr(self, kind) for kind in ("macs", "params", "speedup", "latency")
                if getattr(self, kind) is not None}

    @property
    def timed(self) -> bool:
        """Whether the budget limits time (``speedup`` or ``latency``): the plan's latency is then measured."""
        return self.speedup is not None or self.latency is not None

    def fractions(self, dense: Cost) -> Dict[str, float]:
        """Each limit as a fraction of ``dense``'s cost: ``macs``, ``params`` and ``seconds`` (the tighter of the time limits)."""
        fractions = {kind: getattr(self, kind) for kind in _FRACTIONS if getattr(self, kind) is not None}
        if self.timed:
            if dense.seconds is None:
                raise ValueError("a speed-up or latency budget needs the plan's time: count the costs with a latency "
                                 "model (prunekit.planning.budget.timed_costs)")
            limits = ([1 / self.speedup] if self.speedup is not None else []) + (
                [self.latency / dense.seconds] if self.latency is not None else [])
            fractions["seconds"] = min(limits)
        return fractions

    def excess(self, cost: Cost, dense: Cost) -> float:
        """How far ``cost`` is over the budget, summed over the limits as fractions of the dense costs (0: met)."""
        return _excess(self.fractions(dense), cost, dense)

    def __str__(self) -> str:
        words = [f"{_FRACTIONS[kind]} <= {getattr(self, kind):g} of dense" for kind in _FRACTIONS
                 if getattr(self, kind) is not None]
        if self.speedup is not None:
            words.append(f"speed-up >= {self.speedup:g}x")
        if self.latency is not None:
            words.append(f"latency <= {self.latency * 1e3:g} ms")
        return ", ".join(words) + (f" at batch {self.batch}" if self.batch != 1 else "")


def _excess(fractions: Mapping[str, float], cost: Cost, dense: Cost) -> float:
    return sum(max(0.0, getattr(cost, kind) / max(getattr(dense, kind), 1e-30 if kind == "seconds" else 1) - target)
               for kind, target in fractions.items())


@dataclass(frozen=True)
class BudgetFit(PlanFit):
    """A plan fitted to a budget (see :class:`~prunekit.planning.fitted.PlanFit` for the plan and its score).

    Attributes:
        budget: what was asked for.
        dense: the dense model's cost; ``cost``: the plan's, counted without building it (with a timed
            budget, ``seconds`` is the latency model's prediction).
        measured: the cost counted on the model built (a channel plan: compacted on a copy; a
            fine-grained one: its non-zero weights); None when it could not be built. With a timed
            budget its ``seconds`` is the compacted model's measured median.
        predicted_drop: the scan's single-layer drops of the plan's levels, added up.
        drop: the measured drop of ``score`` with every layer pruned together.
        dense_hardware: whether the costs hold on dense hardware (False for fine-grained plans:
            only hardware that skips zeros sees them).
        speedup: with a timed budget, the compacted model's measured speed-up over the dense model
            (a :class:`~prunekit.measure.timing.Speedup`, with its interval).
        timing: with a timed budget, what the times were measured at (threads, batch, device, input size).
        corrections: how many times the time target was corrected by a measurement.
        shape: which candidate the plan is (``"walk"``, ``"uniform"`` or ``"walk + uniform"``, see
            ``compare`` in :func:`fit_budget`); ``candidates``: how many plans were scored jointly.
        recovered: whether each candidate was scored after ``fit_budget``'s ``recover`` (then
            ``score`` and ``drop`` are the recovered model's).
        widened: with a timed budget and ``Budget.round_widths``, per group rounded up to a width this
            machine runs as fast, ``(fitted kept units, kept units)`` (:mod:`prunekit.planning.rounding`);
            empty when no group was, or the rounded plan was not kept; ``widths`` says which, in words.
    """

    budget: Optional[Budget] = None
    dense: Optional[Cost] = None
    cost: Optional[Cost] = None
    measured: Optional[Cost] = None
    predicted_drop: float = 0.0
    drop: float = 0.0
    dense_hardware: bool = True
    speedup: Any = None
    timing: Optional[str] = None
    corrections: int = 0
    shape: str = "walk"
    candidates: int = 1
    recovered: bool = False
    widened: Dict[str, Tuple[int, int]] = field(default_factory=dict)
    widths: str = ""

    def summary(self) -> str:
        """One line: the costs as fractions of dense (and the measured speed-up), and the drop."""
        cost = self.measured or self.cost
        params, macs = cost.fraction_of(self.dense)
        where = "" if self.dense_hardware else " (non-zero weights: only hardware that skips zeros runs them)"
        timed = f", runs {self.speedup} faster ({self.timing})" if self.speedup is not None else ""
        after = " and recovered" if self.recovered else ""
        if self.widths:
            timed += f"; {self.widths}"
        return (f"budget {self.budget}: the plan keeps {macs:.3f} of the MACs and {params:.3f} of the "
                f"parameters{where}{timed}; score drop {self.drop:.4g} with every layer pruned{after} "
                f"(predicted {self.predicted_drop:.4g})")


def _ceilings(method: PruningMethod, costs: PlanCosts) -> Dict[str, float]:
    return {layer: float(method.max_sparsity(block)) for layer, block in costs.blocks.items()}


def timed_costs(
    model: nn.Module, method: PruningMethod, layers: Sequence[str], input_size: Sequence[int], *,
    latency: Any = None, progress: bool = False, batch: int = 1,
) -> PlanCosts:
    """The cost model of ``method``'s plans with seconds too: ``latency`` (measured now at ``batch`` when None,
    see :func:`~prunekit.planning.latency.measure_latency`).

    Raises:
        BudgetError: a fine-grained method (its plans run at the dense model's speed on dense hardware).
    """
    from prunekit.planning.latency import measure_latency

    costs = plan_costs(model, method, layers, input_size)
    if not costs.dense_hardware:
        raise BudgetError(f"a {method.name} plan leaves its zeros in place and runs as fast as the dense model on "
                          "this hardware: a speed-up or latency budget needs a channel method (e.g. --method channel)")
    if latency is None:
        latency = measure_latency(model, input_size, costs.narrowable(), progress=progress, batch=batch)
    elif latency.setting.get("batch") != batch:
        raise ValueError(f"the latency model was timed at batch {latency.setting.get('batch')}, the budget asks for "
                         f"batch {batch}; measure it at the budget's batch (measure_latency(..., batch={batch}))")
    return costs.timed(latency)


def smallest_cost(
    model: nn.Module, method: PruningMethod, layers: Sequence[str], levels: Sequence[float], input_size: Sequence[int],
    *, costs: Optional[PlanCosts] = None,
) -> Tuple[Cost, Cost]:
    """``(dense, smallest)``: the cost with every layer at its highest of ``levels`` it can take (before any scan).

    ``costs``: the cost model to count with (e.g. :func:`timed_costs`'s; default: MACs and params).
    """
    costs = costs if costs is not None else plan_costs(model, method, layers, input_size)
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
        timed = ""
        if smallest.seconds is not None and dense.seconds is not None:
            timed = (f", {smallest.seconds * 1e3:.3g} ms per forward (dense {dense.seconds * 1e3:.3g} ms, "
                     f"{dense.seconds / max(smallest.seconds, 1e-30):.2f}x faster)")
        raise BudgetError(
            f"the budget ({budget}) is out of reach: {what} the plan keeps {macs:.3f} of the MACs and {params:.3f} "
            f"of the parameters{timed} at best; loosen the budget, scan higher levels (--sparsities up to 0.95) or "
            "prune more layers"
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
    latency: Any = None,
    timing_repeats: int = 15,
    progress: bool = False,
    compare: bool = True,
    costs: Optional[PlanCosts] = None,
    recover: Optional[Callable[[nn.Module], Any]] = None,
) -> BudgetFit:
    """The plan that meets ``budget`` with the smallest predicted drop along the scan's curves; see the module docstring.

    Args:
        model: the dense model that was scanned (left as it was).
        evaluate: the scan's metric; the plan is scored once with it, every layer pruned.
        result: the finished scan.
        budget: what the plan may cost.
        method, stats, criterion: the method scanned (prepared: it owns its scores' data), as for
            :func:`~prunekit.planning.fit_plan`.
        input_size: ``(C, H, W)`` the MACs are counted (and the times measured) at (default: the metric's first batch).
        max_drop, relative: a tolerance the plan must hold as well (None: report the drop only).
        check: count the costs on the model built (compacted on a copy for a channel plan). A timed
            budget is always checked: its compacted copy is timed beside the dense model.
        latency: a timed budget's :class:`~prunekit.planning.latency.LatencyModel` (None: measured now,
            with the model's device and torch's threads, at the budget's batch; cached on disk).
        timing_repeats: interleaved rounds each check of a timed budget takes.
        progress: show a bar while layers are timed.
        compare: score the walk's plan, one level for every layer (``"uniform"``) and their blend
            (``"walk + uniform"``), each meeting the budget, with every layer pruned together, and keep
            the best (``BudgetFit.shape`` says which); False: the walk's plan alone.
        costs: the cost model of ``method``'s plans over the scanned layers at ``input_size``, when
            already built (:func:`plan_costs`, or :func:`timed_costs` for a timed budget); None: built here.
        recover: called with a pruned copy of the model (masked by the plan; torch's reparametrization
            keeps the zeros) before each candidate is scored, e.g. a short
            :func:`~prunekit.training.recover` distillation, so the candidates compete on what is left after
            the recovery the user will run; the model itself is never trained. None: scored as pruned.

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
    if costs is None:
        costs = timed_costs(model, pruning, result.layers, size, latency=latency, progress=progress, batch=budget.batch) \
            if budget.timed else plan_costs(model, pruning, result.layers, size)
    elif sorted(costs.blocks) != sorted(result.layers):
        raise ValueError("costs were counted over other layers than the scan's; build them with result.layers")
    elif budget.timed and getattr(costs, "latency", None) is None:
        raise ValueError("a timed budget needs seconds in its cost model: pass timed_costs(...), not plan_costs(...)")
    curves = curves_of(result, relative, _ceilings(pruning, costs))
    weights = scanned_weights(model, result)
    # a level counts whole units: a channel group's units, a fine-grained layer's weights
    units = {layer: len(block.units) for layer, block in costs.blocks.items()} if pruning.unit == "channels" else weights
    if pruning.levels is not None:  # a fixed pattern (2:4): a layer steps between 0 and its levels, nothing between
        units = {layer: round(1 / min(pruning.levels)) for layer in units}
    fractions = budget.fractions(costs.dense)

    ceilings = _ceilings(pruning, costs)
    scores: Dict[Tuple[Tuple[str, float], ...], float] = {}
    shapes: Dict[str, str] = {}

    def joint_score(plan: Mapping[str, float]) -> float:
        key = tuple(sorted(plan.items()))
        if key not in scores:
            if recover is not None:
                scores[key] = _recovered_score(model, plan, pruning, recover, evaluate)
            elif any(plan.values()):
                scores[key] = float(evaluate_plan(model, evaluate, plan, method=pruning))
            else:
                scores[key] = float(result.baseline)
        return scores[key]

    def spend(targets: Mapping[str, float], only: Optional[str] = None) -> Dict[str, float]:
        """The best candidate meeting ``targets`` (``only``: that candidate's shape, e.g. for a corrected target)."""
        excess_of = lambda cost: _excess(targets, cost, costs.dense)  # noqa: E731
        plan, tally = walk(excess_of, costs, curves, units)
        if excess_of(tally.cost) > 0:
            check_reachable(budget, costs.dense, tally.cost, "with every layer at its highest scanned level")
        if not compare:
            return plan
        # the walk adds single-layer drops; the candidates are scored with every layer pruned together
        candidates = {"walk": plan}
        uniform = scaled({layer: 1.0 for layer in curves}, excess_of, costs, ceilings, units)
        if uniform is not None:
            candidates["uniform"] = uniform
            mean = sum(plan.values()) / max(len(curves), 1)
            if mean > 0:
                blend = scaled({layer: 1.0 + plan.get(layer, 0.0) / mean for layer in curves}, excess_of, costs,
                               ceilings, units)
                if blend is not None:
                    candidates["walk + uniform"] = blend
        if only is not None and only in candidates:
            candidates = {only: candidates[only]}
        sign = 1.0 if result.higher_is_better else -1.0
        name = max(candidates, key=lambda key: (sign * joint_score(candidates[key]), key == "walk"))
        shapes[str(sorted(candidates[name].items()))] = name
        return candidates[name]

    plan = spend(fractions)
    measured, timing, corrections = None, None, 0
    widened: Dict[str, Tuple[int, int]] = {}
    widths = ""
    if budget.timed:
        # a corrected target keeps the shape chosen first: switching shapes between corrections would not converge
        first = shapes.get(str(sorted(plan.items())), "walk")
        plan, measured, timing, corrections = _timed_plan(model, plan, pruning, size, costs, fractions,
                                                          lambda aim: spend(aim, only=first), timing_repeats,
                                                          budget.batch)
        if budget.round_widths and timing is not None and isinstance(costs, ChannelCosts):
            done = round_widths(model, plan, costs, size, batch=budget.batch)
            if done.changed and not any(done.plan.values()):
                # every group back at full width: the dense model, which no timing can show faster than itself
                widths = (f"{len(done.changed)} group(s) rounded up to widths this machine runs as fast "
                          f"(+{done.added} channels): that keeps every channel, so the widths were kept as fitted")
            elif done.changed:
                shapes[str(sorted(done.plan.items()))] = shapes.get(str(sorted(plan.items())), "walk")
                built, faster = _built_and_timed(model, done.plan, pruning, size, timing_repeats, budget.batch)
                keep, verdict = _rounding_verdict(faster, timing, 1 / fractions["seconds"], result.higher_is_better,
                                                  joint_score(done.plan), joint_score(plan))
                widths = (f"{len(done.changed)} group(s) rounded up to widths this machine runs as fast "
                          f"(+{done.added} channels): {verdict}")
                if keep:
                    plan, measured, timing, widened = done.plan, built, faster, done.changed
    elif check:  # a plan that prunes nothing builds the dense model: its cost is the count
        measured = _built_cost(model, plan, pruning, size, costs) if any(plan.values()) else costs.of(plan)
    predicted = sum(curves[layer].at(level) for layer, level in plan.items() if level > 0)
    score = joint_score(plan)
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
    sparsity = sum(level * weights[layer] for layer, level in plan.items()) / (sum(weights.values()) or 1)
    return BudgetFit(plan=dict(plan), score=score, sparsity=sparsity, budget=budget, dense=costs.dense, cost=cost,
                     measured=measured, predicted_drop=float(predicted), drop=float(drop),
                     dense_hardware=costs.dense_hardware, speedup=timing,
                     timing=costs.latency.describe() if budget.timed else None, corrections=corrections,
                     shape=shapes.get(str(sorted(plan.items())), "walk"), candidates=len(scores),
                     recovered=recover is not None, widened=widened, widths=widths)


def _recovered_score(model: nn.Module, plan: Mapping[str, float], method: PruningMethod,
                     recover: Callable[[nn.Module], Any], evaluate: Callable[[nn.Module], float]) -> float:
    """``evaluate`` of a copy of ``model`` pruned by ``plan`` after ``recover`` trained it."""
    from prunekit.plans import apply_plan, copy_model

    pruned = apply_plan(copy_model(model), dict(plan), method=method)
    recover(pruned)
    pruned.eval()
    with torch.no_grad():
        return float(evaluate(pruned))


def _rounding_verdict(faster: Any, fitted: Any, goal: float, higher_is_better: bool, score: float,
                      fitted_score: float) -> Tuple[bool, str]:
    """Whether the rounded plan is kept, and why in words: it must still meet the target (within
    :data:`SPEEDUP_TOLERANCE`, or be no slower than the plan as fitted measured) and score at least as well."""
    if faster is None:
        return False, "not compacted, kept as fitted"
    if faster.ratio < goal * (1 - SPEEDUP_TOLERANCE) and faster.ratio < fitted.ratio:
        return False, f"they ran {faster.ratio:.2f}x, short of the target, so the widths were kept as fitted"
    if (score < fitted_score) if higher_is_better else (score > fitted_score):
        return False, f"they scored {score:.4g} against {fitted_score:.4g}, so the widths were kept as fitted"
    return True, f"kept ({faster.ratio:.2f}x, score {score:.4g} against {fitted_score:.4g} as fitted)"


def _timed_plan(
    model: nn.Module, plan: Dict[str, float], method: PruningMethod, size: Sequence[int], costs: Any,
    fractions: Mapping[str, float], spend: Callable[[Mapping[str, float]], Dict[str, float]], repeats: int,
    batch: int = 1,
) -> Tuple[Dict[str, float], Optional[Cost], Any, int]:
    """Time the compacted plan beside the dense model; correct the time target by what it measured (module docstring).

    Returns the closest plan, its measured cost (seconds: the compacted model's median), its
    measured :class:`~prunekit.measure.timing.Speedup` and the corrections made.
    """
    target = fractions["seconds"]
    goal = 1 / target
    tried: List[Tuple[float, Dict[str, float], Optional[Cost], Any]] = []
    aim = dict(fractions)
    for attempt in range(CORRECTIONS + 1):
        built, speedup = _built_and_timed(model, plan, method, size, repeats, batch)
        if built is None:
            return plan, None, None, attempt
        tried.append((abs(math.log(speedup.ratio / goal)), plan, built, speedup))
        if abs(speedup.ratio / goal - 1) <= SPEEDUP_TOLERANCE or attempt == CORRECTIONS:
            break
        # the model was off by measured / predicted (m / p): the next walk aims at target * p / m
        predicted = costs.of(plan).seconds / costs.dense.seconds
        aim["seconds"] = max(1e-6, min(1.0, target * predicted * speedup.ratio))
        try:
            corrected = spend(aim)
        except BudgetError:
            break  # the corrected target is out of the scan's reach: keep the closest plan so far
        if corrected == plan:
            break
        plan = corrected
    _, plan, built, speedup = min(tried, key=lambda entry: entry[0])
    return plan, built, speedup, len(tried) - 1


def _built_and_timed(model: nn.Module, plan: Mapping[str, float], method: PruningMethod, size: Sequence[int],
                     repeats: int, batch: int = 1) -> Tuple[Optional[Cost], Any]:
    """The compacted copy's cost (seconds: its median time) and its speed-up over ``model``, timed side by side."""
    from prunekit.compact.measured import WARMUP_ROUNDS
    from prunekit.measure.timing import latency_samples, speedup

    small = _compacted(model, plan, method, size)
    if small is None:
        return None, None
    parameter = next(model.parameters())
    example = torch.randn((batch, *size), generator=torch.Generator().manual_seed(0)).to(parameter.device, parameter.dtype)
    samples = latency_samples({"dense": model, "compact": small}, example, repeats=repeats, warmup=WARMUP_ROUNDS)
    cost = measured_costs(small, size)
    return Cost(cost.params, cost.macs, statistics.median(samples["compact"])), speedup(samples["dense"], samples["compact"])


def _compacted(model: nn.Module, plan: Mapping[str, float], method: PruningMethod, size: Sequence[int]) -> Optional[nn.Module]:
    from prunekit.compact import UnsupportedGraphError, compact
    from prunekit.plans import apply_plan
    from prunekit.reparametrization import copy_model

    pruned = apply_plan(copy_model(model), plan, method=method)
    parameter = next(model.parameters())
    try:
        return compact(pruned, torch.zeros((1, *size), dtype=parameter.dtype, device=parameter.device))
    except (UnsupportedGraphError, ValueError):
        return None


def _built_cost(model: nn.Module, plan: Mapping[str, float], method: PruningMethod, size: Sequence[int],
                costs: PlanCosts) -> Optional[Cost]:
    """What the model built from ``plan`` costs: compacted on a copy (channels), or its non-zero weights."""
    if not costs.dense_hardware:
        from prunekit.plans import apply_plan
        from prunekit.reparametrization import copy_model

        return nonzero_costs(apply_plan(copy_model(model), plan, method=method), size)
    small = _compacted(model, plan, method, size)
    return None if small is None else measured_costs(small, size)
