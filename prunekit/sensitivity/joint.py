"""Fit a plan whose layers, pruned all together, stay within the tolerance.

A scan measures one layer at a time; pruned together, the layers' losses add
up (or worse), so the per-layer plan of :meth:`SensitivityResult.plan` can
miss the tolerance by far. :func:`fit_plan` grows a plan one level at a time,
cheapest step first, keeping a step only if the whole plan (measured with
:func:`evaluate_plan`) stays within the tolerance.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from torch import nn

from prunekit.progress import progress_bar
from prunekit.sensitivity.result import SensitivityResult, score_drop, within_tolerance
from prunekit.sensitivity.scanner import evaluate_plan

__all__ = ["PlanFit", "Trial", "fit_plan"]

Trial = Tuple[str, float, float, bool]


@dataclass(frozen=True)
class PlanFit:
    """The fitted plan and how it was found.

    Attributes:
        plan: layer -> sparsity; its joint score is within the tolerance of the baseline.
        score: the model's score with the whole plan applied.
        trials: every plan step tried, as ``(layer, sparsity, joint score, kept)``.
    """

    plan: Dict[str, float]
    score: float
    trials: List[Trial] = field(default_factory=list)


def fit_plan(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    result: SensitivityResult,
    max_drop: float,
    relative: bool = False,
    stats: Optional[Mapping[str, Any]] = None,
    *,
    criterion: str = "l2",
    resume_from: Optional[Sequence[Sequence[Any]]] = None,
    on_trial: Optional[Callable[[PlanFit], None]] = None,
    progress: bool = False,
) -> PlanFit:
    """Grow a plan from dense, cheapest step first, while the JOINT score stays within ``max_drop``.

    Each step raises one layer to its next scanned sparsity, never above the
    layer's own :meth:`SensitivityResult.plan` level; the step whose single-layer
    drop is smallest is tried first. A step that breaks the tolerance is undone
    and that layer stays where it is. At most one evaluation of the whole plan
    per scanned point; the model is restored exactly after each.

    Args:
        model: the dense model that was scanned.
        evaluate: the metric used for the scan.
        result: the finished scan.
        max_drop, relative: the tolerance, as for :meth:`SensitivityResult.plan`.
        stats, criterion: for channel scans, as for :func:`prunekit.sensitivity.scan`.
        resume_from: the ``trials`` of an interrupted fit of the same scan and tolerance; they are
            replayed without evaluating (a fit is deterministic), then the fit goes on. The plan
            they lead to is evaluated once at the end: trials that do not reproduce it (a
            tampered or stale file) are dropped with a warning and the fit starts over.
        on_trial: called with the fit so far after every trial (e.g. to save ``trials``).
        progress: show a progress bar (its length is the most trials the fit can take).

    Raises:
        ValueError: an incomplete scan, a bad tolerance, or ``resume_from`` trials that this
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
    if not result.complete:
        raise ValueError("the scan is not complete; finish it (e.g. with --resume) before fitting a plan")
    ceiling = result.plan(max_drop, relative)  # also validates the tolerance
    levels = result.sparsities
    position = {layer: -1 for layer in result.layers}  # index into levels; -1 = dense
    frozen = set()
    plan = {layer: 0.0 for layer in result.layers}
    score = float(result.baseline)
    trials: List[Trial] = []
    saved = [(str(t[0]), float(t[1]), float(t[2]), bool(t[3])) for t in (resume_from or [])]
    most = sum(sum(1 for level in levels if level <= ceiling[layer] + 1e-12) for layer in result.layers)
    with progress_bar(most, "fitting the plan", progress) as tick:
        while True:
            step = _next_step(result, position, frozen, ceiling, relative)
            if step is None:
                break
            layer, following = step
            trial = dict(plan, **{layer: float(levels[following])})
            if len(trials) < len(saved):
                done_layer, done_level, joint, _ = saved[len(trials)]
                if done_layer != layer or abs(done_level - levels[following]) > 1e-9:
                    raise ValueError(
                        f"the saved fit tried {done_layer} at {done_level:g} where this scan and tolerance try "
                        f"{layer} at {levels[following]:g}: it belongs to another scan; start the fit over"
                    )
            else:
                joint = evaluate_plan(model, evaluate, trial, method=result.method, stats=stats, criterion=criterion)
            kept = within_tolerance(joint, result.baseline, result.higher_is_better, relative, max_drop)
            trials.append((layer, float(levels[following]), float(joint), kept))
            if kept:
                plan, score, position[layer] = trial, joint, following
            else:
                frozen.add(layer)
            tick(layer)
            if on_trial is not None:
                on_trial(PlanFit(dict(plan), score, list(trials)))
        if len(trials) < most:
            tick.finish()
    if not any(plan.values()):
        warnings.warn(
            f"fit_plan: no layer stays within max_drop={max_drop:g} at the lowest scanned level, so the plan prunes "
            "nothing; raise max_drop, scan lower levels, or check the weights (random weights rarely tolerate any)",
            stacklevel=2,
        )
    if saved:
        # Replayed trials are a file's word: one evaluation checks the plan they lead to.
        check = evaluate_plan(model, evaluate, plan, method=result.method, stats=stats, criterion=criterion)
        if not math.isclose(check, score, rel_tol=1e-6, abs_tol=1e-9):
            warnings.warn(
                f"the saved fit's trials do not reproduce: the plan they lead to scores {check:.6g}, they "
                f"recorded {score:.6g}; fitting again from the scan without them"
            )
            return fit_plan(model, evaluate, result, max_drop, relative, stats, criterion=criterion,
                            on_trial=on_trial, progress=progress)
    return PlanFit(plan, score, trials)


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

