"""The tolerance every verdict is about: how much worse than the dense score a pruned model may be.

One rule for the scan's per-layer plan, the plan fit, settling and the plots, so that all of
them call the same score "within". Below the result, settling and plotting alike (none of
them imports another for it).

Example:
    >>> within_tolerance(0.985, 1.0, higher_is_better=True, relative=False, max_drop=0.02)
    True
"""

from __future__ import annotations

import math
import numbers

__all__ = ["check_tolerance", "score_drop", "within_tolerance"]

# Differences of scores like accuracies (multiples of 1/N) carry float rounding;
# a drop equal to max_drop up to this much still counts as within tolerance.
_TOLERANCE_SLACK = 1e-12


def score_drop(score: float, baseline: float, higher_is_better: bool, relative: bool) -> float:
    """How much worse ``score`` is than ``baseline`` (negative when better; a fraction of it with ``relative``).

    Example:
        >>> score_drop(0.9, 1.0, True, False), score_drop(0.2, 0.1, False, False)
        (0.09999999999999998, 0.1)
    """
    drop = baseline - score if higher_is_better else score - baseline
    if relative:
        drop /= abs(baseline)
    return drop


def within_tolerance(score: float, baseline: float, higher_is_better: bool, relative: bool, max_drop: float) -> bool:
    """The one verdict of plans, fits and plots: ``score`` is at most ``max_drop`` worse than ``baseline``.

    A NaN score is never within. The comparison allows float rounding (``max_drop`` + 1e-12).

    Example:
        >>> within_tolerance(0.99, 1.0, True, False, 0.01), within_tolerance(0.98, 1.0, True, False, 0.01)
        (True, False)
    """
    return score_drop(score, baseline, higher_is_better, relative) <= max_drop + _TOLERANCE_SLACK


def check_tolerance(max_drop: float, baseline: float, relative: bool) -> None:
    """Refuse a ``max_drop`` that is not a finite number >= 0, or a relative one against a baseline of 0."""
    if isinstance(max_drop, bool) or not isinstance(max_drop, numbers.Real) or not math.isfinite(max_drop):
        raise TypeError(f"max_drop={max_drop!r} must be a finite number >= 0")
    if max_drop < 0:
        raise ValueError(f"max_drop={max_drop} is negative; pass the largest acceptable drop (>= 0)")
    if relative and baseline == 0:
        raise ValueError(
            "relative=True divides by the dense baseline, which is 0 here (e.g. OutputDistortion); "
            "pass an absolute max_drop instead"
        )
