"""Steps every smaller copy shares: the training flags carried over, biases folded in float64, tensors filled in.

The handlers' ``resize`` (:mod:`prunekit.dependency.handlers`) build on these.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["copy_training", "fill", "folded_bias"]


def copy_training(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` in ``old``'s training mode, each parameter with ``old``'s ``requires_grad``; returns ``new``."""
    new.train(old.training)
    for name, param in new.named_parameters(recurse=False):
        old_param = getattr(old, name, None)
        if isinstance(old_param, nn.Parameter):
            param.requires_grad_(old_param.requires_grad)
    return new


def folded_bias(bias: Optional[Tensor], fold: Tensor, features: int, device: torch.device) -> Tensor:
    """``bias + fold`` in float64 (a missing bias counts as zeros)."""
    base = bias.double() if bias is not None else torch.zeros(features, dtype=torch.float64, device=device)
    return base + fold


def fill(new: nn.Module, weight: Tensor, bias: Optional[Tensor]) -> None:
    """Copy ``weight`` (and ``bias``, at the weight's dtype) into the freshly built layer ``new``."""
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias.to(weight.dtype))
