"""Fit a plan whose layers, pruned all together, stay within the tolerance.

A scan measures one layer at a time; pruned together, the layers' losses add
up (or worse), so the per-layer plan of :meth:`SensitivityResult.plan` can
miss the tolerance by far. :func:`fit_plan` grows a plan step by step (a step
raises one layer to a higher scanned level), keeping a step only if the whole
plan (measured with :func:`evaluate_plan`) stays within the tolerance; a layer
whose step fails stays where it is.

The order of the steps is known from the scan before anything is measured: by
default, the weights a step removes per unit of its single-layer drop (most
first), so the tolerance goes to the layers where it buys the most weights; or
the smallest single-layer drop first (``order="drop"``, the fit of earlier
versions). The fit does not measure every step: it searches the order. From the
plan it has, it predicts how many of the next steps fit (the scan's
single-layer drops, added up and scaled by how far the last measured plan was
from its own prediction), measures that plan, then gallops up while plans hold
and narrows down to the first step that breaks the tolerance, each guess where
the line through the two measured ends of the bracket crosses the tolerance
(a guess that does not halve the bracket is followed by a halving, so at most
twice bisection's trials). Steps the scan saw cost nothing are no evidence (a
metric that counts, such as accuracy on a few hundred images, sees no loss for
most steps alone): a guess takes them within its first layer only, and once
the plan measured uses over half the tolerance the gallop adds them one at a
time. With a joint score that only worsens as steps are added, this gives
exactly the plan the one-step-at-a-time search gives (``search="greedy"``,
kept for comparison), with a logarithmic number of evaluations per layer that
stops below its ceiling. Layers too small to matter (together under
``min_gain`` of the weights, the smallest first) are never tried, and the fit
stops once the steps left could remove only a sliver of the weights
(``min_gain``): past that, each trial would still cost an evaluation.

A trial costs less than a full evaluation: every run keeps its states before
each prunable layer (:class:`PlanScorer`), and a trial starts from the latest
state computed for the same levels before it, the plan kept so far's or an
earlier trial's, so a trial that raises a late layer costs about what one scan
point on that layer costs and the trials of one search share their first
layers; each layer's masks come from one selection per level; and a trial that
breaks the tolerance stops at the first batch after which no batch left could
bring it back (a certain verdict, see
:class:`~prunekit.sensitivity.settle.Tolerance`), while a trial that holds runs
to the end, so the plan's score is exact.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from torch import nn

from prunekit.progress import progress_bar
from prunekit.sensitivity.result import SensitivityResult
from prunekit.sensitivity.tolerance import score_drop, within_tolerance
from prunekit._rollback import eval_mode
from prunekit.methods.base import PruningMethod
from prunekit.methods.registry import prepared_method
from prunekit.sensitivity.scoring import PlanScorer, evaluate_plan
from prunekit.sensitivity.settle import Estimate, Settler, Tolerance
from prunekit.planning.budget import Budget, fit_budget
from prunekit.planning.costs import scanned_weights
from prunekit.planning.fitted import PlanFit, Trial

__all__ = ["ORDERS", "PlanFit", "SEARCHES", "Trial", "fit_plan"]

SEARCHES = ("bisect", "greedy")
ORDERS = ("weights", "drop")
#: The default ``min_gain``: stop once the steps left could remove less than 0.5 % of the scanned weights.
DEFAULT_MIN_GAIN = 0.005
#: The revision of the default search's trial sequence (interpolating bisection, small layers left out,
#: unseen steps not guessed at once):
#: a saved fit is replayed only by the revision that made it (the CLI keys its ``fit.json`` with it).
SEARCH_REVISION = 3
#: In the weights order, a rise in single-layer drop counts at least this share of the tolerance.
ZERO_DROP_SHARE = 0.01


Step = Tuple[str, int]  # (layer, index into the scan's levels)


def _greedy_order(result: SensitivityResult, ceiling: Mapping[str, float], relative: bool) -> List[Step]:
    """Every step the greedy fit can take, in the order it takes them when no step fails.

    The greedy picks, among each layer's next level, the smallest single-layer drop (then scan
    order): a merge of the layers' level sequences. A failed step only removes that layer's later
    steps, so the order of the others never changes.
    """
    position = {layer: -1 for layer in result.layers}
    order: List[Step] = []
    while True:
        step = _next_step(result, position, set(), ceiling, relative)
        if step is None:
            return order
        order.append(step)
        position[step[0]] = step[1]


def _weights_order(
    result: SensitivityResult, ceiling: Mapping[str, float], relative: bool, weights: Mapping[str, int], floor: float,
) -> List[Step]:
    """Steps in the order of the weights they remove per unit of single-layer drop, most first.

    Each layer's levels (up to its ceiling) are points (drop, weights removed) from (0, 0); the
    layer's segments walk the upper concave hull of those points, each removing the most weights per
    unit of drop the layer offers from where it is, and every level of a segment is one step at the
    segment's ratio. Merged over layers by that ratio, the steps trace the plans that remove the most
    weights for a summed single-layer drop (the Lagrangian relaxation of that knapsack), each plan
    pruning every layer at least as much as the one before. ``floor`` (a small share of the tolerance)
    is added to every rise in drop: a step the scan saw cost nothing is not free once the others are
    pruned too, and among such steps the one that removes more weights comes first.
    """
    steps: List[Tuple[float, int, int, str]] = []
    levels = result.sparsities
    for order, layer in enumerate(result.layers):
        points = [(0.0, 0.0, -1)]
        for index, level in enumerate(levels):
            if level > ceiling[layer] + 1e-12:
                break
            drop = score_drop(result.scores[layer][index], result.baseline, result.higher_is_better, relative)
            points.append((max(0.0, drop), level * weights[layer], index))
        here = points[0]
        while True:
            best: Optional[Tuple[float, Tuple[float, float, int]]] = None
            for point in points:
                if point[2] <= here[2] or point[1] <= here[1]:
                    continue
                ratio = (point[1] - here[1]) / (max(0.0, point[0] - here[0]) + floor)
                if best is None or ratio > best[0] or (ratio == best[0] and point[1] > best[1][1]):
                    best = (ratio, point)
            if best is None:
                break
            # The levels under the hull on the way come first, at the segment's ratio: a failing jump then
            # leaves the layer at the highest level that held, as a step of one level would.
            steps += [(-best[0], order, index, layer) for index in range(here[2] + 1, best[1][2] + 1)]
            here = best[1]
    steps.sort(key=lambda step: step[:3])  # along one layer's hull the ratio falls, so its steps stay in order
    return [(layer, index) for _, _, index, layer in steps]


def fit_plan(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    result: SensitivityResult,
    max_drop: Optional[float] = None,
    relative: bool = False,
    stats: Optional[Mapping[str, Any]] = None,
    *,
    budget: Optional[Budget] = None,
    input_size: Optional[Sequence[int]] = None,
    criterion: Optional[str] = None,
    method: Any = None,
    resume_from: Optional[Sequence[Sequence[Any]]] = None,
    on_trial: Optional[Callable[[PlanFit], None]] = None,
    progress: bool = False,
    search: str = "bisect",
    confidence: Optional[float] = None,
    order: str = "weights",
    min_gain: float = DEFAULT_MIN_GAIN,
    latency: Any = None,
    costs: Any = None,
    recover: Optional[Callable[[nn.Module], Any]] = None,
) -> PlanFit:
    """Grow a plan from dense, step by step, while the JOINT score stays within ``max_drop``; or fit it to a ``budget``.

    With ``budget`` (a :class:`~prunekit.planning.Budget`: fractions of the dense MACs and
    parameters), the plan is the budget fit's (:func:`~prunekit.planning.budget.fit_budget`, MACs
    counted at ``input_size``, default the metric's first batch): it meets the budget with the
    smallest drop the scan predicts, is scored once with every layer pruned, and is refused when
    it is beyond ``max_drop`` (if given); a :class:`~prunekit.planning.budget.BudgetFit` comes back.

    Each step raises one layer to a higher scanned sparsity, never above the layer's own
    :meth:`SensitivityResult.plan` level. With ``order="weights"`` (default) steps come in the order
    of the weights they remove per unit of their single-layer drop (see :func:`_weights_order`), so
    the plan spends the tolerance where it buys the most weights; ``order="drop"`` takes the smallest
    single-layer drop first, whatever the layer's size. A step that breaks the tolerance is undone
    and that layer stays where it is. The ``"bisect"`` search (default) measures a few plans along
    the order per failing layer (see the module docstring); ``"greedy"`` measures the plan after every
    step; both give the same plan when more pruning never scores better. Layers whose weights add up
    to less than ``min_gain`` of the scanned weights (the smallest first) are not tried, and once the
    steps left could remove less than that, the fit stops (``PlanFit.left`` says how much all the
    steps not tried could have added at most, under ``min_gain``). The model is restored exactly
    after each measurement.

    Args:
        model: the dense model that was scanned.
        evaluate: the metric used for the scan.
        result: the finished scan.
        max_drop, relative: the tolerance, as for :meth:`SensitivityResult.plan`.
        budget, input_size: fit to a budget instead (above); ``latency``: a timed budget's
            :class:`~prunekit.planning.latency.LatencyModel` (None: measured then, cached on disk);
            ``costs``: the budget's cost model when already built; ``recover``: train each candidate's
            pruned copy before it is scored (both see :func:`~prunekit.planning.budget.fit_budget`).
        stats, criterion: for channel scans, as for :func:`prunekit.sensitivity.scan`.
        method: the method object the scan was given (prepared: it owns its scores' data); default:
            the method the result names, with ``stats`` and ``criterion``.
        resume_from: the ``trials`` of an interrupted fit of the same scan, tolerance and search; they
            are replayed without evaluating (a fit is deterministic), then the fit goes on. The plan
            they lead to is evaluated once at the end: trials that do not reproduce it (a tampered or
            stale file) are dropped with a warning and the fit starts over.
        on_trial: called with the fit so far after every trial (e.g. to save ``trials``).
        progress: show a progress bar (its length is the most plans the fit can measure).
        search: ``"bisect"`` or ``"greedy"``.
        order: ``"weights"`` or ``"drop"`` (above).
        min_gain: leave out the smallest layers while together they could remove less than this
            fraction of the scanned layers' weights, and stop once the steps not tried could remove
            less than it; 0 tries every step.
        confidence: measure each trial only until its verdict against ``max_drop`` is settled at
            this confidence (a ``ForwardMetric`` whose batches can be counted; see
            :mod:`prunekit.sensitivity.settle`); the plan found is then measured once in full, and
            fitted again exactly in the rare case it does not hold.

    Raises:
        ValueError: an incomplete scan, a bad tolerance or search, or ``resume_from`` trials that this
            scan and tolerance would not have tried (another scan's fit).

    Example:
        >>> import torch
        >>> from prunekit.sensitivity import OutputDistortion, scan
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> metric = OutputDistortion(torch.randn(2, 3, 16, 16))
        >>> fit = fit_plan(model, metric, scan(model, metric, progress=False), max_drop=0.4)
        >>> fit.score <= 0.4 and any(fit.plan.values())
        True
    """
    if budget is not None:
        return fit_budget(model, evaluate, result, budget, method=method, stats=stats, criterion=criterion,
                          input_size=input_size, max_drop=max_drop, relative=relative, latency=latency, costs=costs,
                          recover=recover, progress=progress)
    if max_drop is None:
        raise TypeError("fit_plan needs max_drop (the tolerance) or budget (e.g. Budget(macs=0.5))")
    if not result.complete:
        raise ValueError("the scan is not complete; finish it (e.g. with --resume) before fitting a plan")
    if search not in SEARCHES:
        raise ValueError(f"search={search!r} is unknown; choose one of {', '.join(SEARCHES)}")
    if order not in ORDERS:
        raise ValueError(f"order={order!r} is unknown; choose one of {', '.join(ORDERS)}")
    if not 0.0 <= min_gain < 1.0:
        raise ValueError(f"min_gain={min_gain!r} is outside [0, 1); use a fraction of the weights such as 0.005")
    pruning = prepared_method(result.method if method is None else method, stats, criterion)
    if pruning.name != result.method:
        raise ValueError(f"method {pruning.name!r} is not the scan's ({result.method!r}); fit with the method scanned")
    ceiling = result.plan(max_drop, relative)  # also validates the tolerance
    weights = scanned_weights(model, result)
    steps = (_weights_order(result, ceiling, relative, weights, max_drop * ZERO_DROP_SHARE) if order == "weights"
             else _greedy_order(result, ceiling, relative))
    options = dict(search=search, order=order, min_gain=min_gain)
    fit = _Fit(model, evaluate, result, max_drop, relative, pruning, resume_from, on_trial)
    if confidence is not None:
        total = evaluate.num_batches() if hasattr(evaluate, "num_batches") else None
        if total is None:
            raise ValueError("confidence needs a ForwardMetric whose batches can be counted (a list or a DataLoader)")
        fit.settler = Settler(evaluate, float(result.baseline), result.higher_is_better, max_drop, confidence,
                              total, relative=relative)
    total = sum(weights.values()) or 1

    def gain(left: Sequence[Step]) -> float:
        """The most the steps ``left`` could add to the plan's fraction of weights removed."""
        top: Dict[str, float] = {}
        for layer, index in left:
            top[layer] = max(top.get(layer, 0.0), float(result.sparsities[index]))
        return sum(max(0.0, level - fit.plan[layer]) * weights[layer] for layer, level in top.items()) / total

    # Layers too small to matter are not tried at all (the smallest first, together under min_gain):
    # a trial on a small first conv costs a whole evaluation and can buy almost nothing.
    skipped: List[Step] = []
    by_layer = {layer: [step for step in steps if step[0] == layer] for layer in result.layers}
    for layer in sorted((layer for layer in result.layers if by_layer[layer]), key=lambda layer: gain(by_layer[layer])):
        if gain(skipped + by_layer[layer]) >= min_gain:
            break
        skipped += by_layer[layer]
    remaining = [step for step in steps if step not in skipped]
    with progress_bar(len(steps), "fitting the plan", progress) as tick:
        fit.tick = tick
        while remaining:
            fits, breaks = fit.steps_that_fit(remaining, one_at_a_time=search == "greedy")  # taken into fit.plan
            if not breaks:
                remaining = remaining[fits:]
                continue
            failed = remaining[fits][0]  # the first step that breaks the tolerance: its layer stays
            remaining = [step for step in remaining[fits + 1 :] if step[0] != failed]
            if remaining and gain(remaining + skipped) < min_gain:
                break
        tick.finish()
    if fit.scorer is not None:
        fit.scorer.release()
    if not any(fit.plan.values()):
        warnings.warn(
            f"fit_plan: no layer stays within max_drop={max_drop:g} at the lowest scanned level, so the plan prunes "
            "nothing; raise max_drop, scan lower levels, or check the weights (random weights rarely tolerate any)",
            stacklevel=2,
        )
    if fit.settler is not None and any(fit.plan.values()):
        # Settled trials are right with the confidence asked for: the plan kept is measured in full.
        exact = evaluate_plan(model, evaluate, fit.plan, method=pruning)
        if not within_tolerance(exact, result.baseline, result.higher_is_better, relative, max_drop):
            warnings.warn(
                f"the plan the settling fit found scores {exact:.6g} on every batch, beyond max_drop={max_drop:g}; "
                "fitting again with exact trials"
            )
            return fit_plan(model, evaluate, result, max_drop, relative, method=pruning,
                            on_trial=on_trial, progress=progress, **options)
        fit.score = float(exact)
    if fit.saved:
        # Replayed trials are a file's word: one evaluation checks the plan they lead to.
        check = evaluate_plan(model, evaluate, fit.plan, method=pruning)
        if not math.isclose(check, fit.score, rel_tol=1e-6, abs_tol=1e-9):
            warnings.warn(
                f"the saved fit's trials do not reproduce: the plan they lead to scores {check:.6g}, they "
                f"recorded {fit.score:.6g}; fitting again from the scan without them"
            )
            return fit_plan(model, evaluate, result, max_drop, relative, method=pruning,
                            on_trial=on_trial, progress=progress, **options)
    sparsity = sum(level * weights[layer] for layer, level in fit.plan.items()) / total
    return PlanFit(dict(fit.plan), fit.score, list(fit.trials), len(steps), sparsity, gain(remaining + skipped))


class _Fit:
    """The plan so far, its score, and the measurements (replayed from a saved fit first)."""

    def __init__(
        self, model: nn.Module, evaluate: Callable[[nn.Module], float], result: SensitivityResult, max_drop: float,
        relative: bool, pruning: PruningMethod,
        resume_from: Optional[Sequence[Sequence[Any]]], on_trial: Optional[Callable[[PlanFit], None]],
    ) -> None:
        self.model, self.evaluate, self.result = model, evaluate, result
        self.max_drop, self.relative, self.pruning = max_drop, relative, pruning
        self.on_trial = on_trial
        self.saved = [(str(t[0]), float(t[1]), float(t[2]), bool(t[3])) for t in (resume_from or [])]
        self.plan: Dict[str, float] = {layer: 0.0 for layer in result.layers}
        self.score = float(result.baseline)
        self.trials: List[Trial] = []
        self.scale = 1.0  # measured joint drop / the scan's summed drops, for the last measured plan
        self.tick: Any = lambda item=None: None
        self.settler: Optional[Settler] = None
        self.tolerance = Tolerance(float(result.baseline), result.higher_is_better, max_drop, relative)
        self.scorer = PlanScorer(model, evaluate, pruning) if model is not None else None
        if self.scorer is not None and hasattr(evaluate, "prepare"):
            with eval_mode(model):
                evaluate.prepare(model)  # once: every trial compares with the same dense outputs

    def _drop(self, score: float) -> float:
        return score_drop(score, self.result.baseline, self.result.higher_is_better, self.relative)

    def _summed_drop(self, plan: Mapping[str, float]) -> float:
        """The scan's single-layer drops of ``plan``'s levels, added up (a first guess at its joint drop)."""
        levels = self.result.sparsities
        total = 0.0
        for layer, level in plan.items():
            if level > 0:
                index = min(range(len(levels)), key=lambda i: abs(levels[i] - level))
                total += max(0.0, self._drop(self.result.scores[layer][index]))
        return total

    def _with(self, steps: Sequence[Step]) -> Dict[str, float]:
        plan = dict(self.plan)
        for layer, index in steps:
            plan[layer] = float(self.result.sparsities[index])
        return plan

    def _measure(self, steps: Sequence[Step]) -> Tuple[bool, float]:
        """Does the plan so far plus ``steps`` hold? Measured, or replayed from the saved fit."""
        layer, index = steps[-1]
        level = float(self.result.sparsities[index])
        plan = self._with(steps)
        if len(self.trials) < len(self.saved):
            done_layer, done_level, joint, _ = self.saved[len(self.trials)]
            if done_layer != layer or abs(done_level - level) > 1e-9:
                raise ValueError(
                    f"the saved fit tried {done_layer} at {done_level:g} where this scan and tolerance try "
                    f"{layer} at {level:g}: it belongs to another scan; start the fit over"
                )
        else:
            joint = evaluate_plan(self.model, self.evaluate, plan, method=self.pruning,
                                  settler=self.settler, scorer=self.scorer,
                                  tolerance=self.tolerance)
            if isinstance(joint, Estimate):
                joint = joint.score  # inside an interval wholly on the side of the tolerance it settled on
        kept = within_tolerance(joint, self.result.baseline, self.result.higher_is_better, self.relative, self.max_drop)
        self.trials.append((layer, level, float(joint), kept))
        summed = self._summed_drop(plan)
        if summed > 0:
            self.scale = max(self._drop(joint), 0.0) / summed
        self.tick(layer)
        if self.on_trial is not None:
            self.on_trial(PlanFit(dict(self.plan), self.score, list(self.trials)))
        return kept, float(joint)

    def _guess(self, remaining: Sequence[Step]) -> int:
        """How many of the next steps the scan predicts will fit (at least one), within :meth:`_seen`."""
        best = 1
        for count in range(1, self._seen(remaining, 0, self.score) + 1):
            if self.scale * self._summed_drop(self._with(remaining[:count])) <= self.max_drop:
                best = count
            else:
                break
        return best

    def _crowded(self, score: float) -> bool:
        """Does a plan scoring ``score`` use over half the tolerance (where unseen steps go one at a time)?"""
        return self._drop(score) > self.max_drop / 2

    def _seen(self, remaining: Sequence[Step], held: int, held_score: float) -> int:
        """How many of ``remaining``'s steps a guess may take, ``held`` of them holding with ``held_score``.

        A step whose single-layer drop the scan did not see is no evidence: a metric that counts
        (accuracy on a few hundred images) sees no drop for most steps alone, and a prediction would
        take all of them at once. While the plan uses at most half the tolerance, a guess takes such
        steps within its first layer only; once it uses more, none but its first step.
        """
        crowded = self._crowded(held_score)
        for count in range(held + 2, len(remaining) + 1):
            layer, index = remaining[count - 1]
            if self._drop(self.result.scores[layer][index]) <= 0 and (crowded or layer != remaining[held][0]):
                return count - 1
        return len(remaining)

    def _interpolate(self, held: int, held_score: float, broke: int, broke_score: float) -> int:
        """The count of steps strictly between ``held`` and ``broke`` that the line through their measured
        drops puts last within the tolerance (the joint drop grows smoothly along the order, mostly)."""
        low, high = self._drop(held_score), self._drop(broke_score)
        if not high > low:
            return (held + broke) // 2
        crossing = held + (broke - held) * (self.max_drop - low) / (high - low)
        return min(max(int(math.floor(crossing)), held + 1), broke - 1)

    def steps_that_fit(self, remaining: Sequence[Step], one_at_a_time: bool) -> Tuple[int, bool]:
        """How many of ``remaining``'s first steps fit (taken into the plan), and whether the next one breaks it.

        ``(n, True)``: the plan with the first ``n`` steps holds and the one with ``n + 1`` was measured to
        break; ``(n, False)``: ``n`` steps hold and the next are not measured yet (one step at a time, or
        none left). Assumes that adding steps never makes the joint score better; the plan kept is always
        a measured one.
        """
        held, broke = 0, None  # most steps known to hold; fewest known to break
        scores: Dict[int, float] = {}

        def attempt(count: int) -> bool:
            kept, joint = self._measure(remaining[:count])
            scores[count] = joint
            return kept

        first = 1 if one_at_a_time else self._guess(remaining)
        if attempt(first):
            held = first
            stride = first
            while not one_at_a_time and held < len(remaining):  # gallop up while plans hold
                upper = min(len(remaining), held + stride)
                if self._crowded(scores[held]):  # close to the tolerance: no unseen steps at once (doubling below)
                    upper = min(upper, self._seen(remaining, held, scores[held]))
                if attempt(upper):
                    held, stride = upper, stride * 2
                else:
                    broke = upper
                    break
        else:
            broke = first
        scores.setdefault(0, self.score)
        interpolate = not one_at_a_time
        while broke is not None and broke - held > 1:  # narrow down to the first breaking step
            middle = (held + broke) // 2
            if interpolate:
                middle = self._interpolate(held, scores[held], broke, scores[broke])
            width = broke - held
            if attempt(middle):
                held = middle
            else:
                broke = middle
            # A guess that did not halve the bracket is followed by a halving: at most twice bisection's trials.
            interpolate = not interpolate or broke - held <= width // 2
        if held:
            self.plan = self._with(remaining[:held])
            self.score = scores[held]
            if self.scorer is not None:
                self.scorer.rebase(self.plan)  # later trials add to this plan: keep its states
        return held, broke is not None


def _next_step(
    result: SensitivityResult, position: Mapping[str, int], frozen: set, ceiling: Mapping[str, float], relative: bool
) -> Optional[Tuple[str, int]]:
    """The cheapest next step (smallest single-layer drop, then scan order), or None when none is left."""
    levels = result.sparsities
    steps = []
    for order, layer in enumerate(result.layers):
        following = position[layer] + 1
        if layer in frozen or following >= len(levels) or levels[following] > ceiling[layer] + 1e-12:
            continue
        single = score_drop(result.scores[layer][following], result.baseline, result.higher_is_better, relative)
        steps.append((single, order, layer, following))
    if not steps:
        return None
    _, _, layer, following = min(steps)
    return layer, following

