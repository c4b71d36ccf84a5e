"""A scan from start to plan in one call: what ``prunekit scan`` does, for Python users and for the CLI alike.

:func:`run_scan` takes a model and its evaluation batches, and does the rest: shuffles the
batches once when points settle early, builds the metric, prepares the method on the batches
(activation statistics, gradients), fingerprints weights and data, scans (saving every point
in a :class:`~prunekit.sensitivity.folder.ScanFolder` and resuming from one), reads the
per-layer plan, measures it with all its layers pruned, fits the joint plan (to the tolerance,
or to a :class:`~prunekit.planning.Budget` of MACs or parameters), and checks on a copy that
``compact`` can shrink a channel plan. The model is left as it was.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> run = run_scan(model, [torch.randn(2, 3, 16, 16)], sparsities=(0.5, 0.9), max_drop=1.0, progress=False)
    >>> run.result.metric, sorted(run.plan)
    ('distortion', ['0', '2'])
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from prunekit.methods.base import PruningMethod
from prunekit.methods.registry import get_method
from prunekit.planning import fit as plan_fit  # read as plan_fit.fit_plan: what a test may replace
from prunekit.planning.budget import Budget, check_reachable, smallest_cost, timed_costs
from prunekit.planning.latency import cache_folder
from prunekit.sensitivity.distributed import is_main_process
from prunekit.sensitivity.folder import FIT_FORMAT
from prunekit.sensitivity.metrics import Accuracy, OutputDistortion
from prunekit.sensitivity.result import DEFAULT_SPARSITIES, SensitivityResult

__all__ = ["DEFAULT_MAX_DROP", "ScanInterrupted", "ScanRun", "fit_plan_in_folder", "run_scan"]

#: The tolerance by metric when none is given: one accuracy point, or 5 % relative output distortion.
DEFAULT_MAX_DROP = {"accuracy": 0.01, "distortion": 0.05}


class ScanInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run_scan`; ``stage`` says where: ``"scan"`` (points saved) or ``"fit"`` (trials saved)."""

    def __init__(self, stage: str) -> None:
        super().__init__(stage)
        self.stage = stage


@dataclass
class ScanRun:
    """What :func:`run_scan` measured and decided.

    Attributes:
        result: the scan.
        method: the method scanned, prepared (it owns the data its scores came from).
        metric: the metric object the points were scored by.
        max_drop, relative, joint: the tolerance and whether the plan was fitted jointly.
        plan: the plan to apply (joint, or the per-layer one) and ``score``, its measured score with every layer pruned.
        per_layer_plan, per_layer_score: each layer's own highest level within the tolerance, and its joint score.
        fit: the :class:`~prunekit.planning.fit.PlanFit` (None without ``joint``).
        compaction_problem: for a channel plan, why ``compact`` would not shrink it (None: it would, or not checked).
        budget: what the plan was fitted to (None: the tolerance); ``fit`` is then a
            :class:`~prunekit.planning.budget.BudgetFit` with the plan's costs.
    """

    result: SensitivityResult
    method: PruningMethod
    metric: Any
    max_drop: float
    relative: bool
    joint: bool
    plan: Dict[str, float]
    score: float
    per_layer_plan: Dict[str, float]
    per_layer_score: float
    fit: Any = None
    compaction_problem: Optional[str] = None
    data_description: Optional[str] = None
    budget: Optional[Budget] = None

    def costs(self) -> Optional[Dict[str, Any]]:
        """The budget fit's costs, JSON-ready (None without a budget)."""
        fit = self.fit
        if self.budget is None or fit is None:
            return None

        def cost(value: Any) -> Optional[Dict[str, Any]]:
            if value is None:
                return None
            return {"params": value.params, "macs": value.macs,
                    **({"seconds": value.seconds} if value.seconds is not None else {})}

        timed = {}
        if fit.speedup is not None:
            timed = {"speedup": {"ratio": fit.speedup.ratio, "interval": [fit.speedup.low, fit.speedup.high]},
                     "timing": fit.timing, "corrections": fit.corrections,
                     "widened": {group: list(pair) for group, pair in fit.widened.items()}, "widths": fit.widths}
        return {"budget": self.budget.targets(), "dense": cost(fit.dense), "plan": cost(fit.cost),
                "measured": cost(fit.measured), "dense_hardware": fit.dense_hardware,
                "predicted_drop": fit.predicted_drop, "drop": fit.drop, "shape": fit.shape,
                "candidates": fit.candidates, **timed}

    def write(self, folder: Any, context: Mapping[str, Any], warn: Callable[[str], None] = lambda message: None,
              ) -> Dict[str, str]:
        """Write scan.json, scan.csv, sensitivity.png and plan.json into ``folder`` (a ScanFolder); their paths.

        ``context``: what ``prunekit prune --plan`` reads back (model, weights, data, sizes, seed).
        """
        from prunekit import __version__

        result = self.result
        return folder.write(
            result, self.plan, context, max_drop=self.max_drop, relative=self.relative, joint=self.joint, warn=warn,
            method=self.method.name, criterion=self.method.options.get("criterion"),
            statistics=self.method.describe_data(self.data_description or "the scan's data"),
            data_description=self.data_description, metric=result.metric, higher_is_better=result.higher_is_better,
            baseline=result.baseline, score_with_plan=self.score, per_layer_plan=self.per_layer_plan,
            score_with_per_layer_plan=self.per_layer_score, prunekit=__version__,
            **({"budget": self.costs()} if self.budget is not None else {}),
        )


