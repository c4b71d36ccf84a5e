"""``nn.PReLU``: element-wise; with one slope per channel, resized with its channels.

Example:
    >>> from torch import nn
    >>> resize_prelu(nn.PReLU(4), torch.tensor([1, 2])).num_parameters
    2
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.dependency.flow import CONV, FlowTracer
from prunekit.dependency.registry import ConstantContext, Handler, register_handler
from prunekit.dependency.resize import copy_training

__all__ = ["PReLUHandler", "resize_prelu"]


class PReLUHandler(Handler):
    """One shared slope: the channels pass; one slope per channel: the slopes follow them."""

    resizable = True

    def trace(self, tracer: FlowTracer, node: fx.Node, module: Optional[nn.Module]) -> None:
        if module.num_parameters == 1:
            tracer.pass_through(node)
            return
        tracked = tracer.single(node)
        if tracked is None or tracked.layout != CONV or type(module) is not nn.PReLU or module.num_parameters != len(tracked.ids):
            tracer.unsupported(node, f"has {module.num_parameters} parameters that do not match its channels")
            return
        tracer.flow.per_channel[node.target] = tracked.ids
        tracer.flow.values[node] = tracked

    def constant(self, constants: ConstantContext, node: fx.Node, module: Optional[nn.Module]) -> Tensor:
        tracked = constants.flow.values[node]
        incoming = constants.incoming(node)
        shape = (1, -1, 1, 1) if tracked.layout == CONV else (1, -1)
        with torch.no_grad():
            out = F.prelu(incoming.view(shape), module.weight.detach().double().cpu())
        return out.reshape(-1).double()

    def resize(
        self, module: nn.Module, keep_in: Optional[Tensor], keep_out: Optional[Tensor], fold: Optional[Tensor]
    ) -> nn.Module:
        return resize_prelu(module, keep_out)


def resize_prelu(prelu: nn.PReLU, keep: Tensor) -> nn.PReLU:
    """A copy of a per-channel ``prelu`` with only the channels ``keep``."""
    weight = prelu.weight.detach().index_select(0, keep)
    new = nn.PReLU(len(keep), device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
    return copy_training(new, prelu)


register_handler(nn.PReLU, PReLUHandler())
