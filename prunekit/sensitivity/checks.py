"""The scan's checks of its inputs and of a resume: refusals with the fix in the message, before any work.

Example:
    >>> metric_identity(lambda model: 1.0, None)
    ('score', True)
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from torch import Tensor

from prunekit.methods.base import PruningMethod, Target
from prunekit.sensitivity.metrics import ForwardMetric
from prunekit.sensitivity.result import SensitivityResult

__all__ = [
    "check_fingerprint", "check_resume", "check_resumed_baseline", "check_settling", "feasible_blocks",
    "metric_identity", "not_nan", "scan_fingerprint", "scan_targets", "score_value",
]


def metric_identity(evaluate: Callable[..., Any], higher_is_better: Optional[bool]) -> Tuple[str, bool]:
    name = getattr(evaluate, "name", None)
    if not isinstance(name, str) or not name:
        name = getattr(evaluate, "__name__", "score")
        name = "score" if name == "<lambda>" else name
    if higher_is_better is None:
        higher_is_better = getattr(evaluate, "higher_is_better", True)
    return name, bool(higher_is_better)

def score_value(value: Any) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"evaluate(model) returned {type(value).__name__}; it must return a number")
    return float(value)

def not_nan(value: float, layer: str, level: float) -> float:
    """A point's score, refused when NaN (a NaN would read as "beyond any tolerance" and plan nothing)."""
    if math.isnan(value):
        raise ValueError(
            f"the score of {layer} at {level:.0%} sparsity is NaN: the metric returned NaN for this point; "
            "fix the metric (or the model's numerics) and scan again"
        )
    return value

def scan_targets(block: Any, layer: str, pruning: PruningMethod) -> List[Target]:
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

def feasible_blocks(blocks: Dict[str, Any], pruning: PruningMethod, highest: float, named: bool) -> Dict[str, Any]:
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

def scan_fingerprint(
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

def check_fingerprint(previous: Optional[Mapping[str, Any]], current: Mapping[str, Any]) -> None:
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

def check_resume(previous: SensitivityResult, fresh: SensitivityResult) -> None:
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

def check_settling(evaluate: Any, confidence: Optional[float], max_drop: Optional[float]) -> int:
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

def check_resumed_baseline(resume_from: SensitivityResult, baseline: float, fingerprint: Mapping[str, Any]) -> None:
    previous = resume_from.baseline
    if previous is not None and not math.isclose(baseline, previous, rel_tol=1e-6, abs_tol=1e-9):
        raise ValueError(
            f"the dense model scores {baseline!r} but the partial scan measured {previous!r}: "
            "the model, data or metric changed; start a new scan"
        )
    check_fingerprint(resume_from.meta.get("fingerprint"), fingerprint)
