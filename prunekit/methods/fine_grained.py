"""Fine-grained (unstructured) L1 magnitude pruning with an exact count of zeros."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.utils import prune

from prunekit.methods._amount import Amount, check_amount, count_to_prune

__all__ = ["FineGrainedL1", "fine_grained_l1"]


class FineGrainedL1(prune.BasePruningMethod):
    """Zero the ``amount`` entries of smallest absolute value (or smallest importance score).

    Exactly ``amount`` entries are pruned even when values tie: ties are broken
    by position (earlier entries first), never by a threshold that could take
    more or fewer. Used iteratively, ``amount`` counts among the entries still
    unpruned, as with torch's ``L1Unstructured``.

    Args:
        amount: an int is the number of entries to prune; a float in [0, 1] the fraction.

    Example:
        >>> conv = nn.Conv2d(3, 8, 3)
        >>> FineGrainedL1.apply(conv, "weight", amount=0.5)  # doctest: +ELLIPSIS
        <...FineGrainedL1 object at ...>
        >>> int((conv.weight == 0).sum())
        108
    """

    PRUNING_TYPE = "unstructured"

    def __init__(self, amount: Amount) -> None:
        check_amount(amount)
        self.amount = amount

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        count = count_to_prune(self.amount, t.nelement())
        mask = default_mask.clone(memory_format=torch.contiguous_format)
        if count:
            # A stable sort makes the choice among equal magnitudes deterministic.
            order = torch.argsort(t.detach().abs().reshape(-1), stable=True)
            mask.view(-1)[order[:count]] = 0
        return mask

    @classmethod
    def apply(  # type: ignore[override]
        cls,
        module: nn.Module,
        name: str,
        amount: Amount,
        importance_scores: Optional[torch.Tensor] = None,
    ) -> "FineGrainedL1":
        """Prune ``module.<name>`` in place with a forward pre-hook, like ``prune.l1_unstructured``."""
        return super().apply(module, name, amount=amount, importance_scores=importance_scores)


def fine_grained_l1(
    module: nn.Module,
    name: str = "weight",
    amount: Amount = 0.5,
    importance_scores: Optional[torch.Tensor] = None,
) -> nn.Module:
    """Prune ``module.<name>`` with :class:`FineGrainedL1` and return ``module``.

    Example:
        >>> linear = fine_grained_l1(nn.Linear(5, 7), "weight", amount=10)
        >>> int((linear.weight == 0).sum())
        10
    """
    if not hasattr(module, name):
        raise AttributeError(
            f"{type(module).__name__} has no tensor {name!r}; pass the name of a parameter, "
            f"e.g. {', '.join(n for n, _ in module.named_parameters(recurse=False)) or 'weight'}"
        )
    FineGrainedL1.apply(module, name, amount=amount, importance_scores=importance_scores)
    return module
