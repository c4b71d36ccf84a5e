"""Prune to a budget in stages: scan, fit a share of the budget, prune, compact, recover; again, on the smaller model.

One-shot pruning to a high ratio loses what a short recovery cannot win back: every layer
is cut at once, judged on the dense model's sensitivities. :func:`prune_in_stages` reaches the
budget in ``steps`` stages instead. Each stage scans the model as it now is (the compacted,
recovered model of the stage before), fits its share of what is left of the budget (an equal
geometric share: a MACs budget of 1/4 in two stages keeps 1/2 of the MACs, then 1/2 of what is
left), prunes, compacts (so the next scan runs on the smaller model, and its levels are
fractions of the channels still there) and, given ``recover``, recovers by distilling the
original dense model into it. What is left is measured after every stage (MACs and parameters
counted on the compacted model; a speed-up measured by timing it), so a stage that overshoots
or falls short is made up by the next.

Rescanning: with ``rescan="changed"`` a stage measures again only the groups the stage
before pruned (their channels changed); a group left whole keeps its curve, shifted by how much
the dense score moved. ``rescan="all"`` measures every group every stage.

Everything is kept in ``folder`` as it happens: each stage's scan (``stage-K/scan.json``, saved
point by point), its compacted, recovered model (``stage-K/model.pt``, a compacted checkpoint:
no pickled code) and the record of the stages done (``stages.json``). ``resume=True`` continues
after the last stage done, and inside a stage from its last scan point.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from prunekit.planning import Budget
    >>> model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 3))
    >>> run = prune_in_stages(model, [torch.randn(4, 3, 16, 16)], Budget(macs=0.4), steps=2, method="filter-norm",
    ...                       progress=False)
    >>> len(run.stages), run.macs <= 0.4 * 1.02
    (2, True)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from prunekit.methods.base import PruningMethod
from prunekit.methods.registry import get_method
from prunekit.planning.budget import Budget, timed_costs
from prunekit.sensitivity.result import DEFAULT_SPARSITIES, SensitivityResult

__all__ = ["STAGES_FORMAT", "Stage", "StagedRun", "StagesInterrupted", "prune_in_stages", "stage_budget"]

#: The ``format`` field of ``stages.json``.
STAGES_FORMAT = "prunekit.stages/1"
#: How close to 1 a stage's share must come to count as nothing left to prune.
_MET = 1e-6


class StagesInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`prune_in_stages`: ``stage`` (1-based) and ``during`` (``"scan"``, ``"fit"``, ``"recovery"``).

    The stages before ``stage`` are saved, and the scan points of this one; ``resume=True`` goes on.
    """

    def __init__(self, stage: int, during: str) -> None:
        super().__init__(f"stage {stage}: {during}")
        self.stage, self.during = stage, during


@dataclass
class Stage:
    """One stage of :func:`prune_in_stages`.

    Attributes:
        index: 1-based.
        budget: what this stage was fitted to, as fractions of (or a speed-up over) its own input model
            (``{}``: the budget was already met, nothing was pruned).
        plan: the plan it applied, on its input model's groups (levels: fractions of their channels then).
        macs, params: what is left after it, as fractions of the original dense model's.
        speedup: with a time budget, the speed-up over the original dense model so far (the product of
            each stage's measured speed-up); else None.
        score_pruned, score: the score on the scan's data, against the original dense model (distortion: its
            outputs; accuracy: the labels), right after pruning and after recovery.
        rescanned: how many groups this stage scanned, of ``groups``.
        recovery: what the recovery returned, JSON-ready (e.g. its best held-out distortion), or None.
    """

    index: int
    budget: Dict[str, float]
    plan: Dict[str, float]
    macs: float
    params: float
    speedup: Optional[float]
    score_pruned: float
    score: float
    rescanned: int
    groups: int
    recovery: Optional[Dict[str, Any]] = None

    @classmethod
    def from_dict(cls, entry: Any, source: str) -> "Stage":
        try:
            return cls(**entry)
        except TypeError as err:
            raise ValueError(f"{source} holds a stage that prunekit cannot read ({err}); start over without resume") from None


