"""Compact a pruned model and measure what it buys: costs before and after, latency side by side, export checks.

What ``prunekit compact`` runs, as one call: :func:`compact_and_measure`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import prunekit
    >>> model = prunekit.apply_plan(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)), {"0": 0.5},
    ...                             method="filter-norm")
    >>> run = compact_and_measure(model, (3, 16, 16), repeats=3)
    >>> run.removed, run.small[0].out_channels, run.speedup is not None
    (True, 4, True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

__all__ = ["CompactRun", "WARMUP_ROUNDS", "compact_and_measure"]

#: Timing rounds run and thrown away before the measured ones (caches, allocator, lazy init).
WARMUP_ROUNDS = 3


@dataclass
class CompactRun:
    """What :func:`compact_and_measure` built and measured.

    Attributes:
        small: the compacted model.
        report: params and MACs before and after (:class:`~prunekit.compact.report.CompactionReport`).
        removed: whether anything was removed (else nothing was timed).
        timing: ``{"pruned": Spread, "compact": Spread}`` of the seconds per input, when timed.
        speedup: the :class:`~prunekit.measure.timing.Speedup` with its interval, when timed.
        checks: relative differences: ``exported`` and ``onnx`` (each export loaded back, against the
            compacted model) and ``compact_vs_source`` (against the pruned model), for the exports asked for.
        example: the input everything was run on (seeded).
    """

    small: nn.Module
    report: Any
    removed: bool
    timing: Dict[str, Any] = field(default_factory=dict)
    speedup: Any = None
    checks: Dict[str, float] = field(default_factory=dict)
    example: Optional[torch.Tensor] = None


def compact_and_measure(
    model: nn.Module, input_size: Sequence[int], repeats: int = 20, *, exported: Optional[str] = None,
    onnx: Optional[str] = None, seed: int = 0, dense: Optional[nn.Module] = None,
) -> CompactRun:
    """Compact ``model`` (masked or zero channels removed), compare costs, time both side by side, export.

    Args:
        model: the pruned model (left as it was).
        input_size: one input's shape without the batch (``(3, 224, 224)``).
        repeats: interleaved timing rounds after :data:`WARMUP_ROUNDS` warm-up rounds (identical models
            are not timed: any "speed-up" between them would be noise).
        exported, onnx: also write the compacted model there as a ``torch.export`` program or ONNX, each
            checked after loading it back.
        seed: the seed of the random example input.
        dense: the model the costs and times are compared with instead of ``model``: for a model ``compact``
            already built (a compacted checkpoint), its dense architecture (timed in the ``"pruned"`` slot).
    """
    from prunekit.compact import compact, compaction_report
    from prunekit.measure.timing import latency_samples, speedup, spread
    from prunekit.measure.error import relative_error

    example = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(seed))
    small = compact(model, example_input=example)
    before = model if dense is None else dense
    report = compaction_report(before, small, tuple(input_size))
    run = CompactRun(small, report, report.params_after < report.params_before, example=example)
    if run.removed:
        samples = latency_samples({"pruned": before, "compact": small}, example, repeats=repeats, warmup=WARMUP_ROUNDS)
        run.speedup = speedup(samples["pruned"], samples["compact"])
        run.timing = {"pruned": spread(samples["pruned"]), "compact": spread(samples["compact"])}
    if exported is not None or onnx is not None:
        from prunekit.export import export_onnx, export_program

        if exported is not None:
            run.checks["exported"] = export_program(small, example, exported)
        if onnx is not None:
            run.checks["onnx"] = export_onnx(small, example, onnx)
        with torch.no_grad():
            # Against the source (pruned) model too: the compaction's own difference is part of it.
            run.checks["compact_vs_source"] = relative_error(small(example), model(example))
    return run
