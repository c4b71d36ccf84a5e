"""Fine-grained (unstructured) L1 magnitude pruning with an exact count of zeros."""

from __future__ import annotations

from typing import Callable, List, Optional

import torch
from torch import nn
from torch.nn.utils import prune

from prunekit.layers import ConvBlock
from prunekit.methods._amount import Amount, check_amount, count_to_prune
from prunekit.methods.base import PruningMethod, Target

__all__ = ["FineGrainedL1", "FineGrainedMethod", "fine_grained_l1", "magnitude_order"]


def magnitude_order(t: torch.Tensor) -> torch.Tensor:
    """Flat indices of ``t`` from the smallest magnitude up; a stable sort breaks ties by position.

    Example:
        >>> magnitude_order(torch.tensor([0.5, -0.1, 0.1])).tolist()
        [1, 2, 0]
    """
    return torch.argsort(t.detach().abs().reshape(-1), stable=True)


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
            mask.view(-1)[magnitude_order(t)[:count]] = 0
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


class FineGrainedMethod(PruningMethod):
    """``"fine-grained"``: the conv weight's smallest-magnitude entries (:class:`FineGrainedL1`); data-free.

    A sparsity is the fraction of the weight's entries that are zero. It prunes convs and
    ``nn.Linear`` layers (an MLP's or a ViT's weights, a classifier's).

    Example:
        >>> conv = nn.Conv2d(3, 8, 3)
        >>> from prunekit.layers import conv_block
        >>> block = conv_block(nn.Sequential(conv), "0")
        >>> [mask.mean().item() for mask in FineGrainedMethod().mask_maker(block, None)(0.25)]
        [0.75]
    """

    name = "fine-grained"
    layer_types = (nn.Conv2d, nn.Linear)
    unit = "weights"

    def targets(self, block: ConvBlock) -> List[Target]:
        return [(block.conv, "weight")]

    def current_sparsity(self, block: ConvBlock) -> float:
        return float((block.conv.weight.detach() == 0).float().mean())

    def apply(self, block: ConvBlock, layer: str, sparsity: float, scores: Optional[torch.Tensor]) -> None:
        conv = block.conv
        total = conv.weight.numel()
        target = round(sparsity * total)
        done = int((conv.weight_mask == 0).sum()) if hasattr(conv, "weight_mask") else 0
        if done > target:
            raise ValueError(
                f"layer {layer!r} already has {done / total:.4f} sparsity, above the planned "
                f"{sparsity:.4f}; a plan sets final sparsities and cannot regrow weights: "
                "apply it to the unpruned model"
            )
        if target > done:
            FineGrainedL1.apply(conv, "weight", amount=target - done)

    def mask_maker(self, block: ConvBlock, scores: Optional[torch.Tensor]) -> Callable[[float], List[torch.Tensor]]:
        weight = block.conv.weight
        order = magnitude_order(weight)  # sorted once per layer: it does not depend on the level

        def masks(sparsity: float) -> List[torch.Tensor]:
            mask = torch.ones_like(weight, memory_format=torch.contiguous_format)
            count = round(sparsity * weight.numel())
            if count:
                mask.view(-1)[order[:count]] = 0
            return [mask]

        return masks
