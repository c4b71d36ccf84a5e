"""The sensitivity scan: prune one conv layer at a time at several sparsities, score, restore.

The driver owns every change made to the model and undoes it. A point is
measured by swapping the data of the layer's tensors for masked copies
(computed exactly as :func:`prunekit.apply_plan` would) and swapping the
original data back; torch's pruning reparametrization is not used, so no
``_orig``/``_mask``/hook ever appears and the original values are never
written, whatever ``evaluate`` does or raises (Ctrl-C included).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from prunekit._rollback import restore_training, training_flags
from prunekit.layers import check_prunable, resolve_layers
from prunekit.methods.base import PruningMethod, Target
from prunekit.methods.registry import METHODS, prepared_method
from prunekit.plans import check_plan, plan_blocks
from prunekit.progress import progress_bar
from prunekit.sensitivity.distributed import all_reduce_sum, rank_and_world
from prunekit.sensitivity.graph_cut import GraphRunner, Traced, UntraceableError, capture_positions, trace
from prunekit.layers import model_device
from prunekit.measure.error import relative_error, tensors_in
from prunekit.sensitivity.metrics import MODEL_OUTPUT, ForwardMetric, output_tensor
from prunekit.sensitivity.result import DEFAULT_SPARSITIES, SensitivityResult, check_sparsities
from prunekit.sensitivity.settle import Estimate, Settler, Tolerance

__all__ = ["DEFAULT_CACHE_LIMIT", "METHODS", "PlanScorer", "SuffixFallbackWarning", "evaluate_plan", "scan"]


#: Bytes of dense prefix states kept between layers; batches beyond it recompute their prefix
#: (a tuning knob: the suffix speed-up holds at any value, 0 included).
DEFAULT_CACHE_LIMIT = 1 << 30
#: What a plan fit's mask makers may hold (about 8 bytes per weight of each layer kept).
DEFAULT_MASK_LIMIT = 1 << 29

# ---------------------------------------------------------------------------
# Checks


def _metric_identity(evaluate: Callable[..., Any], higher_is_better: Optional[bool]) -> Tuple[str, bool]:
    name = getattr(evaluate, "name", None)
    if not isinstance(name, str) or not name:
        name = getattr(evaluate, "__name__", "score")
        name = "score" if name == "<lambda>" else name
    if higher_is_better is None:
        higher_is_better = getattr(evaluate, "higher_is_better", True)
    return name, bool(higher_is_better)


def _score(value: Any) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"evaluate(model) returned {type(value).__name__}; it must return a number")
    return float(value)


def _not_nan(value: float, layer: str, level: float) -> float:
    """A point's score, refused when NaN (a NaN would read as "beyond any tolerance" and plan nothing)."""
    if math.isnan(value):
        raise ValueError(
            f"the score of {layer} at {level:.0%} sparsity is NaN: the metric returned NaN for this point; "
            "fix the metric (or the model's numerics) and scan again"
        )
    return value


def _targets(block: Any, layer: str, pruning: PruningMethod) -> List[Target]:
    """The tensors a point masks: the method's targets for the block (all still plain parameters)."""
    targets = pruning.targets(block)
    for module, name in targets:
        if name not in module._parameters:
            raise ValueError(
                f"layer {layer!r} is already pruned ({type(module).__name__} has {name}_orig/"
                f"{name}_mask); scan the dense model, or make its pruning permanent with "
                "prunekit.finalize(model) first (the scan then starts from its zeros)"
            )
    return targets


def _feasible(blocks: Dict[str, Any], pruning: PruningMethod, highest: float, named: bool) -> Dict[str, Any]:
    """The blocks that can be pruned to every level; others are refused (named layers) or skipped with a warning."""
    short = {key: pruning.max_sparsity(block) for key, block in blocks.items()}
    short = {key: most for key, most in short.items() if most + 1e-9 < highest}
    if not short:
        return blocks
    reasons = {key: "; ".join(sorted({r for fixed in getattr(blocks[key], "fixed", []) for r in fixed})[:2]) for key in short}
    described = ", ".join(f"{key!r} (at most {most:.0%}: {reasons[key]})" for key, most in short.items())
    if named:
        raise ValueError(
            f"channel group{'s' if len(short) > 1 else ''} {described} cannot be pruned to {highest:.0%}; "
            "leave out their convs, or scan lower levels"
        )
    warnings.warn(f"scan: skipping channel group{'s' if len(short) > 1 else ''} {described}", UserWarning, stacklevel=3)
    kept = {key: block for key, block in blocks.items() if key not in short}
    if not kept:
        raise ValueError(f"no layer can be pruned to {highest:.0%}: {described}; scan lower levels")
    return kept