@dataclass
class StagedRun:
    """What :func:`prune_in_stages` built.

    Attributes:
        model: the compacted, recovered model after the last stage.
        stages: every stage, in order.
        budget: the overall budget; ``metric`` the score's name and ``baseline`` the dense model's score.
        macs, params, speedup: what is left after the last stage (see :class:`Stage`).
    """

    model: nn.Module
    stages: List[Stage]
    budget: Budget
    metric: str
    baseline: float
    higher_is_better: bool
    folder: Optional[Path] = None

    @property
    def macs(self) -> float:
        return self.stages[-1].macs if self.stages else 1.0

    @property
    def params(self) -> float:
        return self.stages[-1].params if self.stages else 1.0

    @property
    def speedup(self) -> Optional[float]:
        return self.stages[-1].speedup if self.stages else None

    def to_dict(self) -> Dict[str, Any]:
        return {"budget": self.budget.targets(), "metric": self.metric, "baseline": self.baseline,
                "higher_is_better": self.higher_is_better, "stages": [asdict(stage) for stage in self.stages]}

    def table(self) -> str:
        """The stages as a text table: budget share, what is left, score before and after recovery."""
        from prunekit.tables import format_table

        timed = any(stage.speedup is not None for stage in self.stages)
        header = ["stage", "share of its input", "MACs", "params", *(["speed-up"] if timed else []),
                  f"{self.metric} pruned", "recovered", "scanned"]
        rows: List[List[object]] = [header]
        for stage in self.stages:
            share = ", ".join(f"{kind} {value:.3g}" if kind != "speedup" else f"{value:.3g}x"
                              for kind, value in stage.budget.items()) or "met: none"
            rows.append([stage.index, share, f"{stage.macs:.3f}", f"{stage.params:.3f}",
                         *([f"{stage.speedup:.2f}x" if stage.speedup is not None else "-"] if timed else []),
                         f"{stage.score_pruned:.4f}", f"{stage.score:.4f}", f"{stage.rescanned}/{stage.groups}"])
        lines, rule = format_table(rows, left=2)
        dense = f"dense {self.metric}: {self.baseline:.4f}; MACs and params as fractions of the dense model's"
        return "\n".join([lines[0], rule, *lines[1:], dense])


def stage_budget(budget: Budget, reached: Mapping[str, float], stages_left: int) -> Dict[str, float]:
    """The next stage's budget, relative to its input model: an equal geometric share of what is left.

    ``reached``: ``macs`` and ``params`` as fractions of the dense model's, ``speedup`` over it, so far.
    A limit already met is left out; ``{}``: all are met.

    Example:
        >>> stage_budget(Budget(macs=0.25), {"macs": 1.0, "params": 1.0, "speedup": 1.0}, 2)
        {'macs': 0.5}
        >>> stage_budget(Budget(macs=0.25), {"macs": 0.55, "params": 0.6, "speedup": 1.0}, 1)
        {'macs': 0.45454545454545453}
    """
    if stages_left < 1:
        raise ValueError(f"stages_left={stages_left} must be >= 1")
    share: Dict[str, float] = {}
    for kind in ("macs", "params"):
        target = getattr(budget, kind)
        if target is not None:
            part = (target / reached[kind]) ** (1 / stages_left)
            if part < 1 - _MET:
                share[kind] = part
    if budget.speedup is not None:
        part = (budget.speedup / reached["speedup"]) ** (1 / stages_left)
        if part > 1 + _MET:
            share["speedup"] = part
    return share


def _checked(budget: Any, steps: Any, rescan: str, pruning: PruningMethod) -> None:
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a prunekit.planning.Budget, got {type(budget).__name__}; e.g. Budget(macs=0.5)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an int >= 1 (1: prune at once)")
    if rescan not in ("changed", "all"):
        raise ValueError(f"rescan={rescan!r} must be 'changed' or 'all'")
    if pruning.unit != "channels":
        raise ValueError(f"method {pruning.name!r} leaves its zeros in place: pruning in stages compacts the model "
                         "between stages, so it needs a channel method (channel, filter-norm, taylor)")


