"""``amount`` as torch means it: an int is a count, a float in [0, 1] a fraction."""

from __future__ import annotations

import numbers
from typing import Union

__all__ = ["Amount", "check_amount", "count_to_prune"]

Amount = Union[int, float]


def check_amount(amount: Amount) -> None:
    """Raise if ``amount`` is neither a non-negative int nor a float in [0, 1]."""
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
        raise TypeError(
            f"amount={amount!r} has type {type(amount).__name__}; pass an int (a count) "
            "or a float in [0, 1] (a fraction)"
        )
    if isinstance(amount, numbers.Integral):
        if amount < 0:
            raise ValueError(f"amount={amount} is negative; pass a count >= 0")
    elif not 0.0 <= float(amount) <= 1.0:
        raise ValueError(
            f"amount={amount} is outside [0, 1]; a float is the fraction to prune "
            "(use an int for a count)"
        )


def count_to_prune(amount: Amount, size: int, what: str = "entries") -> int:
    """Convert ``amount`` into a count out of ``size``, raising if it asks for more than ``size``."""
    check_amount(amount)
    count = int(amount) if isinstance(amount, numbers.Integral) else round(float(amount) * size)
    if count > size:
        raise ValueError(
            f"amount={amount} asks to prune {count} {what} but only {size} are prunable; "
            f"pass at most {size}, or a fraction in [0, 1]"
        )
    return count