def scan_metric(batches: Sequence[Any], labelled: bool, metric: Optional[str] = None) -> Any:
    """The metric by name (default: accuracy for labelled batches, else output distortion).

    Raises:
        ValueError: an unknown name, or accuracy without labels.
    """
    name = metric or ("accuracy" if labelled else "distortion")
    if name == "accuracy":
        if not labelled:
            raise ValueError("metric='accuracy' needs labelled batches ((inputs, labels) pairs); use 'distortion'")
        return Accuracy(list(batches))
    if name == "distortion":
        return OutputDistortion([b[0] if isinstance(b, (tuple, list)) else b for b in batches])
    raise ValueError(f"metric={metric!r} is unknown; choose accuracy or distortion")


def run_scan(
    model: nn.Module,
    batches: Sequence[Any],
    *,
    labelled: Optional[bool] = None,
    metric: Optional[str] = None,
    method: Union[str, PruningMethod] = "fine-grained",
    layers: Optional[Iterable[str]] = None,
    sparsities: Iterable[float] = DEFAULT_SPARSITIES,
    max_drop: Optional[float] = None,
    relative: bool = False,
    budget: Optional[Budget] = None,
    confidence: Optional[float] = None,
    seed: int = 0,
    stack_levels: Union[bool, str] = "auto",
    joint: bool = True,
    folder: Any = None,
    resume_from: Optional[SensitivityResult] = None,
    resume_fit: bool = False,
    options: Optional[Mapping[str, Any]] = None,
    meta: Optional[Mapping[str, Any]] = None,
    check_compaction: bool = True,
    data_description: Optional[str] = None,
    progress: bool = True,
    on_status: Callable[[str], None] = lambda message: None,
) -> ScanRun:
    """Scan ``model`` on ``batches``, fit a plan and check it; see the module docstring.

    Args:
        model: the dense model (left as it was).
        batches: tensors, or ``(inputs, labels)`` pairs; shuffled once with ``seed`` when ``confidence``
            is given (settling reads the first batches as a random sample).
        labelled: whether the batches carry labels (default: whether the first one is a pair).
        metric: ``"accuracy"`` or ``"distortion"`` (default: accuracy with labels, else distortion).
        method: a name or a method object; one that needs data is prepared on ``batches`` unless
            it already owns data.
        layers, sparsities, confidence, stack_levels: as for :func:`prunekit.sensitivity.scan`.
        max_drop, relative: the tolerance (default :data:`DEFAULT_MAX_DROP` for the metric).
        budget: fit the plan to this :class:`~prunekit.planning.Budget` instead; ``max_drop``, when
            given, must hold too (:class:`~prunekit.planning.BudgetError` otherwise). A budget no plan
            over ``sparsities`` can meet is refused before the scan.
        joint: fit the plan with all its layers pruned together (:func:`prunekit.planning.fit_plan`);
            else the per-layer plan.
        folder: a :class:`~prunekit.sensitivity.folder.ScanFolder` that keeps every point and trial
            (for resuming); ``resume_from``: its partial scan (refused when ``options`` differ from its
            own); ``resume_fit``: replay the fit's trials saved under the same options and tolerance.
        options: what the caller asked for (recorded in ``result.meta["options"]``), to which the
            weights' and the data's fingerprints are added: a resume with other weights or data fails.
        meta: stored in ``result.meta`` besides the options.
        check_compaction: for a channel method, check on a copy whether ``compact`` shrinks the plan.
        data_description: what the batches are, for the status line and ``result.meta["data"]``.
        on_status: hears one-line status messages (``print`` for a terminal).

    Raises:
        ScanInterrupted: Ctrl-C; what was measured is in ``folder``.
        BudgetError: ``budget`` is out of reach, or its plan is beyond ``max_drop``.
    """
    from prunekit.fingerprint import data_fingerprint, model_fingerprint
    from prunekit.sensitivity import evaluate_plan, scan  # the package's names (what a test may replace)

    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: pass at least one batch to score the model on")
    if labelled is None:
        labelled = isinstance(batches[0], (tuple, list)) and len(batches[0]) > 1
    if confidence is not None:
        random.Random(seed).shuffle(batches)
    evaluate = scan_metric(batches, labelled, metric)
    recorded = dict(options or {})
    # What the points were measured on: a resume with other weights or data starts over.
    recorded["fingerprint"] = {"weights": model_fingerprint(model), "data": data_fingerprint(batches)}
    if resume_from is not None and folder is not None:
        folder.check_resumable(resume_from, recorded)
        on_status(f"resuming: {resume_from.num_done} points already measured")
    elif folder is not None and folder.holds_a_partial_scan():
        on_status(f"note: replacing the partial scan in {folder.scan_file} (use --resume to continue it)")
    tolerance = DEFAULT_MAX_DROP[evaluate.name] if max_drop is None else float(max_drop)
    if relative and evaluate.name == "distortion":
        raise ValueError("a relative tolerance divides by the dense score, and the dense model's distortion is 0: "
                         "drop --relative (relative=True); the tolerance is then an absolute distortion, e.g. 0.05")
    pruning = get_method(method)
    convs = list(pruning.layers_of(model, layers))
    blocks = pruning.blocks(model, convs)
    what = f"{len(convs)} layers" if len(blocks) == len(convs) else (
        f"{len(blocks)} channel groups of {len(convs)} conv layers")
    levels = list(sparsities)
    data = f"data: {data_description}; " if data_description else ""
    on_status(f"{data}metric: {evaluate.name}; {what} x {len(levels)} levels")
    if pruning.needs_data and pruning.data is None:
        pruning = pruning.prepare(model, batches, layers=None if layers is None else convs, progress=progress)
    costs = None
    input_size = tuple(int(v) for v in (batches[0][0] if isinstance(batches[0], (tuple, list)) else batches[0]).shape[1:])
    if budget is not None:
        if not joint:
            raise ValueError("a budget is met by the plan with every layer pruned together: drop --per-layer (joint=False)")
        if budget.timed:  # the latency model is measured (or read from the cache) once, before the scan
            on_status(f"timing {type(model).__name__}'s layers on this machine (batch {budget.batch}, "
                      f"{torch.get_num_threads()} thread(s); cached in {cache_folder()})")
            costs = timed_costs(model, pruning, list(blocks), input_size, progress=progress, batch=budget.batch)
        check_reachable(budget, *smallest_cost(model, pruning, list(blocks), levels, input_size, costs=costs),
                        "with every layer at its highest level")
    try:
        result = scan(model, evaluate, layers=None if layers is None else convs, sparsities=levels, method=pruning, progress=progress,
                      resume_from=resume_from, on_point=None if folder is None else folder.save_scan,
                      confidence=confidence, max_drop=tolerance, relative=relative, stack_levels=stack_levels,
                      meta={"options": recorded, **dict(meta or {}),
                            **({"data": data_description} if data_description else {})})
    except KeyboardInterrupt as interrupt:
        raise ScanInterrupted("scan") from interrupt
    per_layer = result.plan(tolerance, relative=relative)
    fitted = None
    try:
        # Per-layer tolerances do not add up to a guarantee: measure the whole plan once.
        per_layer_score = evaluate_plan(model, evaluate, per_layer, method=pruning)
        if budget is not None:
            on_status(f"fitting the plan to the budget ({budget}), costs counted on the compacted model")
            fitted = plan_fit.fit_plan(model, evaluate, result, max_drop, relative, budget=budget,
                                       input_size=input_size, method=pruning, costs=costs)
        elif joint:
            on_status("fitting the plan so that all its layers pruned together stay within the tolerance")
            options = dict(relative=relative, method=pruning, progress=progress, confidence=confidence)
            if folder is not None:
                fitted = fit_plan_in_folder(
                    folder, model, evaluate, result, tolerance, key=fit_key_of(recorded, tolerance, relative), resume=resume_fit,
                    on_resume=lambda count: on_status(f"resuming the plan fit: {count} trials already measured"),
                    **options)
            else:
                fitted = plan_fit.fit_plan(model, evaluate, result, tolerance, **options)
    except KeyboardInterrupt as interrupt:
        raise ScanInterrupted("fit") from interrupt
    plan, score = (fitted.plan, fitted.score) if fitted is not None else (per_layer, per_layer_score)
    problem = None
    if check_compaction and pruning.unit == "channels" and any(plan.values()):
        problem = compaction_problem_of(model, plan, pruning)
    return ScanRun(result, pruning, evaluate, tolerance, relative, joint, dict(plan), float(score), per_layer,
                   float(per_layer_score), fitted, problem, data_description, budget)


