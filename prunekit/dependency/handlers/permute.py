"""``permute``: the channels move with their dimension, to dim 1 ([N, C, ...]) or to the last ([N, ..., C]).

ConvNeXt's blocks run their MLP channels-last: ``Permute([0, 2, 3, 1])`` before the LayerNorm and
the ``nn.Linear`` pair, ``Permute([0, 3, 1, 2])`` after. A permute that puts the channels anywhere else
is not followed.

Example:
    >>> from prunekit.dependency.registry import handler_for_method
    >>> type(handler_for_method("permute")).__name__
    'PermuteHandler'
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn

from prunekit.dependency.flow import CONV, LAST, FlowTracer, Tracked
from prunekit.dependency.registry import ConstantContext, Handler, register_handler

__all__ = ["PermuteHandler", "permuted_layout"]


def permuted_layout(layout: str, dims: Sequence[int]) -> Optional[str]:
    """Where the channels of a ``layout`` tensor sit after ``permute(dims)`` (None: neither dim 1 nor the last).

    Example:
        >>> permuted_layout("conv", [0, 2, 3, 1]), permuted_layout("last", [0, 3, 1, 2]), permuted_layout("conv", [1, 0, 2, 3])
        ('last', 'conv', None)
    """
    n = len(dims)
    if n < 2 or layout not in (CONV, LAST) or not all(isinstance(d, int) for d in dims):
        return None
    dims = [d % n for d in dims]
    if sorted(dims) != list(range(n)) or dims[0] != 0:
        return None  # the batch dimension stays first
    source = 1 if layout == CONV else n - 1
    position = dims.index(source)
    return LAST if position == n - 1 else CONV if position == 1 else None


class PermuteHandler(Handler):
    """``torch.permute(x, dims)`` and ``x.permute(*dims)``."""

    def trace(self, tracer: FlowTracer, node: fx.Node, module: Optional[nn.Module]) -> None:
        tracked = tracer.tracked(node.args[0]) if node.args else None
        dims = node.args[1:] if node.op == "call_method" else node.args[1:2]
        dims = node.kwargs.get("dims", dims)
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        layout = permuted_layout(tracked.layout, list(dims)) if tracked is not None else None
        if layout is None or node.kwargs.keys() - {"dims"}:
            tracer.unsupported(node, "moves the channels off dim 1 and the last dim")
            return
        tracer.flow.values[node] = Tracked(tracked.ids, layout)

    def constant(self, constants: ConstantContext, node: fx.Node, module: Optional[nn.Module]) -> Tensor:
        return constants.incoming(node)


_PERMUTE = PermuteHandler()
for _op in (torch.permute, "permute"):
    register_handler(_op, _PERMUTE)
