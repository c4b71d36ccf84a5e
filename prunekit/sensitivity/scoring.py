"""Scoring a masked model: a whole plan at once (:func:`evaluate_plan`), from states kept across calls
(:class:`PlanScorer`, a plan fit's trials), stopping early once a verdict is settled.

The sweep over one layer at a time (:mod:`prunekit.sensitivity.scanner`) and the plan fits
(:mod:`prunekit.planning`) both score here.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from prunekit.layers import check_prunable, model_device
from prunekit.measure.error import tensors_in
from prunekit.methods.base import PruningMethod, Target
from prunekit.methods.registry import prepared_method
from prunekit.plans import check_plan, plan_blocks
from prunekit.sensitivity.checks import scan_targets, score_value
from prunekit.sensitivity.distributed import all_reduce_sum, rank_and_world
from prunekit.sensitivity.graph_cut import GraphRunner, Traced, UntraceableError, capture_positions, trace
from prunekit.sensitivity.guard import ModelGuard
from prunekit.sensitivity.masks import Masker
from prunekit.sensitivity.metrics import MODEL_OUTPUT, ForwardMetric
from prunekit.sensitivity.settle import Estimate, Settler, Tolerance

__all__ = [
    "DEFAULT_CACHE_LIMIT", "DEFAULT_MASK_LIMIT", "KeptStates", "PlanScorer", "evaluate_plan", "forward_score",
    "forward_statistics", "gathered_rows", "settled_forward_score", "stop_early", "summed_statistics",
]


#: Bytes of dense prefix states kept between layers; batches beyond it recompute their prefix
#: (a tuning knob: the suffix speed-up holds at any value, 0 included).
DEFAULT_CACHE_LIMIT = 1 << 30
#: What a plan fit's mask makers may hold (about 8 bytes per weight of each layer kept).
DEFAULT_MASK_LIMIT = 1 << 29

StateKey = Tuple[int, int, Tuple[Any, ...]]  # (batch, position, levels of the blocks before it)


class KeptStates:
    """Graph states of plan runs, keyed :data:`StateKey`, within ``limit`` bytes, least recently used dropped first.

    Bytes are counted once per tensor storage: states kept at successive cuts of one run share
    most of their values (a skip connection's tensor, say). A state the caller marks as
    ``precious`` (the fit's base: every later trial can start from it) is dropped only to
    make room for another precious one; any other is kept only in the room left.
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        # precious or not -> key -> state, oldest use first
        self._kept: Dict[bool, Dict[StateKey, Dict[Any, Any]]] = {True: {}, False: {}}
        self._storages: Dict[int, List[int]] = {}  # storage address -> [bytes, states holding it]

    @property
    def entries(self) -> Dict[StateKey, Tuple[bool, Dict[Any, Any]]]:
        """Every kept state: key -> (precious, state)."""
        return {key: (precious, state) for precious, kept in self._kept.items() for key, state in kept.items()}

    def get(self, key: StateKey) -> Optional[Dict[Any, Any]]:
        for kept in self._kept.values():
            if key in kept:
                kept[key] = kept.pop(key)  # most recently used last
                return kept[key]
        return None

    @staticmethod
    def _storages_of(state: Mapping[Any, Any]) -> Dict[int, int]:
        found: Dict[int, int] = {}
        for value in state.values():
            for tensor in tensors_in(value):
                storage = tensor.untyped_storage()
                found[storage.data_ptr()] = storage.nbytes()
        return found

    def _fits(self, storages: Mapping[int, int]) -> bool:
        return self.used + sum(size for address, size in storages.items() if address not in self._storages) <= self.limit

    def put(self, key: StateKey, state: Dict[Any, Any], precious: bool) -> None:
        """Keep ``state`` if it fits, dropping older states that count for less (never exceeding ``limit``)."""
        if key in self._kept[True] or key in self._kept[False]:
            return
        storages = self._storages_of(state)
        for victims in (self._kept[False], self._kept[True]) if precious else (self._kept[False],):
            while victims and not self._fits(storages):
                self.drop(next(iter(victims)))
        if not self._fits(storages):  # checked before keeping it, never after
            return
        for address, size in storages.items():
            held = self._storages.setdefault(address, [size, 0])
            if held[1] == 0:
                self.used += size
            held[1] += 1
        self._kept[precious][key] = state

    def drop(self, key: StateKey) -> None:
        state = self._kept[True].pop(key, None)
        if state is None:
            state = self._kept[False].pop(key)
        for address in self._storages_of(state):
            held = self._storages[address]
            held[1] -= 1
            if held[1] == 0:
                del self._storages[address]
                self.used -= held[0]

    def clear(self) -> None:
        for kept in self._kept.values():
            kept.clear()
        self._storages.clear()
        self.used = 0

class PlanScorer:
    """Scores whole plans from states kept across calls (a plan fit's trials).

    A fit measures plans that add a few steps to the plan it keeps (its *base*, see
    :meth:`rebase`), and plans that share their first layers. Every run keeps its state at each
    block's cut (keyed by the batch, the position and the levels of the layers before it; within
    ``cache_limit`` bytes, the base's states kept first), and a plan starts from the latest kept
    state it shares: a trial that changes a late layer costs what a scan point on that layer
    costs, and a trial of the bisection starts where it first differs from the trials before it.
    Until a base is given the base is the dense model. Scores are bitwise those of full forwards
    (the same nodes run on the same values). A model ``torch.fx`` cannot trace, or a metric other
    than a ``ForwardMetric``, is scored with full forwards.
    """

    def __init__(self, model: nn.Module, evaluate: Any, pruning: PruningMethod, cache_limit: int = DEFAULT_CACHE_LIMIT,
                 mask_limit: int = DEFAULT_MASK_LIMIT):
        self.pruning = pruning
        self.traced: Optional[Traced] = None
        self.base: Dict[str, float] = {}
        self.kept = KeptStates(cache_limit)
        self.mask_limit = mask_limit
        self._masker: Optional[Masker] = None
        self._mask_context: Any = None
        if isinstance(evaluate, ForwardMetric):
            try:
                self.traced = trace(model)
                self.capture = capture_positions(self.traced, [n for n in evaluate.capture if n != MODEL_OUTPUT])
            except (UntraceableError, KeyError):
                self.traced = None
        if self.traced is not None:
            self.runner = GraphRunner(self.traced)
            self._inputs_bound = sum(node.op == "placeholder" for node in self.traced.nodes)  # what start() binds
            # Where states are kept: before every layer a plan may prune, whichever plan runs now.
            calls = self.traced.calls
            self.cuts = sorted({calls[name][0] for name, module in model.named_modules()
                                if isinstance(module, pruning.layer_types) and len(calls.get(name, ())) == 1})

    @property
    def used(self) -> int:
        """Bytes of the states kept now."""
        return self.kept.used

    def masker(self, pruning: PruningMethod, blocks: Mapping[str, Any], scores: Optional[Mapping[str, Tensor]],
               context: Any) -> Masker:
        """The masker kept across calls, for ``blocks``: its mask makers stay while ``context`` (what the
        method's channel scores come from) and the method stay the same."""
        if self._masker is None or self._mask_context != (pruning.name, context):
            self._masker = Masker(blocks, pruning, scores, keep_bytes=self.mask_limit)
            self._mask_context = (pruning.name, context)
            self.kept.clear()  # states kept under other masks
        else:
            self._masker.update(blocks, scores)
        return self._masker

    def rebase(self, plan: Mapping[str, float]) -> None:
        """Later plans add to ``plan`` (layer -> sparsity): keep its states, drop the others'."""
        self.base = {layer: float(level) for layer, level in plan.items() if level > 0}

    def _first_calls(self, blocks: Mapping[str, Any], levels: Mapping[str, float]) -> Optional[Dict[str, int]]:
        """Each block's first call position; None: score the plan with full forwards."""
        if self.traced is None or not any(level > 0 for level in levels.values()):
            return None
        try:
            return {key: min(self.traced.position(layer) for layer in self.pruning.block_layers(block))
                    for key, block in blocks.items()}
        except (KeyError, ValueError):
            return None

    def _base_levels(self, blocks: Mapping[str, Any]) -> Dict[str, float]:
        return {key: max((self.base.get(layer, 0.0) for layer in self.pruning.block_layers(block)), default=0.0)
                for key, block in blocks.items()}

    @staticmethod
    def _signatures(first: Mapping[str, int], levels: Mapping[str, float]) -> Callable[[int], Tuple[Any, ...]]:
        """position -> the levels of the pruned blocks called before it (what the state there depends on), memoised."""
        known: Dict[int, Tuple[Any, ...]] = {}

        def signature(position: int) -> Tuple[Any, ...]:
            if position not in known:
                known[position] = tuple(sorted((key, float(level)) for key, level in levels.items()
                                               if level > 0 and first[key] < position))
            return known[position]

        return signature

    def _forget_stale(self, base: Callable[[int], Tuple[Any, ...]]) -> None:
        """Drop the states no plan that adds to the base can start from (a layer before them below the base's level)."""
        for key in list(self.kept.entries):  # a copy: states are dropped on the way
            levels = dict(key[2])
            if any(levels.get(layer, 0.0) < level for layer, level in base(key[1])):
                self.kept.drop(key)

    def _latest_state(self, number: int, inputs: Tensor, signature: Callable[[int], Tuple[Any, ...]], limit: int,
                      ) -> Tuple[int, Dict[Any, Any]]:
        """The latest kept state of this batch, at or before ``limit``, that the plan shares; else its inputs."""
        for position in reversed(self.cuts):
            if position <= limit:
                state = self.kept.get((number, position, signature(position)))
                if state is not None:
                    return position, state
        return self._inputs_bound, self.runner.start(inputs)

    def score(
        self, metric: ForwardMetric, model: nn.Module, blocks: Mapping[str, Any], levels: Mapping[str, float],
        settler: Optional[Settler] = None, seed: int = 0, tolerance: Optional[Tolerance] = None,
    ) -> Union[None, float, Estimate]:
        """The metric with the plan's masks in place (the caller swaps them in); None: score it with full forwards.

        With a ``settler``, batches stop once the verdict is settled; with a ``tolerance``, once the plan
        is certain to break it (the :class:`Estimate` is returned then).
        """
        first = self._first_calls(blocks, levels)
        if first is None:
            return None
        base = self._signatures(first, self._base_levels(blocks))
        self._forget_stale(base)
        signature = self._signatures(first, levels)
        # A run starts at the latest kept state before the first captured output (captured outputs are computed).
        limit = min(self.capture.values(), default=len(self.traced.nodes))
        cuts = [position for position in self.cuts if position <= limit]

        def precious(position: int) -> bool:
            return signature(position) == base(position)

        rank, world = rank_and_world()
        totals: Optional[Tensor] = None
        rows: List[Tuple[int, Tensor]] = []
        with torch.no_grad():
            for number, (inputs, target) in enumerate(metric.batches(model_device(model))):
                if number % world == rank:
                    def keep(position: int, state: Dict[Any, Any], number: int = number) -> None:
                        self.kept.put((number, position, signature(position)), state, precious(position))

                    start, state = self._latest_state(number, inputs, signature, limit)
                    output, outputs = self.runner.finish(state, start, self.capture, states=(cuts, keep))
                    if MODEL_OUTPUT in metric.capture:
                        outputs[MODEL_OUTPUT] = output
                    stats = metric.batch_statistics(outputs, target)
                    totals = stats if totals is None else totals + stats
                    if settler is not None:
                        rows.append((number, stats.detach().double().reshape(-1).cpu()))
                stopped = stop_early(metric, tolerance, settler, totals, rows, number, world, seed)
                if stopped is not None:
                    return stopped
        return metric.reduce(summed_statistics(metric, totals))

    def release(self) -> None:
        """Free the kept states and mask makers."""
        self.kept.clear()
        self._masker = None

def summed_statistics(metric: ForwardMetric, local: Optional[Tensor]) -> Tensor:
    """This rank's statistics summed over all ranks; an error when no rank had a batch."""
    totals = all_reduce_sum(local)
    if totals is None:
        raise ValueError(f"{type(metric).__name__} has no batch to evaluate; pass at least one")
    return totals

def forward_statistics(metric: ForwardMetric, model: nn.Module) -> Tensor:
    """Full forwards over this rank's shard of the batches, statistics summed over all ranks."""
    return summed_statistics(metric, metric.statistics(model, rank_and_world()))

def forward_score(metric: ForwardMetric, model: nn.Module) -> float:
    return metric.reduce(forward_statistics(metric, model))

def stop_early(metric: ForwardMetric, tolerance: Optional[Tolerance], settler: Optional[Settler],
                totals: Optional[Tensor], rows: Sequence[Tuple[int, Tensor]], number: int, world: int, seed: int,
                ) -> Optional[Estimate]:
    """After batch ``number``: the estimate of a plan certain to break ``tolerance``, or whose verdict ``settler``
    settles at this look; None to go on. Every rank decides alike from all-reduced statistics: the certain
    check once every rank has a batch more (a round), the settler at its looks.
    """
    if tolerance is not None and (number + 1) % world == 0:
        partial = all_reduce_sum(totals)
        if partial is not None:
            broken = tolerance.certainly_beyond(metric, partial, number + 1, metric.num_batches())
            if broken is not None:
                return broken
    if settler is not None and settler.is_look(number + 1):
        return settler.verdict(gathered_rows(rows, number + 1), seed=seed + number)
    return None

def settled_forward_score(metric: ForwardMetric, model: nn.Module, settler: Optional[Settler], seed: int,
                           tolerance: Optional[Tolerance] = None) -> Union[float, Estimate]:
    """Full forwards batch by batch that stop once ``settler`` settles the verdict or the plan is certain to
    break ``tolerance`` (the Estimate then), else the exact score."""
    rows: List[Tuple[int, Tensor]] = []
    totals: Optional[Tensor] = None
    world = rank_and_world()[1]
    batches = metric.each_batch(model, rank_and_world())
    try:
        for number, stats in batches:
            if stats is not None:
                totals = stats if totals is None else totals + stats
                rows.append((number, stats.detach().double().reshape(-1).cpu()))
            stopped = stop_early(metric, tolerance, settler, totals, rows, number, world, seed)
            if stopped is not None:
                return stopped
    finally:
        batches.close()  # restores the model's flags and hooks when stopped early
    return metric.reduce(summed_statistics(metric, totals))

def gathered_rows(rows: Sequence[Tuple[int, Tensor]], seen: int) -> Tensor:
    """Every rank's per-batch statistics of the first ``seen`` batches, as one [seen, k] table (all ranks alike)."""
    local = None
    if rows:
        width = rows[0][1].numel()
        local = torch.zeros(seen, width, dtype=torch.float64)
        for number, stats in rows:
            if number < seen:
                local[number] = stats
    total = all_reduce_sum(local)
    assert total is not None, "a look comes after at least one batch"
    return total.reshape(seen, -1)

def evaluate_plan(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    plan: Mapping[str, float],
    method: Any = "fine-grained",
    stats: Optional[Mapping[str, Any]] = None,
    *,
    criterion: Optional[str] = None,
    settler: Optional[Settler] = None,
    scorer: Optional[PlanScorer] = None,
    tolerance: Optional[Tolerance] = None,
) -> Any:
    """Score ``model`` with a whole plan applied at once, then restore it exactly.

    The masks are those :func:`prunekit.apply_plan` would apply; the model comes
    back as :func:`scan` leaves it (bitwise equal, no reparametrization). A scan
    measures layers one at a time, and their losses add up (or worse) when all
    are pruned together: this is the check to run on a plan before trusting it.

    Args:
        model: the dense model.
        evaluate: ``evaluate(model) -> float`` (a built-in metric is prepared on the dense model first).
        plan: conv layer name -> final sparsity in [0, 1], as for :func:`prunekit.apply_plan`.
        method, stats, criterion: as for :func:`scan`.
        scorer: a :class:`PlanScorer` kept across calls (kept states and mask makers reused; same
            scores); its owner prepares the metric on the dense model once, before the first call,
            and keeps the model's weights as they were.
        settler: stop once the plan's verdict against a tolerance is settled (a
            :class:`~prunekit.sensitivity.settle.Settler`; ``ForwardMetric`` only): the
            :class:`~prunekit.sensitivity.settle.Estimate` is returned instead of a score then.
        tolerance: stop once the plan is certain to score beyond this
            :class:`~prunekit.sensitivity.settle.Tolerance` whatever the batches left give (a
            ``ForwardMetric`` that can bound its final score): the Estimate, ``within=False``, is
            returned then. A plan within the tolerance is scored on every batch.

    Example:
        >>> from prunekit.sensitivity import OutputDistortion
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> metric = OutputDistortion(torch.randn(2, 3, 16, 16))
        >>> evaluate_plan(model, metric, {"0": 0.5, "2": 0.5}) > 0
        True
    """
    pruning = prepared_method(method, stats, criterion)
    plan = check_plan(model, plan, pruning.layer_types)  # also checks the layer names
    check_prunable(model, plan)
    blocks, levels = plan_blocks(model, plan, pruning)
    scores = pruning.scores(model, blocks)
    masker = (scorer.masker(pruning, blocks, scores, (tuple(pruning.options.items()), id(pruning.data)))
              if scorer is not None
              else Masker(blocks, pruning, scores))
    targets: List[Target] = []
    masked: List[Tensor] = []
    for key, sparsity in levels.items():
        block_targets = scan_targets(blocks[key], key, pruning)
        targets += block_targets
        masked += masker.masked(key, block_targets, sparsity)
    if scorer is None:
        masker.release()
    guard = ModelGuard(model)
    try:
        model.eval()
        if isinstance(evaluate, ForwardMetric) and scorer is None:
            evaluate.prepare(model)  # a scorer's owner prepared it once on the dense model
        with guard.swap(targets, masked):
            kept = (scorer.score(evaluate, model, blocks, levels, settler=settler, seed=len(targets), tolerance=tolerance)
                    if isinstance(evaluate, ForwardMetric) and scorer is not None else None)
            if isinstance(kept, Estimate):
                return kept
            if kept is not None:
                score = kept
            elif isinstance(evaluate, ForwardMetric) and (settler is not None or tolerance is not None):
                settled = settled_forward_score(evaluate, model, settler, seed=len(targets), tolerance=tolerance)
                if isinstance(settled, Estimate):
                    return settled
                score = settled
            elif isinstance(evaluate, ForwardMetric):
                score = forward_score(evaluate, model)  # sharded over the ranks of a process group
            else:
                score = score_value(evaluate(model))
        if math.isnan(score):
            raise ValueError("the plan's score is NaN: the metric returned NaN; fix the metric and evaluate again")
        return score
    finally:
        guard.restore()
