"""How far an output moved: the one relative L2 distance of prunekit, and the tensors of a nested output.

Scans, recovery, compaction's self-check and the export checks all measure with
:func:`relative_error`.

Example:
    >>> relative_distance(1.0, 4.0)
    0.5
"""

from __future__ import annotations

import math
from typing import Any, Iterator

from torch import Tensor

__all__ = ["relative_distance", "relative_error", "tensors_in"]


def relative_distance(squared_error: float, squared_norm: float) -> float:
    """``sqrt(squared_error / squared_norm)``; 0 for 0/0 and inf for x/0 (a dense output of zeros).

    Example:
        >>> relative_distance(1.0, 4.0)
        0.5
    """
    if squared_norm > 0.0:
        return math.sqrt(squared_error / squared_norm)
    return 0.0 if squared_error == 0.0 else math.inf


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """``||actual - expected|| / ||expected||``, summed in float64 (as :func:`relative_distance`: 0 for 0/0).

    The one relative L2 distance of prunekit: scans, recovery, compaction's self-check and
    the export checks all measure with it.

    Example:
        >>> import torch
        >>> relative_error(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 0.0]))
        1.3333333333333333
    """
    expected64, actual64 = expected.detach().double(), actual.detach().double().to(expected.device)
    return relative_distance(float((actual64 - expected64).pow(2).sum()), float(expected64.pow(2).sum()))


def tensors_in(value: Any) -> Iterator[Tensor]:
    """The tensors in a value: a tensor, or a tuple, list or dict of them (nested), in order.

    Example:
        >>> import torch
        >>> [t.item() for t in tensors_in((torch.tensor(1), {"a": [torch.tensor(2)]}, "text"))]
        [1, 2]
    """
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)
