"""``nn.BatchNorm2d``: one scale and shift per channel; a removed channel's constant is normalised with the running statistics.

The constant a masked conv's channel carries (its bias, 0 when masked) leaves the BatchNorm as
``(c - mean) / sqrt(var + eps) * gamma + beta``: exact in eval mode, where compaction is.

Example:
    >>> from torch import nn
    >>> resize_batchnorm(nn.BatchNorm2d(4), torch.tensor([0, 3])).num_features
    2
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
from torch import Tensor, nn

from prunekit.dependency.flow import CONV, FlowTracer
from prunekit.dependency.registry import ConstantContext, Handler, register_handler
from prunekit.dependency.resize import copy_training

__all__ = ["BatchNormHandler", "batchnorm_constant", "resize_batchnorm"]


class BatchNormHandler(Handler):
    """A plain ``nn.BatchNorm2d`` whose features are the channels it receives."""

    resizable = True

    def trace(self, tracer: FlowTracer, node: fx.Node, module: Optional[nn.Module]) -> None:
        tracked = tracer.single(node)
        if tracked is None or tracked.layout != CONV or type(module) is not nn.BatchNorm2d or module.num_features != len(tracked.ids):
            tracer.unsupported(node, "does not match the channels it receives")
            return
        tracer.flow.per_channel[node.target] = tracked.ids
        tracer.flow.values[node] = tracked

    def constant(self, constants: ConstantContext, node: fx.Node, module: Optional[nn.Module]) -> Tensor:
        incoming = constants.incoming(node)
        device = module.running_mean.device if module.running_mean is not None else "cpu"
        out = batchnorm_constant(module, incoming.to(device)).cpu()
        removed = constants.mask(constants.flow.values[node].ids)
        if bool((out[removed] != 0).any()):
            constants.batchnorms.append(node.target)
        return out

    def resize(
        self, module: nn.Module, keep_in: Optional[Tensor], keep_out: Optional[Tensor], fold: Optional[Tensor]
    ) -> nn.Module:
        return resize_batchnorm(module, keep_out)


def batchnorm_constant(bn: nn.BatchNorm2d, constant: Tensor) -> Tensor:
    """A BatchNorm's output for constant input channels, with its running statistics (eval mode), float64."""
    if bn.running_mean is not None and bn.running_var is not None:
        mean = bn.running_mean.detach().double()
        var = bn.running_var.detach().double()
        out = (constant - mean) / torch.sqrt(var + bn.eps)
    else:
        out = torch.zeros_like(constant)  # batch statistics of a constant channel: (c - c) / std
    if bn.affine:
        out = out * bn.weight.detach().double() + bn.bias.detach().double()
    return out


def resize_batchnorm(bn: nn.BatchNorm2d, keep: Tensor) -> nn.BatchNorm2d:
    """A copy of ``bn`` with only the channels ``keep`` (affine parameters and running statistics)."""
    new = nn.BatchNorm2d(
        len(keep),
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        device=keep.device if bn.weight is None else bn.weight.device,
        dtype=None if bn.weight is None else bn.weight.dtype,
    )
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight.detach().index_select(0, keep))
            new.bias.copy_(bn.bias.detach().index_select(0, keep))
        if bn.running_mean is not None:
            new.running_mean = bn.running_mean.index_select(0, keep.to(bn.running_mean.device)).clone()
            new.running_var = bn.running_var.index_select(0, keep.to(bn.running_var.device)).clone()
        else:
            new.running_mean = None
            new.running_var = None
        if bn.num_batches_tracked is not None:
            new.num_batches_tracked = bn.num_batches_tracked.clone()
        else:
            new.num_batches_tracked = None
    return copy_training(new, bn)


register_handler(nn.BatchNorm2d, BatchNormHandler())