class _Folder:
    """``folder``'s files: ``stages.json`` (the key and the stages done) and one folder per stage."""

    def __init__(self, path: Optional[Union[str, Path]]) -> None:
        self.path = None if path is None else Path(path)

    @property
    def record(self) -> Optional[Path]:
        return None if self.path is None else self.path / "stages.json"

    def stage(self, index: int) -> Optional[Path]:
        return None if self.path is None else self.path / f"stage-{index}"

    def done(self, key: Mapping[str, Any]) -> List[Stage]:
        """The stages saved under ``key`` (refusing another run's)."""
        from prunekit.io.files import read_json
        from prunekit.sensitivity.folder import options_differ

        if self.record is None or not self.record.is_file():
            return []
        document = read_json(self.record)
        if not isinstance(document, dict) or document.get("format") != STAGES_FORMAT:
            raise ValueError(f"{self.record} is not a prunekit stages record; choose another folder, or start over "
                             "without resume")
        differences = options_differ(document.get("key", {}), dict(key))
        if differences:
            raise ValueError(f"resume: the stages in {self.record} were run with other options: "
                             + "; ".join(differences) + ". Rerun with the same options, or start over without resume")
        return [Stage.from_dict(entry, str(self.record)) for entry in document.get("stages", [])]

    def save(self, key: Mapping[str, Any], stages: Sequence[Stage]) -> None:
        from prunekit.io.files import write_json
        from prunekit.sensitivity.distributed import is_main_process

        if self.record is not None and is_main_process():
            write_json(self.record, {"format": STAGES_FORMAT, "key": dict(key),
                                     "stages": [asdict(stage) for stage in stages]})


def _judge(batches: Sequence[Any], labelled: bool, metric: Optional[str], dense: nn.Module) -> Any:
    """The score against the original dense model (distortion: its outputs are the reference)."""
    from prunekit.planning.pipeline import scan_metric

    judge = scan_metric(batches, labelled, metric)
    prepare = getattr(judge, "prepare", None)
    if prepare is not None:
        prepare(dense)
    return judge


def _carried(previous: SensitivityResult, changed: Sequence[str], groups: Sequence[str], shift: float,
             options: Mapping[str, Any]) -> SensitivityResult:
    """``previous``'s curves of the groups left whole, shifted by ``shift``; the others to measure again."""
    levels = len(previous.sparsities)
    scores = {}
    for group in groups:
        old = previous.scores.get(group)
        keep = group not in changed and old is not None and all(value is not None for value in old)
        scores[group] = [value + shift for value in old] if keep else [None] * levels
    return SensitivityResult(previous.metric, previous.higher_is_better, None, previous.sparsities, scores,
                             method=previous.method, meta={"options": dict(options)})


