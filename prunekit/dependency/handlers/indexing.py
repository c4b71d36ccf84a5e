"""Ops that pick channels by position: indexing and splits at fixed sizes. Refused, naming the node.

Removing a channel would move every later position, so the channels that meet them are fixed.

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
from torch import nn

from prunekit.dependency.flow import FlowTracer
from prunekit.dependency.registry import Handler, register_handler

__all__ = ["FixedSplitHandler", "IndexingHandler"]


class FixedSplitHandler(Handler):
    """``torch.chunk``/``torch.split`` (and the tensor methods): the forward splits at fixed sizes."""

    def trace(self, tracer: FlowTracer, node: fx.Node, module: Optional[nn.Module]) -> None:
        tracer.unsupported(node, "splits the channels at fixed sizes (removing one would move the split)")


class IndexingHandler(Handler):
    """``x[...]``: prunekit follows only whole channels."""

    def trace(self, tracer: FlowTracer, node: fx.Node, module: Optional[nn.Module]) -> None:
        tracer.unsupported(node, "indexes the tensor (prunekit follows only whole channels)")


_SPLIT = FixedSplitHandler()
for _op in (torch.chunk, torch.split, "chunk", "split"):
    register_handler(_op, _SPLIT)
register_handler(operator.getitem, IndexingHandler())
