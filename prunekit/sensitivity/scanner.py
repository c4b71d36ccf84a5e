"""The sensitivity scan: prune one conv layer at a time at several sparsities, score, restore.

The driver owns every change made to the model and undoes it. A point is
measured by swapping the data of the layer's tensors for masked copies
(computed exactly as :func:`prunekit.apply_plan` would) and swapping the
original data back; torch's pruning reparametrization is not used, so no
``_orig``/``_mask``/hook ever appears and the original values are never
written, whatever ``evaluate`` does or raises (Ctrl-C included).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from prunekit.layers import check_prunable, model_device
from prunekit.measure.error import relative_error
from prunekit.methods.base import Target
from prunekit.methods.registry import METHODS, prepared_method
from prunekit.progress import progress_bar
from prunekit.sensitivity.checks import (
    check_resume, check_resumed_baseline, check_settling, feasible_blocks, metric_identity, not_nan,
    scan_fingerprint, scan_targets, score_value,
)
from prunekit.sensitivity.distributed import all_reduce_sum, rank_and_world
from prunekit.sensitivity.graph_cut import GraphRunner, Traced, UntraceableError, capture_positions, trace
from prunekit.sensitivity.guard import ModelGuard
from prunekit.sensitivity.masks import Masker
from prunekit.sensitivity.metrics import MODEL_OUTPUT, ForwardMetric, output_tensor
from prunekit.sensitivity.result import DEFAULT_SPARSITIES, SensitivityResult, check_sparsities
from prunekit.sensitivity.scoring import (
    DEFAULT_CACHE_LIMIT, forward_score, forward_statistics, gathered_rows, summed_statistics,
)
from prunekit.sensitivity.settle import Estimate, Settler

__all__ = ["METHODS", "SuffixFallbackWarning", "scan"]


class SuffixFallbackWarning(UserWarning):
    """A scan scores some layers with full forwards instead of suffixes (same scores, slower); says why."""

class _PrefixCache:
    """The dense state at the current cut, per batch, kept while it fits in ``limit`` bytes.

    A batch whose state does not fit is recomputed from its input at every
    layer instead, so memory never exceeds ``limit`` plus one batch's state and
    the suffix speed-up never switches off; only the prefix reuse degrades.
    """

    def __init__(self, runner: GraphRunner, limit: int) -> None:
        self.runner = runner
        self.limit = limit
        self.used = 0
        self.entries: Dict[int, Tuple[int, Dict[Any, Any]]] = {}

    def state_at(self, batch: int, inputs: Tensor, position: int) -> Dict[Any, Any]:
        entry = self.entries.pop(batch, None)
        if entry is not None:
            self.used -= GraphRunner.state_bytes(entry[1])
        if entry is not None and entry[0] <= position:
            start, state = entry
        else:  # nothing kept, or kept past this cut: from the input
            start, state = 0, self.runner.start(inputs)
        if position > start:
            state = self.runner.advance(state, start, position)
        size = GraphRunner.state_bytes(state)
        if self.used + size <= self.limit:  # checked before keeping it, never after
            self.entries[batch] = (position, state)
            self.used += size
        return state

    def clear(self) -> None:
        self.entries.clear()
        self.used = 0

def _suffix_graph(
    model: nn.Module, evaluate: Any, cuts: Mapping[str, Sequence[str]]
) -> Tuple[Optional[Traced], Dict[str, int], Dict[str, int]]:
    """The traced graph, each block's cut position (before its first conv) and the metric's capture positions.

    ``cuts`` maps each scanned key to its convs. Blocks with a conv that cannot be cut at
    (a shared conv) and models that cannot be traced are scored with full forwards, with
    one :class:`SuffixFallbackWarning` saying why.
    """
    if not isinstance(evaluate, ForwardMetric):
        return None, {}, {}
    try:
        traced = trace(model)
        capture = capture_positions(traced, [name for name in evaluate.capture if name != MODEL_OUTPUT])
    except (UntraceableError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        warnings.warn(
            f"scan: scoring every point with full forwards (same scores, slower): {message}",
            SuffixFallbackWarning,
            stacklevel=3,
        )
        return None, {}, {}
    positions: Dict[str, int] = {}
    shared = []
    for key, layers in cuts.items():
        try:
            positions[key] = min(traced.position(layer) for layer in layers)
        except KeyError:
            shared.append(key)
    if shared:
        warnings.warn(
            f"scan: scoring {', '.join(map(repr, shared))} with full forwards (same scores, slower): not called "
            "exactly once as a module in the model's forward (called twice, or its weight read directly, as "
            "nn.MultiheadAttention reads out_proj's), so there is no single point to cut it at",
            SuffixFallbackWarning,
            stacklevel=3,
        )
    return traced, positions, capture

def scan(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    layers: Optional[Iterable[str]] = None,
    sparsities: Iterable[float] = DEFAULT_SPARSITIES,
    method: Any = "fine-grained",
    stats: Optional[Mapping[str, Any]] = None,
    progress: bool = True,
    *,
    criterion: Optional[str] = None,
    higher_is_better: Optional[bool] = None,
    resume_from: Optional[SensitivityResult] = None,
    on_point: Optional[Callable[[SensitivityResult], None]] = None,
    meta: Optional[Mapping[str, Any]] = None,
    cache_limit: int = DEFAULT_CACHE_LIMIT,
    confidence: Optional[float] = None,
    max_drop: Optional[float] = None,
    relative: bool = False,
    stack_levels: Union[bool, str] = "auto",
) -> SensitivityResult:
    """Prune each layer (or channel group) alone at each sparsity, score the model, and restore it.

    Every point starts from the dense model; only one layer is pruned at a
    time. The masks are the ones :func:`prunekit.apply_plan` would apply, so a
    plan read off the result behaves as scanned. The model runs in eval mode
    during the scan and comes back exactly as it went in: every parameter and
    buffer bitwise equal (same Parameter objects), no ``_orig``/``_mask``, no
    hooks, the same train/eval flags and grads, also when ``evaluate`` raises
    or the scan is interrupted. (``evaluate`` must only read the model: what it
    writes into parameters other than the scanned ones is not undone.)

    With a :class:`ForwardMetric` (:class:`OutputDistortion`, :class:`Accuracy`)
    and a model ``torch.fx`` can trace, the scan streams: for each layer, each
    batch's dense prefix is computed once (or advanced from the previous layer's
    cut, while the cut states fit in ``cache_limit``) and only the part of the
    graph after the cut runs for each level, fed exactly the values that cross
    the cut (side outputs and skip connections included). Peak memory is one
    batch's state plus at most ``cache_limit``, whatever the number of batches;
    the scores equal full forwards'. An untraceable model (or a conv called twice)
    is scored with full forwards, with one :class:`SuffixFallbackWarning`. Any
    other callable is scored with full forwards. Points are recorded (and
    ``on_point`` called) a layer at a time for a ``ForwardMetric``: an
    interrupted scan resumes from the last finished layer.

    Inside an initialised ``torch.distributed`` process group (e.g. under
    ``torchrun``) every rank calls ``scan`` alike: a ``ForwardMetric``'s batches
    are sharded by rank (batch ``b`` on rank ``b % world_size``) and each point's
    statistics all-reduced in float64, so every rank gets the one-process result;
    a plain callable's points are shared out instead, one per rank per round.
    Only rank 0 shows progress and calls ``on_point``. prunekit never creates a
    process group itself.

    A model whose scanned layers already carry a pruning reparametrization is
    refused: call :func:`prunekit.finalize` first to scan from its zeros.

    Args:
        model: the dense model.
        evaluate: ``evaluate(model) -> float``; a metric object's ``name`` and
            ``higher_is_better`` attributes are recorded in the result.
        layers: layer names (default: every ``Conv2d``, and every ``nn.Linear`` for ``"fine-grained"``).
            A channel method scans each channel group once, under its first member's name
            (:func:`prunekit.channel_groups`): a point masks the same units in every member.
        sparsities: increasing levels in [0, 1).
        method: a method's name (:func:`prunekit.methods.registry.method_names`; ``prunekit scan --help``
            describes each) or a method object; one that needs data (activation statistics,
            gradients) as :meth:`~prunekit.methods.base.PruningMethod.prepare` returns it. The masks
            are the method's own (:meth:`~prunekit.methods.base.PruningMethod.mask_maker`), so a plan
            read off the result behaves as scanned.
        stats: for ``"channel"`` given by name: layer name -> :class:`ChannelStats` (or score tensor).
        progress: show a progress bar on stderr.
        criterion: for ``"channel"``: ``"l2"`` or ``"l0"`` (default: the method's own).
        higher_is_better: direction of a plain callable's score (default: the
            callable's ``higher_is_better`` attribute, else True).
        resume_from: a partial result of the same scan; its measured points are kept.
        on_point: called with the (partial) result after the baseline and after every point.
        meta: free-form information stored in ``result.meta``.
        cache_limit: bytes of dense prefix states kept from one layer to the next
            (a speed knob: beyond it, batches recompute their prefix; 0 streams fully).
        confidence: settle points early (e.g. 0.99; default None: every point uses every batch).
            A streamed point stops at a look (after 8 batches, then each time the count doubles)
            once a confidence interval on its full-data score lies wholly on one side of
            ``max_drop`` (see :mod:`prunekit.sensitivity.settle` for the interval and why it holds,
            assuming batches in random order). Its estimate, interval and batches used are kept in
            ``result.estimates``; the table marks it with ``~``. Needs a ``ForwardMetric`` whose
            batches can be counted (a list or a DataLoader).
        max_drop, relative: the tolerance the settled verdicts are about (as for
            :meth:`SensitivityResult.plan`); required with ``confidence``.
        stack_levels: run a layer's levels through the graph after it together, stacked along the
            batch, so each later weight is read once for all levels (scores then equal the full
            forwards' to float rounding, not bitwise). ``"auto"`` (default) stacks a layer where the
            weights after its cut that are used fewer than 64 times per forward (bound by their reads,
            not their arithmetic) outweigh, in bytes, the values computed there for one batch (shapes
            from fake tensors): small batches on a model with a large head, such as vgg11's classifier
            for 4 images; not digits-vgg on 360 images, nor HED on 3 photos at 224 px, which run one
            by one, bitwise. ``True`` stacks wherever it can, ``False`` never (bitwise, the same
            scores as full forwards). Only where the masked tensors all belong to the layer at the cut
            (fine-grained pruning), while the stacked states fit in ``cache_limit``.
    Returns:
        A :class:`SensitivityResult`.

    Raises:
        KeyError: unknown layer (the message lists the conv layers) or missing stats.
        ValueError: bad sparsities, method or stats; an already pruned layer; a
            ``resume_from`` of a different scan or model.
        TypeError: ``evaluate`` is not callable or does not return a number.

    Example:
        >>> from prunekit.sensitivity import OutputDistortion
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> metric = OutputDistortion(torch.randn(2, 3, 16, 16))
        >>> result = scan(model, metric, sparsities=[0.5, 0.9], progress=False)
        >>> sorted(result.plan(max_drop=1.0))
        ['0', '2']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if not callable(evaluate):
        raise TypeError(
            f"evaluate must be a callable evaluate(model) -> float, got {type(evaluate).__name__}"
        )
    if not (stack_levels == "auto" or isinstance(stack_levels, bool)):
        raise ValueError(f"stack_levels={stack_levels!r} is not one of 'auto', True, False; use 'auto' (stack where "
                         "it pays) or False (bitwise, never stacked)")
    pruning = prepared_method(method, stats, criterion)
    method = pruning.name
    convs = pruning.layers_of(model, layers)
    check_prunable(model, convs)
    levels = check_sparsities(sparsities)
    pruning.check_levels(levels)
    blocks = pruning.blocks(model, convs)  # a channel method's groups: one point per group
    blocks = feasible_blocks(blocks, pruning, levels[-1], named=layers is not None)
    check_prunable(model, [layer for block in blocks.values() for layer in pruning.block_layers(block)])
    scores = pruning.scores(model, blocks)  # from the dense model, before any point
    targets = {key: scan_targets(block, key, pruning) for key, block in blocks.items()}
    name, direction = metric_identity(evaluate, higher_is_better)
    total_batches = check_settling(evaluate, confidence, max_drop)
    result = SensitivityResult(
        metric=name,
        higher_is_better=direction,
        baseline=None,
        sparsities=levels,
        scores={key: [None] * len(levels) for key in blocks},
        method=method,
        meta=dict(meta or {}),
    )
    if resume_from is not None:
        check_resume(resume_from, result)
        result.scores = {layer: list(values) for layer, values in resume_from.scores.items()}
        result.estimates = {layer: list(values) for layer, values in resume_from.estimates.items()}
    masker = Masker(blocks, pruning, scores)

    main = rank_and_world()[0] == 0
    report = on_point if (on_point is not None and main) else None
    guard = ModelGuard(model)
    try:
        model.eval()
        baseline, statistics = _dense_baseline(evaluate, model)
        guard.reset_point()
        fingerprint = scan_fingerprint(pruning, statistics, scores)
        fingerprint["settle"] = None if confidence is None else {
            "confidence": float(confidence), "max_drop": float(max_drop), "relative": bool(relative)}  # type: ignore[arg-type]
        if resume_from is not None:
            check_resumed_baseline(resume_from, baseline, fingerprint)
        result.meta["fingerprint"] = fingerprint
        result.baseline = baseline
        if report is not None:
            report(result)
        points = _Points(model, evaluate, result, targets, masker, guard, report)
        points.stack.update(ok=stack_levels == "auto" or bool(stack_levels), auto=stack_levels == "auto")
        if confidence is not None:
            result.meta["settle"] = fingerprint["settle"]
            points.settler = Settler(evaluate, baseline, direction, float(max_drop), float(confidence),  # type: ignore[arg-type]
                                     total_batches, relative=relative)
        cuts = {key: pruning.block_layers(block) for key, block in blocks.items()}
        traced, positions, capture = _suffix_graph(model, evaluate, cuts)
        order = sorted(blocks, key=lambda key: positions.get(key, math.inf))
        with progress_bar(len(points.pending(order)), "scanning", progress and main) as tick:
            if isinstance(evaluate, ForwardMetric):
                points.by_forwards(order, traced, positions, capture, cache_limit, tick)
            else:
                points.by_callable(order, tick)
    finally:
        masker.release()
        guard.restore()
    return result

def _dense_baseline(evaluate: Any, model: nn.Module) -> Tuple[float, Optional[Tensor]]:
    """The dense model's score (and a ForwardMetric's summed statistics), refused when not finite."""
    statistics = None
    if isinstance(evaluate, ForwardMetric):
        evaluate.prepare(model)
        recorded = getattr(evaluate, "dense_statistics", None)  # prepare() may have seen every batch already
        statistics = recorded() if recorded is not None else None
        if statistics is None:
            statistics = forward_statistics(evaluate, model)
        baseline = evaluate.reduce(statistics)
    else:
        baseline = score_value(evaluate(model))
    if not math.isfinite(baseline):
        raise ValueError(
            f"the dense model scores {baseline} before any pruning, so no point could be judged against it; "
            "check the evaluation data and the metric (NaN or Inf in the inputs, or a metric that returns NaN)"
        )
    return baseline, statistics

class _Points:
    """The points of a scan still to measure, and the two ways of measuring them."""

    def __init__(
        self, model: nn.Module, evaluate: Any, result: SensitivityResult, targets: Mapping[str, List[Target]],
        masker: Masker, guard: "ModelGuard", report: Optional[Callable[[SensitivityResult], None]],
    ) -> None:
        self.model, self.evaluate, self.result, self.targets = model, evaluate, result, targets
        self.masker, self.guard, self.report = masker, guard, report
        self.levels = result.sparsities
        self.settler: Optional[Settler] = None
        # stacking levels: allowed, only where it pays (auto), and checked once
        self.stack = {"ok": False, "auto": False, "verified": False}

    def todo(self, layer: str) -> List[int]:
        return [i for i, value in enumerate(self.result.scores[layer]) if value is None]

    def pending(self, order: Sequence[str]) -> List[Tuple[str, int]]:
        return [(layer, i) for layer in order for i in self.todo(layer)]

    def masked(self, layer: str, i: int) -> List[Tensor]:
        return self.masker.masked(layer, self.targets[layer], self.levels[i])

    def record(self, layer: str, values: Mapping[int, Union[float, Estimate]], tick: Callable[..., None]) -> None:
        for i, value in values.items():
            if isinstance(value, Estimate):
                self.result.estimates.setdefault(layer, [None] * len(self.levels))[i] = value.to_dict()
                value = value.score
            elif layer in self.result.estimates:
                self.result.estimates[layer][i] = None
            self.result.scores[layer][i] = not_nan(value, layer, self.levels[i])
            tick(f"{layer} @ {self.levels[i]:.0%}")

    def by_forwards(
        self, order: Sequence[str], traced: Optional[Traced], positions: Mapping[str, int],
        capture: Mapping[str, int], cache_limit: int, tick: Callable[..., None],
    ) -> None:
        """A ForwardMetric: layer by layer, the suffix after the cut for each level (full forwards where no cut)."""
        cache = _PrefixCache(GraphRunner(traced), cache_limit) if traced is not None else None
        for layer in order:
            todo = self.todo(layer)
            if not todo:
                continue
            if cache is not None and layer in positions:
                values = _stream_layer(
                    self.evaluate, self.model, cache, positions[layer], capture, self.guard, self.targets[layer],
                    {i: self.masked(layer, i) for i in todo}, self.settler, seed=order.index(layer) * 1009,
                    stack=self.stack if self.stack["ok"] and _only_at_cut(traced, positions[layer], self.targets[layer]) else None,
                    stack_limit=cache_limit,
                )
            else:
                values = {}
                for i in todo:
                    with self.guard.swap(self.targets[layer], self.masked(layer, i)):
                        values[i] = forward_score(self.evaluate, self.model)
            self.guard.reset_point()
            self.record(layer, {i: values[i] for i in todo}, tick)
            if self.report is not None:
                self.report(self.result)
        if cache is not None:
            cache.clear()

    def by_callable(self, order: Sequence[str], tick: Callable[..., None]) -> None:
        """A plain callable: the points are shared out, one per rank in each round."""
        rank, world = rank_and_world()
        pending = self.pending(order)
        for start in range(0, len(pending), world):
            round_points = pending[start : start + world]
            local = torch.zeros(len(round_points), dtype=torch.float64)
            if rank < len(round_points):
                layer, i = round_points[rank]
                with self.guard.swap(self.targets[layer], self.masked(layer, i)):
                    local[rank] = score_value(self.evaluate(self.model))
                self.guard.reset_point()
            values = all_reduce_sum(local)  # every point has one owner: the sum is its value
            assert values is not None
            for (layer, i), value in zip(round_points, values.tolist()):
                self.record(layer, {i: value}, tick)
            if self.report is not None:
                self.report(self.result)

def _stream_layer(
    metric: ForwardMetric,
    model: nn.Module,
    cache: _PrefixCache,
    position: int,
    capture: Mapping[str, int],
    guard: "ModelGuard",
    targets: Sequence[Target],
    masked: Mapping[int, List[Tensor]],
    settler: Optional[Settler] = None,
    seed: int = 0,
    stack: Optional[Dict[str, bool]] = None,
    stack_limit: int = DEFAULT_CACHE_LIMIT,
) -> Dict[int, Union[float, Estimate]]:
    """Score every level of one layer in one pass over this rank's batches: prefix once per batch, suffix per level.

    With a ``settler``, a level whose verdict against the tolerance is settled at a look stops
    there (its :class:`Estimate` is returned instead of a score); every rank decides alike from
    the all-reduced per-batch statistics, so all stop together.
    """
    rank, world = rank_and_world()
    after = {name: at for name, at in capture.items() if at >= position}
    totals: Dict[int, Optional[Tensor]] = {i: None for i in masked}
    rows: Dict[int, List[Tuple[int, Tensor]]] = {i: [] for i in masked}
    active = dict(masked)
    settled: Dict[int, Estimate] = {}
    with torch.no_grad():
        for number, (inputs, target) in enumerate(metric.batches(model_device(model))):
            if number % world == rank:
                state = cache.state_at(number, inputs, position)
                finished = None
                if (stack is not None and stack["ok"] and len(active) > 1
                        and len(active) * cache.runner.state_bytes(state) <= stack_limit
                        and (not stack["auto"] or _stacking_pays(cache.runner, position, inputs))):
                    try:
                        finished = cache.runner.finish_stacked(
                            state, position, after, [guard.swap(targets, data) for data in active.values()],
                            batch=inputs.shape[0],
                        )
                    except RuntimeError:  # a shape fixed in the graph (a view with the batch size written in)
                        stack["ok"] = False
                if finished is None or not stack["verified"]:  # type: ignore[index]
                    one_by_one = []
                    for data in active.values():
                        with guard.swap(targets, data):
                            one_by_one.append(cache.runner.finish(state, position, after))
                    if finished is not None:
                        # The scan's first stacked batch is checked against the levels run one by one: an
                        # op after the cut that mixes the batch (x - x.mean(0)) turns stacking off. Later
                        # layers' suffixes are parts of this one (layers go in forward order). Checked or
                        # not, a stacked batch scores as stacked: a resumed scan scores as an unbroken one.
                        stack["verified"], stack["ok"] = True, _same_results(finished, one_by_one)  # type: ignore[index]
                    if finished is None or not stack["ok"]:
                        finished = one_by_one
                for i, (output, outputs) in zip(list(active), finished):
                    if MODEL_OUTPUT in metric.capture:
                        outputs[MODEL_OUTPUT] = output
                    stats = metric.batch_statistics(outputs, target)
                    totals[i] = stats if totals[i] is None else totals[i] + stats  # type: ignore[operator]
                    if settler is not None:
                        rows[i].append((number, stats.detach().double().reshape(-1).cpu()))
                del state
            if settler is not None and settler.is_look(number + 1):
                for i in list(active):
                    estimate = settler.verdict(gathered_rows(rows[i], number + 1), seed=seed + 7919 * i + number)
                    if estimate is not None:
                        settled[i] = estimate
                        del active[i]
                if not active:
                    break
    results: Dict[int, Union[float, Estimate]] = dict(settled)
    for i in masked:
        if i not in settled:
            results[i] = metric.reduce(summed_statistics(metric, totals[i]))
    return results

def _stacking_pays(runner: GraphRunner, position: int, inputs: Tensor) -> bool:
    """After ``position``, do the weights bound by their reads (few uses each) outweigh the values computed there
    for this batch, in bytes? Stacking the levels reads those weights once for all levels."""
    traffic = runner.suffix_traffic(inputs)
    if traffic is None:
        return False
    weights, activations = traffic[position]
    return weights > activations

def _same_results(stacked: Sequence[Tuple[Any, Dict[str, Any]]], alone: Sequence[Tuple[Any, Dict[str, Any]]]) -> bool:
    """Do the stacked levels' outputs equal the ones run alone (to float rounding)?"""
    for (output, captured), (expected, wanted) in zip(stacked, alone):
        pairs = [(output_tensor(output), output_tensor(expected))] + [(captured[k], wanted[k]) for k in wanted]
        for got, want in pairs:
            if got.shape != want.shape or not relative_error(got, want) <= 1e-4:
                return False
    return True

def _only_at_cut(traced: Optional[Traced], position: int, targets: Sequence[Target]) -> bool:
    """Do the masked tensors all belong to the module called at the cut (so the rest of the graph is shared)?"""
    if traced is None:
        return False
    node = traced.nodes[position]
    if node.op != "call_module":
        return False
    module = traced.graph_module.get_submodule(str(node.target))
    return all(owner is module for owner, _ in targets)