def prune_in_stages(
    model: nn.Module,
    batches: Sequence[Any],
    budget: Budget,
    steps: int,
    *,
    method: Union[str, PruningMethod] = "channel",
    recover: Optional[Callable[[nn.Module, nn.Module], Any]] = None,
    folder: Optional[Union[str, Path]] = None,
    resume: bool = False,
    labelled: Optional[bool] = None,
    metric: Optional[str] = None,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    max_drop: Optional[float] = None,
    rescan: str = "changed",
    arch: Optional[str] = None,
    options: Optional[Mapping[str, Any]] = None,
    progress: bool = True,
    on_status: Callable[[str], None] = lambda message: None,
) -> StagedRun:
    """Reach ``budget`` in ``steps`` stages of scan, fit, prune, compact and recovery; see the module docstring.

    Args:
        model: the dense model (left as it was).
        batches: the scan's data (tensors, or ``(inputs, labels)`` pairs), as for
            :func:`~prunekit.planning.run_scan`; the stages' scores are measured on it.
        budget: the overall :class:`~prunekit.planning.Budget`; a latency is turned into the speed-up
            it needs over the dense model, predicted by the per-layer latency model.
        steps: how many stages (1: at once, as ``run_scan`` with the budget, compacted and recovered).
        method: a channel method (name or object; one that needs data is prepared again on every
            stage's model).
        recover: called as ``recover(student, teacher)`` after each stage with the compacted model
            (trained in place) and the original dense model (e.g. a distillation with
            :func:`prunekit.training.recover.recover`); None: no recovery. A returned object with
            ``interrupted`` set counts as Ctrl-C.
        folder: where the stages are kept (None: nowhere, no resume).
        resume: continue the run saved in ``folder`` (refused when its options differ).
        labelled, metric, sparsities, max_drop: as for :func:`~prunekit.planning.run_scan` (each stage's
            tolerance, when given, must hold on that stage).
        rescan: ``"changed"`` (the groups the stage before pruned) or ``"all"``.
        arch: the spec that rebuilds ``model``'s architecture, recorded in every stage's model file.
        options: recorded with the stages (what a resume must match), besides the budget, the steps and
            fingerprints of the weights and the data.

    Raises:
        StagesInterrupted: Ctrl-C; what was done is in ``folder``.
        BudgetError: a stage's share is out of reach of its scan (or beyond ``max_drop``).
    """
    from prunekit.compact import compact
    from prunekit.io.compacted import rebuild_compacted, save_compacted
    from prunekit.fingerprint import data_fingerprint, model_fingerprint
    from prunekit.planning.costs import measured_costs
    from prunekit.planning.pipeline import ScanInterrupted, run_scan
    from prunekit.plans import apply_plan
    from prunekit.reparametrization import copy_model
    from prunekit.sensitivity.folder import ScanFolder

    pruning = get_method(method)
    _checked(budget, steps, rescan, pruning)
    pruning = pruning.with_data(None)  # each stage gathers its own statistics
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: pass at least one batch to score the model on")
    if labelled is None:
        labelled = isinstance(batches[0], (tuple, list)) and len(batches[0]) > 1
    first = batches[0][0] if isinstance(batches[0], (tuple, list)) else batches[0]
    input_size = tuple(int(v) for v in first.shape[1:])
    example = first[:1]
    dense = copy_model(model).eval()
    judge = _judge(batches, labelled, metric, dense)
    baseline = float(judge(dense))
    dense_cost = measured_costs(dense, input_size)
    speedup_target = budget.speedup
    if budget.latency is not None:  # a latency is the speed-up it needs, as the latency model predicts it
        costs = timed_costs(dense, pruning, list(pruning.blocks(dense, pruning.layers_of(dense))),
                            input_size, progress=progress, batch=budget.batch)
        needed = costs.dense.seconds / budget.latency
        speedup_target = max(speedup_target or 1.0, needed)
        on_status(f"latency <= {budget.latency * 1e3:g} ms needs a {needed:.2f}x speed-up (the dense model: "
                  f"{costs.dense.seconds * 1e3:.3g} ms predicted)")
    speedup_target = speedup_target if (speedup_target or 0) > 1 else None  # a latency already met needs none
    if not (budget.macs or budget.params or speedup_target):
        raise ValueError(f"the budget ({budget}) is already met by the dense model: nothing to prune")
    overall = Budget(macs=budget.macs, params=budget.params, speedup=speedup_target,
                     batch=budget.batch if speedup_target else 1, round_widths=budget.round_widths)
    key = {"options": dict(options or {}), "budget": budget.targets(), "steps": steps, "method": pruning.name,
           "criterion": pruning.options.get("criterion"), "sparsities": [float(s) for s in sparsities],
           "max_drop": max_drop, "rescan": rescan,
           "fingerprint": {"weights": model_fingerprint(model), "data": data_fingerprint(batches)}}
    store = _Folder(folder)
    stages = store.done(key) if resume else []
    current = dense
    if stages:
        saved = store.stage(len(stages)) / "model.pt"
        current = rebuild_compacted(copy_model(dense), torch.load(saved, map_location="cpu", weights_only=True),
                                    saved).to(next(dense.parameters()).device).eval()
        on_status(f"resuming after stage {len(stages)} of {steps} ({saved})")
    previous: Optional[SensitivityResult] = None
    if stages and rescan == "changed" and store.stage(len(stages)) is not None:
        scan_file = store.stage(len(stages)) / "scan.json"
        previous = SensitivityResult.from_json(scan_file) if scan_file.is_file() else None
    for index in range(len(stages) + 1, steps + 1):
        reached = {"macs": stages[-1].macs if stages else 1.0, "params": stages[-1].params if stages else 1.0,
                   "speedup": (stages[-1].speedup or 1.0) if stages else 1.0}
        share = stage_budget(overall, reached, steps - index + 1)
        timed_at = {"batch": overall.batch} if "speedup" in share and overall.batch != 1 else {}
        if "speedup" in share:
            timed_at["round_widths"] = overall.round_widths
        convs = pruning.layers_of(current)
        groups = list(pruning.blocks(current, convs))
        if not share:
            on_status(f"stage {index} of {steps}: the budget is already met; nothing to prune")
            last = stages[-1]
            stages.append(Stage(index, {}, {}, last.macs, last.params, last.speedup, last.score, last.score, 0,
                                len(groups)))
            store.save(key, stages)
            continue
        stage_folder = store.stage(index)
        scan_folder = None if stage_folder is None else ScanFolder(stage_folder)
        scan_options = {"stage": index, "of": steps}
        changed = [group for group, level in (stages[-1].plan.items() if stages else ()) if level > 0]
        start = None  # the curves carried over from the stage before, the rest to measure
        if previous is not None and rescan == "changed":
            shift = float(_judge(batches, labelled, metric, current)(current)) - float(previous.baseline)
            recorded = {**scan_options, "fingerprint": {"weights": model_fingerprint(current),
                                                        "data": data_fingerprint(batches)}}
            start = _carried(previous, changed, groups, shift, recorded)
            start = start if start.num_done else None  # every group changed: a fresh scan
        rescanned = len(groups) if start is None else sum(
            1 for values in start.scores.values() if any(value is None for value in values))
        partial = resume and scan_folder is not None and scan_folder.scan_file.is_file()
        resume_from = scan_folder.partial_scan() if partial else start  # a partial scan holds the carried points too
        carried = resume_from is start and start is not None  # run_scan's "resuming" note would mislead then
        on_status(f"stage {index} of {steps}: fitting {Budget(**share, **timed_at)} of the model as it is now "
                  f"(scanning {rescanned} of {len(groups)} groups)")
        try:
            run = run_scan(current, batches, labelled=labelled, metric=metric, method=pruning, sparsities=sparsities,
                           max_drop=max_drop, budget=Budget(**share, **timed_at), folder=scan_folder, resume_from=resume_from,
                           options=scan_options, check_compaction=False, progress=progress,
                           on_status=lambda message: None if carried and message.startswith("resuming:") else
                           on_status(f"  {message}"))
        except ScanInterrupted as interrupted:
            raise StagesInterrupted(index, interrupted.stage) from interrupted
        pruned = apply_plan(copy_model(current), run.plan, method=run.method)
        small = compact(pruned.eval(), example).eval()
        score_pruned = float(judge(small))
        recovery = None
        if recover is not None:
            try:
                outcome = recover(small, dense)
            except KeyboardInterrupt as interrupt:
                raise StagesInterrupted(index, "recovery") from interrupt
            if getattr(outcome, "interrupted", False):
                raise StagesInterrupted(index, "recovery")
            recovery = _recovery_record(outcome)
            small.eval()
        score = float(judge(small))
        cost = measured_costs(small, input_size)
        params, macs = cost.fraction_of(dense_cost)
        speedup = None
        if overall.speedup is not None:
            measured = getattr(run.fit, "speedup", None)
            speedup = reached["speedup"] * (measured.ratio if measured is not None else 1.0)
        if stage_folder is not None:
            save_compacted(small, stage_folder / "model.pt", arch)
        stages.append(Stage(index, share, dict(run.plan), macs, params, speedup, score_pruned, score, rescanned,
                            len(groups), recovery))
        store.save(key, stages)
        after = f", {score:.4f} after recovery" if recover is not None else ""
        on_status(f"stage {index} of {steps}: {macs:.3f} of the MACs and {params:.3f} of the parameters left; "
                  f"{judge.name} {score_pruned:.4f} pruned{after}")
        previous, current = run.result, small
    return StagedRun(current, stages, budget, judge.name, baseline, bool(judge.higher_is_better),
                     None if folder is None else Path(folder))


def _recovery_record(outcome: Any) -> Optional[Dict[str, Any]]:
    """The numbers a recovery returned (a :class:`~prunekit.training.recover.RecoveryHistory`), JSON-ready."""
    record = {}
    for name in ("pruned_distortion", "best_distortion", "best_step", "steps_done"):
        value = getattr(outcome, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            record[name] = value
    return record or None
