"""torch's pruning reparametrization (``weight_orig`` x ``weight_mask``): find it, make it permanent, copy through it.

These work on any ``torch.nn.utils.prune`` method, not only prunekit's.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Iterator, Tuple

import torch
from torch import nn
from torch.nn.utils import prune

__all__ = ["copy_model", "finalize", "pruned_tensors"]


def pruned_tensors(model: nn.Module) -> Iterator[Tuple[str, nn.Module, str, prune.BasePruningMethod]]:
    """Yield ``(module_name, module, tensor_name, method)`` for every pruning reparametrization."""
    for module_name, module in model.named_modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                yield module_name, module, hook._tensor_name, hook


def finalize(model: nn.Module) -> nn.Module:
    """Make pruning permanent: every ``<name>_orig``/``<name>_mask`` pair becomes a plain parameter.

    The zeros stay (as +0.0), the forward pre-hooks (and their per-forward mask
    multiply) go, and the state_dict loads into a fresh model of the same class.
    Works on any torch pruning method, not only prunekit's.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3))
        >>> _ = prune.l1_unstructured(model[0], "weight", amount=0.5)
        >>> model = finalize(model)
        >>> sorted(model.state_dict())
        ['0.bias', '0.weight']
    """
    for _, module, name, _ in list(pruned_tensors(model)):
        prune.remove(module, name)
        tensor = getattr(module, name)
        with torch.no_grad():
            # orig * mask leaves -0.0 where a negative weight was masked; a
            # plain +0.0 is the same number and compresses better.
            tensor.masked_fill_(tensor == 0, 0.0)
    return model


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also works on a pruned model, which it leaves untouched.

    torch keeps the masked tensor (``weight = weight_orig * weight_mask``) as a
    non-leaf tensor, which ``copy.deepcopy`` refuses once autograd recorded it.
    The copy gets a detached clone of it (and of any other non-leaf tensor a module
    holds); its forward pre-hook recomputes it from the copy's own ``weight_orig``
    and mask at every forward.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3))
        >>> twin = copy_model(prune.l1_unstructured(model[0], "weight", amount=0.5) and model)
        >>> hasattr(twin[0], "weight_mask")
        True
    """
    memo: Dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)