def _fingerprint(
    pruning: PruningMethod, statistics: Optional[Tensor], scores: Optional[Mapping[str, Tensor]]
) -> Dict[str, Any]:
    """What makes two scans the same scan, beyond layers and levels: method, criterion, data and weights.

    A ForwardMetric's dense statistics (for a distortion: the squared norm of the
    dense outputs; for accuracy: the counts) change with the data and the weights,
    even when the dense score itself (a distortion of 0) does not.
    """
    return {
        "method": pruning.name,
        "criterion": pruning.options.get("criterion"),
        "dense_statistics": None if statistics is None else [float(v) for v in statistics.tolist()],
        "channel_scores": None if scores is None else {
            layer: [float(values.double().sum()), float(values.double().pow(2).sum())] for layer, values in scores.items()
        },
    }


def _check_fingerprint(previous: Optional[Mapping[str, Any]], current: Mapping[str, Any]) -> None:
    if previous is None:
        return  # a result from before fingerprints: layers, levels and baseline were checked

    def same(a: Any, b: Any) -> bool:
        if isinstance(a, float) or isinstance(b, float):
            return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
        if isinstance(a, list) and isinstance(b, list):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return a == b

    what = {"method": "the method", "criterion": "the channel criterion",
            "dense_statistics": "the data or the weights (the dense outputs differ)",
            "channel_scores": "the channel statistics",
            "settle": "settling (confidence or tolerance)"}
    # A plain callable has no statistics to compare: only what both scans recorded counts.
    changed = [
        what[key] for key in what
        if not (key == "dense_statistics" and None in (previous.get(key), current.get(key)))
        and not same(previous.get(key), current.get(key))
    ]
    if changed:
        raise ValueError(
            f"resume_from is a different scan: {', '.join(changed)} changed; rerun with the same model, "
            "data and options, or start a new scan without resume_from"
        )


def _check_resume(previous: SensitivityResult, fresh: SensitivityResult) -> None:
    differences = []
    if previous.layers != fresh.layers:
        differences.append(f"layers {previous.layers} vs {fresh.layers}")
    if len(previous.sparsities) != len(fresh.sparsities) or not all(
        math.isclose(a, b, abs_tol=1e-9) for a, b in zip(previous.sparsities, fresh.sparsities)
    ):
        differences.append(f"sparsities {list(previous.sparsities)} vs {list(fresh.sparsities)}")
    for field in ("method", "metric", "higher_is_better"):
        if getattr(previous, field) != getattr(fresh, field):
            differences.append(f"{field} {getattr(previous, field)!r} vs {getattr(fresh, field)!r}")
    if differences:
        raise ValueError(
            "resume_from does not match this scan (" + "; ".join(differences) + "); "
            "rerun with the same options, or start a new scan without resume_from"
        )


# ---------------------------------------------------------------------------
# Masks


