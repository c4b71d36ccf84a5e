"""Multiply-accumulates per sample: prunekit's one MAC counter (sparsity reports and compaction use it).

A module called several times in one forward counts every call, as torch's
``FlopCounterMode`` does (its FLOPs are 2 x these dense MACs; the tests check it).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from prunekit._rollback import eval_mode

__all__ = ["batched_shape", "count_macs"]


def batched_shape(input_size: Sequence[int], dims: Optional[int] = None) -> Tuple[int, ...]:
    """``input_size`` with a batch of one in front of a ``(C, H, W)`` shape, checked (``dims``: the length required).

    The one normaliser of input sizes (MAC counts, compaction reports).

    Example:
        >>> batched_shape((3, 8, 8)), batched_shape((2, 3, 8, 8), dims=4)
        ((1, 3, 8, 8), (2, 3, 8, 8))
    """
    shape = tuple(int(v) for v in input_size)
    if len(shape) == 3:
        shape = (1,) + shape
    if len(shape) < 2 or (dims is not None and len(shape) != dims) or any(v <= 0 for v in shape):
        raise ValueError(
            f"input_size={tuple(input_size)!r} must be (C, H, W) or (N, C, H, W) with positive sizes, e.g. (3, 224, 224)"
        )
    return shape


def count_macs(
    model: nn.Module, input_size: Sequence[int], layers: Optional[Dict[str, nn.Module]] = None
) -> "Dict[str, Tuple[int, int]]":
    """Multiply-accumulates per sample of each ``Conv2d`` / ``Linear``: ``{name: (dense, on non-zero weights)}``.

    prunekit's one MAC counter (``sparsity_report`` and ``compaction_report`` use it):
    a module called several times in one forward counts every call, as
    ``torch.utils.flop_counter.FlopCounterMode`` does (its FLOPs are 2 x these
    dense MACs; the tests check it). The model runs once on zeros, in eval mode,
    without gradients; its train/eval flags come back.

    Args:
        input_size: ``(C, H, W)`` or ``(N, C, H, W)``; counts are divided by ``N``.
        layers: ``{name: module}`` to count (default: every Conv2d and Linear).

    Example:
        >>> count_macs(nn.Sequential(nn.Conv2d(3, 8, 3)), (3, 8, 8))
        {'0': (7776, 7776)}
    """
    shape = batched_shape(input_size)
    if layers is None:
        layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    totals: Dict[str, List[int]] = {name: [0, 0] for name in layers}

    def hook_for(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            weight = module.weight
            if isinstance(module, nn.Conv2d):
                positions = output.numel() // module.out_channels
                dense = output.numel() * weight[0].numel()
            else:
                positions = output.numel() // module.out_features
                dense = positions * weight.numel()
            totals[name][0] += dense
            totals[name][1] += positions * int((weight != 0).sum())

        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in layers.items()]
    try:
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
        with torch.no_grad(), eval_mode(model):
            model(torch.zeros(shape, device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
    return {name: (dense // shape[0], effective // shape[0]) for name, (dense, effective) in totals.items()}