def compaction_problem_of(model: nn.Module, plan: Mapping[str, float], method: Any) -> Optional[str]:
    """Why ``compact`` would refuse the model this channel ``plan`` gives (checked on a copy), or None."""
    from prunekit.compact import compaction_problem
    from prunekit.plans import apply_plan, copy_model

    return compaction_problem(apply_plan(copy_model(model), plan, method=method))


def fit_key_of(options: Mapping[str, Any], max_drop: float, relative: bool) -> Dict[str, Any]:
    """What makes two plan fits the same (their trials replayable): the scan's options, the tolerance, the search."""
    return {"options": dict(options), "max_drop": max_drop, "relative": relative,
            "fit": {"order": "weights", "min_gain": plan_fit.DEFAULT_MIN_GAIN, "revision": plan_fit.SEARCH_REVISION}}


def fit_plan_in_folder(
    folder: Any, model: nn.Module, evaluate: Callable[[nn.Module], float], result: SensitivityResult, max_drop: float,
    *, key: Mapping[str, Any], relative: bool = False, method: Any = None, resume: bool = False, progress: bool = False,
    on_resume: Optional[Callable[[int], None]] = None, confidence: Optional[float] = None,
) -> Any:
    """:func:`~prunekit.planning.fit_plan`, saving every trial in ``folder``'s ``fit.json`` under ``key``.

    With ``resume``, the trials saved under the same ``key`` are replayed (and the plan they
    lead to checked by one evaluation); ``on_resume(count)`` hears how many. Under
    ``torch.distributed`` rank 0 alone writes.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from prunekit.sensitivity import OutputDistortion, scan
        >>> from prunekit.sensitivity.folder import ScanFolder
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> metric = OutputDistortion(torch.randn(2, 3, 16, 16))
        >>> folder = ScanFolder("results")
        >>> result = scan(model, metric, progress=False, on_point=folder.save_scan)
        >>> fit = fit_plan_in_folder(folder, model, metric, result, max_drop=0.5, key={"run": 1})
        >>> folder.fit_file.is_file()
        True
    """
    from prunekit.io.files import write_json

    saved = folder.saved_trials(key) if resume else None
    if saved and on_resume is not None:
        on_resume(len(saved))

    def save(partial: Any) -> None:
        if is_main_process():
            write_json(folder.fit_file, {"format": FIT_FORMAT, "key": dict(key), "trials": partial.trials})

    return plan_fit.fit_plan(model, evaluate, result, max_drop, relative=relative, method=method,
                             resume_from=saved, on_trial=save, progress=progress and is_main_process(),
                             confidence=confidence)