class _Masker:
    """Masked copies of a layer's tensors at any level, from the method's own :meth:`~PruningMethod.mask_maker`.

    The masks are the method's, so a plan read off a scan behaves as scanned by
    construction. A mask maker does the work every level of a layer shares (a
    fine-grained one sorts the layer's magnitudes once). A scan keeps one layer's
    maker at a time (``keep_bytes=0``); a plan fit, whose trials prune the same
    layers again and again, keeps makers for several layers, the least recently
    used dropped first once their estimated size (8 bytes per weight: a sorted
    index) passes ``keep_bytes``.
    """

    def __init__(
        self, blocks: Mapping[str, Any], pruning: PruningMethod, scores: Optional[Mapping[str, Tensor]],
        keep_bytes: int = 0,
    ) -> None:
        self.blocks, self.pruning, self.scores = dict(blocks), pruning, scores or {}
        self.keep_bytes = keep_bytes
        self._makers: Dict[str, Tuple[int, Callable[[float], List[Tensor]]]] = {}  # oldest use first

    def masked(self, layer: str, targets: Sequence[Target], sparsity: float) -> List[Tensor]:
        maker = self._maker(layer, targets)
        with torch.no_grad():
            masks = maker(sparsity)
            # The same product the pruning forward pre-hook computes (weight_orig * weight_mask).
            return [module._parameters[name].detach() * mask.to(dtype=module._parameters[name].dtype)
                    for (module, name), mask in zip(targets, masks)]

    def _maker(self, layer: str, targets: Sequence[Target]) -> Callable[[float], List[Tensor]]:
        if layer in self._makers:
            self._makers[layer] = self._makers.pop(layer)  # most recently used last
            return self._makers[layer][1]
        size = 8 * sum(module._parameters[name].numel() for module, name in targets)
        # Free what will not be kept before the next layer's work (one layer at a time: all of it).
        while self._makers and sum(kept for kept, _ in self._makers.values()) + size > self.keep_bytes:
            del self._makers[next(iter(self._makers))]
        maker = self.pruning.mask_maker(self.blocks[layer], self.scores.get(layer))
        self._makers[layer] = (size, maker)
        return maker

    def update(self, blocks: Mapping[str, Any], scores: Optional[Mapping[str, Tensor]]) -> None:
        """Mask more blocks of the same model, weights and statistics (makers already made stay valid)."""
        self.blocks.update(blocks)
        self.scores = scores or {}

    def release(self) -> None:
        self._makers.clear()


# ---------------------------------------------------------------------------
# The model's state


