"""``nn.Linear``: makes new features from the ones it reads, after another Linear or a flatten.

After a flatten each input channel is a contiguous block of features: a removed channel takes
its block, and its constant times the block's weights is folded into the bias.

Example:
    >>> from torch import nn
    >>> resize_linear(nn.Linear(6, 3), torch.tensor([0, 5]), None, torch.tensor([2])).weight.shape
    torch.Size([1, 2])
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.fx as fx
from torch import Tensor, nn

from prunekit.dependency.flow import FLAT, LAST, Consumer, FlowTracer, Tracked, describe_node
from prunekit.dependency.registry import LayerHandler, register_handler
from prunekit.dependency.resize import copy_training, fill, folded_bias

__all__ = ["LinearHandler", "resize_linear"]


class LinearHandler(LayerHandler):
    """A plain ``nn.Linear`` reading a Linear's features or a flattened [N, C * block]."""

    def trace(self, tracer: FlowTracer, node: fx.Node, module: Optional[nn.Module]) -> None:
        name, flow = node.target, tracer.flow
        tracked = tracer.single(node)
        out_ids = flow.new_ids(module.out_features)
        if type(module) is not nn.Linear:
            why = f"is a {type(module).__name__}, not a plain nn.Linear"
            tracer.unsupported(node, why)
            flow.fix(out_ids, f"{describe_node(node, tracer.modules)} {why}")
            return
        if tracked is not None:
            ok = (tracked.layout == LAST and len(tracked.ids) == module.in_features) or (
                tracked.layout == FLAT and module.in_features % len(tracked.ids) == 0
            )
            if not ok:
                tracer.unsupported(
                    node,
                    f"has {module.in_features} input features, which do not match the {len(tracked.ids)} "
                    "channels it receives (nn.Linear is resized after a flatten or another nn.Linear)",
                )
                tracked = None
        if tracked is None:
            tracked = Tracked(tracer.input_ids(module.in_features, "features of the model's input"), LAST)
        flow.producers[name] = out_ids
        flow.consumers[name] = Consumer(name, tracked.ids, tracked.layout, node)
        flow.values[node] = Tracked(out_ids, LAST)

    def channels(self, module: nn.Module) -> Tuple[int, int]:
        return module.in_features, module.out_features

    def fold(
        self, name: str, module: nn.Module, consumer: Consumer, keep: Tensor, removed: Tensor, constant: Tensor
    ) -> Tuple[Tensor, Optional[Tensor]]:
        weights = module.weight.detach()
        block = module.in_features // len(consumer.ids)
        offsets = torch.arange(block)
        keep_in = (keep.view(-1, 1) * block + offsets).flatten().to(weights.device)
        columns = (removed.view(-1, 1) * block + offsets).flatten().to(weights.device)
        return keep_in, weights.index_select(1, columns).double() @ constant.repeat_interleave(block)

    def resize(
        self, module: nn.Module, keep_in: Optional[Tensor], keep_out: Optional[Tensor], fold: Optional[Tensor]
    ) -> nn.Module:
        return resize_linear(module, keep_in, fold, keep_out)


def resize_linear(
    linear: nn.Linear,
    keep_in: Optional[Tensor],
    fold: Optional[Tensor] = None,
    keep_out: Optional[Tensor] = None,
) -> nn.Linear:
    """A copy of ``linear`` with only the input features ``keep_in`` and outputs ``keep_out`` (``None``: all).

    ``fold`` [out] float64, the removed inputs' constant contribution, is added to the bias.
    """
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    if fold is not None and bool(fold.abs().sum() > 0):
        bias = folded_bias(bias, fold, linear.out_features, weight.device)
    if keep_out is not None:
        weight = weight.index_select(0, keep_out.to(weight.device))
        bias = bias.index_select(0, keep_out.to(weight.device)) if bias is not None else None
    if keep_in is not None:
        weight = weight.index_select(1, keep_in.to(weight.device))
    new = nn.Linear(
        weight.shape[1],
        weight.shape[0],
        bias=bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    fill(new, weight, bias)
    return copy_training(new, linear)


register_handler(nn.Linear, LinearHandler())
