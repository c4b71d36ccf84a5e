"""``torch.cat`` along the channels: the parts' channels side by side, each producer keeping its offsets.

Example:
    >>> import torch
    >>> from prunekit.dependency.registry import handler_for
    >>> from torch import fx
    >>> graph = fx.symbolic_trace(lambda x: torch.cat([x, x], 1)).graph
    >>> [type(handler_for(n, {})).__name__ for n in graph.nodes if n.op == "call_function"]
    ['CatHandler']
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
from torch import Tensor, nn

from prunekit.dependency.flow import CONV, FLAT, FlowTracer, Tracked, arg
from prunekit.dependency.registry import ConstantContext, Handler, register_handler

__all__ = ["CatHandler"]


class CatHandler(Handler):
    """Concatenation along dim 1 of [N, C, H, W] or the last dim of Linear features."""

    def trace(self, tracer: FlowTracer, node: fx.Node, module: Optional[nn.Module]) -> None:
        parts = arg(node, 0, "tensors", ())
        dim = arg(node, 1, "dim", 0)
        tracked = [tracer.tracked(p) for p in parts]
        if not tracked or any(t is None for t in tracked):
            tracer.unsupported(node, "concatenates tensors whose channels prunekit does not follow")
            return
        layout = tracked[0].layout
        ok_dim = dim == 1 if layout in (CONV, FLAT) else dim == -1
        if not ok_dim or any(t.layout != layout for t in tracked) or layout == FLAT:
            tracer.unsupported(node, f"concatenates along dim {dim}, not the channels")
            return
        tracer.flow.values[node] = Tracked(tuple(i for t in tracked for i in t.ids), layout)

    def constant(self, constants: ConstantContext, node: fx.Node, module: Optional[nn.Module]) -> Tensor:
        parts = arg(node, 0, "tensors", ())
        return torch.cat([constants.at(p, len(constants.flow.values[p].ids)) for p in parts])


register_handler(torch.cat, CatHandler())
