"""Ops that pick channels by position: indexing and splits at fixed sizes. Refused, naming the node.

Removing a channel would move every later position, so the channels that meet them are fixed. The one index
followed is item 0 of an attention's (output, weights) pair (:mod:`prunekit.dependency.handlers.attention`).

Example:
    >>> import operator
    >>> from prunekit.dependency.registry import handler_for_method
    >>> type(handler_for_method("chunk")).__name__
    'FixedSplitHandler'
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx
from torch import Tensor, nn

from prunekit.dependency.flow import LAST, PAIR, FlowTracer, Tracked
from prunekit.dependency.registry import ConstantContext, Handler, register_handler

__all__ = ["FixedSplitHandler", "IndexingHandler"]


class FixedSplitHandler(Handler):
    """``torch.chunk``/``torch.split`` (and the tensor methods): the forward splits at fixed sizes."""

    def trace(self, tracer: FlowTracer, node: fx.Node, module: Optional[nn.Module]) -> None:
        tracer.unsupported(node, "splits the channels at fixed sizes (removing one would move the split)")


class IndexingHandler(Handler):
    """``x[...]``: prunekit follows only whole channels, and the output of an attention's (output, weights) pair."""

    def trace(self, tracer: FlowTracer, node: fx.Node, module: Optional[nn.Module]) -> None:
        source = tracer.tracked(node.args[0])
        if source is not None and source.layout == PAIR and len(node.args) == 2 and node.args[1] in (0, 1):
            if node.args[1] == 0:  # the attention's output; its weights (item 1) carry no channels
                tracer.flow.values[node] = Tracked(source.ids, LAST)
            return
        tracer.unsupported(node, "indexes the tensor (prunekit follows only whole channels)")

    def constant(self, constants: ConstantContext, node: fx.Node, module: Optional[nn.Module]) -> Tensor:
        return constants.incoming(node)


_SPLIT = FixedSplitHandler()
for _op in (torch.chunk, torch.split, "chunk", "split"):
    register_handler(_op, _SPLIT)
register_handler(operator.getitem, IndexingHandler())