class _Guard:
    """Records what the scan may change and puts it back: swapped data, train flags, buffers, grads.

    Buffers come back as the same objects with the same values (an ``evaluate``
    that reassigns one is undone), grads by value (one that calls ``backward()``
    is undone), and :meth:`restore` runs to its end even when Ctrl-C lands inside it.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.training = training_flags(model)
        # BatchNorm in train mode would update its running statistics; the scan
        # runs in eval mode, and this copy undoes an evaluate() that trains anyway.
        self.buffers = [
            (module, name, buffer, buffer.detach().clone())
            for module in model.modules()
            for name, buffer in module._buffers.items()
            if buffer is not None
        ]
        self.grads = [
            (param, param.grad, None if param.grad is None else param.grad.detach().clone())
            for param in model.parameters()
        ]
        self.swapped: Dict[int, Tuple[nn.Parameter, Tensor]] = {}

    @contextlib.contextmanager
    def swap(self, targets: Sequence[Target], data: Sequence[Tensor]) -> Iterator[None]:
        """Give each target parameter the data in ``data`` for the duration of the block."""
        try:
            for (module, name), new in zip(targets, data):
                param = module._parameters[name]
                assert param is not None
                if id(param) not in self.swapped:
                    self.swapped[id(param)] = (param, param.data)
                param.data = new
            yield
        finally:
            self.unswap()

    def unswap(self) -> None:
        # Idempotent, so the outer restore can finish an inner one cut short by Ctrl-C.
        while self.swapped:
            key = next(iter(self.swapped))
            param, original = self.swapped[key]
            param.data = original
            del self.swapped[key]

    def _restore_buffers(self) -> None:
        for module, name, buffer, saved in self.buffers:
            if module._buffers.get(name) is not buffer:
                module._buffers[name] = buffer
            if not torch.equal(buffer, saved):
                with torch.no_grad():
                    buffer.copy_(saved)

    def reset_point(self) -> None:
        """Undo what evaluate() may have changed besides the weights: buffers and train/eval mode."""
        self._restore_buffers()
        self.model.eval()

    def _restore_once(self) -> None:
        self.unswap()
        self._restore_buffers()
        restore_training(self.training)
        for param, grad, saved in self.grads:
            if grad is not None and saved is not None:
                with torch.no_grad():
                    grad.copy_(saved)
            param.grad = grad

    def restore(self) -> None:
        """Put everything back; every step is idempotent, so an interrupt inside just starts it again."""
        interrupted: Optional[BaseException] = None
        while True:
            try:
                self._restore_once()
                break
            except KeyboardInterrupt as err:  # Ctrl-C during the cleanup: finish it, then re-raise
                interrupted = err
        if interrupted is not None:
            raise interrupted


# ---------------------------------------------------------------------------
# Streaming suffixes


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


StateKey = Tuple[int, int, Tuple[Any, ...]]  # (batch, position, levels of the blocks before it)


class _KeptStates:
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
        self.kept = _KeptStates(cache_limit)
        self.mask_limit = mask_limit
        self._masker: Optional[_Masker] = None
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
               context: Any) -> _Masker:
        """The masker kept across calls, for ``blocks``: its mask makers stay while ``context`` (what the
        method's channel scores come from) and the method stay the same."""
        if self._masker is None or self._mask_context != (pruning.name, context):
            self._masker = _Masker(blocks, pruning, scores, keep_bytes=self.mask_limit)
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
                stopped = _stop_early(metric, tolerance, settler, totals, rows, number, world, seed)
                if stopped is not None:
                    return stopped
        return metric.reduce(_summed(metric, totals))

    def release(self) -> None:
        """Free the kept states and mask makers."""
        self.kept.clear()
        self._masker = None


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


def _summed(metric: ForwardMetric, local: Optional[Tensor]) -> Tensor:
    """This rank's statistics summed over all ranks; an error when no rank had a batch."""
    totals = all_reduce_sum(local)
    if totals is None:
        raise ValueError(f"{type(metric).__name__} has no batch to evaluate; pass at least one")
    return totals


def _forward_statistics(metric: ForwardMetric, model: nn.Module) -> Tensor:
    """Full forwards over this rank's shard of the batches, statistics summed over all ranks."""
    return _summed(metric, metric.statistics(model, rank_and_world()))


def _forward_score(metric: ForwardMetric, model: nn.Module) -> float:
    return metric.reduce(_forward_statistics(metric, model))


def _stop_early(metric: ForwardMetric, tolerance: Optional[Tolerance], settler: Optional[Settler],
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
        return settler.verdict(_gathered(rows, number + 1), seed=seed + number)
    return None


def _settled_forward_score(metric: ForwardMetric, model: nn.Module, settler: Optional[Settler], seed: int,
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
            stopped = _stop_early(metric, tolerance, settler, totals, rows, number, world, seed)
            if stopped is not None:
                return stopped
    finally:
        batches.close()  # restores the model's flags and hooks when stopped early
    return metric.reduce(_summed(metric, totals))


# ---------------------------------------------------------------------------


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
    convs = resolve_layers(model, layers, pruning.layer_types)
    check_prunable(model, convs)
    levels = check_sparsities(sparsities)
    blocks = pruning.blocks(model, convs)  # a channel method's groups: one point per group
    blocks = _feasible(blocks, pruning, levels[-1], named=layers is not None)
    check_prunable(model, [layer for block in blocks.values() for layer in pruning.block_layers(block)])
    scores = pruning.scores(model, blocks)  # from the dense model, before any point
    targets = {key: _targets(block, key, pruning) for key, block in blocks.items()}
    name, direction = _metric_identity(evaluate, higher_is_better)
    total_batches = _check_settling(evaluate, confidence, max_drop)
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
        _check_resume(resume_from, result)
        result.scores = {layer: list(values) for layer, values in resume_from.scores.items()}
        result.estimates = {layer: list(values) for layer, values in resume_from.estimates.items()}
    masker = _Masker(blocks, pruning, scores)

    main = rank_and_world()[0] == 0
    report = on_point if (on_point is not None and main) else None
    guard = _Guard(model)
    try:
        model.eval()
        baseline, statistics = _dense_baseline(evaluate, model)
        guard.reset_point()
        fingerprint = _fingerprint(pruning, statistics, scores)
        fingerprint["settle"] = None if confidence is None else {
            "confidence": float(confidence), "max_drop": float(max_drop), "relative": bool(relative)}  # type: ignore[arg-type]
        if resume_from is not None:
            _check_resumed_baseline(resume_from, baseline, fingerprint)
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


def _check_settling(evaluate: Any, confidence: Optional[float], max_drop: Optional[float]) -> int:
    """The number of batches a settling scan looks at (0 without settling); errors before any work."""
    if confidence is None:
        return 0
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.5 <= confidence < 1:
        raise ValueError(f"confidence={confidence!r} must be in [0.5, 1), e.g. 0.99 (None: exact scores)")
    if max_drop is None:
        raise ValueError("confidence needs max_drop: the tolerance whose verdicts settle (e.g. max_drop=0.01)")
    if not isinstance(evaluate, ForwardMetric):
        raise ValueError("confidence needs a ForwardMetric (OutputDistortion, Accuracy): a plain callable gives "
                         "one number per point, nothing to stop early")
    total = evaluate.num_batches()
    if total is None:
        raise ValueError(f"confidence needs to know how many batches {type(evaluate).__name__} has: pass a list "
                         "of batches or a DataLoader")
    return int(total)


def _dense_baseline(evaluate: Any, model: nn.Module) -> Tuple[float, Optional[Tensor]]:
    """The dense model's score (and a ForwardMetric's summed statistics), refused when not finite."""
    statistics = None
    if isinstance(evaluate, ForwardMetric):
        evaluate.prepare(model)
        recorded = getattr(evaluate, "dense_statistics", None)  # prepare() may have seen every batch already
        statistics = recorded() if recorded is not None else None
        if statistics is None:
            statistics = _forward_statistics(evaluate, model)
        baseline = evaluate.reduce(statistics)
    else:
        baseline = _score(evaluate(model))
    if not math.isfinite(baseline):
        raise ValueError(
            f"the dense model scores {baseline} before any pruning, so no point could be judged against it; "
            "check the evaluation data and the metric (NaN or Inf in the inputs, or a metric that returns NaN)"
        )
    return baseline, statistics


def _check_resumed_baseline(resume_from: SensitivityResult, baseline: float, fingerprint: Mapping[str, Any]) -> None:
    previous = resume_from.baseline
    if previous is not None and not math.isclose(baseline, previous, rel_tol=1e-6, abs_tol=1e-9):
        raise ValueError(
            f"the dense model scores {baseline!r} but the partial scan measured {previous!r}: "
            "the model, data or metric changed; start a new scan"
        )
    _check_fingerprint(resume_from.meta.get("fingerprint"), fingerprint)


class _Points:
    """The points of a scan still to measure, and the two ways of measuring them."""

    def __init__(
        self, model: nn.Module, evaluate: Any, result: SensitivityResult, targets: Mapping[str, List[Target]],
        masker: _Masker, guard: "_Guard", report: Optional[Callable[[SensitivityResult], None]],
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
            self.result.scores[layer][i] = _not_nan(value, layer, self.levels[i])
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
                        values[i] = _forward_score(self.evaluate, self.model)
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
                    local[rank] = _score(self.evaluate(self.model))
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
    guard: "_Guard",
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
                    estimate = settler.verdict(_gathered(rows[i], number + 1), seed=seed + 7919 * i + number)
                    if estimate is not None:
                        settled[i] = estimate
                        del active[i]
                if not active:
                    break
    results: Dict[int, Union[float, Estimate]] = dict(settled)
    for i in masked:
        if i not in settled:
            results[i] = metric.reduce(_summed(metric, totals[i]))
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


def _gathered(rows: Sequence[Tuple[int, Tensor]], seen: int) -> Tensor:
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
              else _Masker(blocks, pruning, scores))
    targets: List[Target] = []
    masked: List[Tensor] = []
    for key, sparsity in levels.items():
        block_targets = _targets(blocks[key], key, pruning)
        targets += block_targets
        masked += masker.masked(key, block_targets, sparsity)
    if scorer is None:
        masker.release()
    guard = _Guard(model)
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
                settled = _settled_forward_score(evaluate, model, settler, seed=len(targets), tolerance=tolerance)
                if isinstance(settled, Estimate):
                    return settled
                score = settled
            elif isinstance(evaluate, ForwardMetric):
                score = _forward_score(evaluate, model)  # sharded over the ranks of a process group
            else:
                score = _score(evaluate(model))
        if math.isnan(score):
            raise ValueError("the plan's score is NaN: the metric returned NaN; fix the metric and evaluate again")
        return score
    finally:
        guard.restore()
