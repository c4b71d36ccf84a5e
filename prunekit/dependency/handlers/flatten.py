"""Flattening [N, C, H, W] to [N, C * H * W]: each channel becomes a contiguous block of features.

``nn.Flatten()``, ``torch.flatten(x, 1)``, ``x.flatten(1)`` and ``x.view(x.size(0), -1)``
(or ``reshape``) are followed into the ``nn.Linear`` that reads them; other flattens and
reshapes mix channels and are not.

Example:
    >>> from torch import nn
    >>> from prunekit.dependency.registry import handler_of
    >>> type(handler_of(nn.Flatten())).__name__
    'FlattenHandler'
"""

from __future__ import annotations

import builtins
import operator
from typing import Any, Dict, Optional

import torch
import torch.fx as fx
from torch import Tensor, nn

from prunekit.dependency.flow import CONV, FLAT, FlowTracer, Tracked, arg
from prunekit.dependency.registry import ConstantContext, Handler, register_handler

__all__ = ["FlattenHandler", "is_flatten"]


def _is_batch_size(value: Any, source: fx.Node) -> bool:
    """``x.size(0)`` or ``x.shape[0]`` of ``source``."""
    if not isinstance(value, fx.Node):
        return False
    if value.op == "call_method" and value.target == "size":
        return value.args[0] is source and arg(value, 1, "dim", None) == 0
    if value.op == "call_function" and value.target is operator.getitem:
        shape = value.args[0]
        return (
            isinstance(shape, fx.Node)
            and shape.op == "call_function"
            and shape.target is builtins.getattr
            and shape.args[0] is source
            and shape.args[1] == "shape"
            and value.args[1] == 0
        )
    return False


def is_flatten(node: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    """Does ``node`` flatten [N, C, H, W] to [N, C*H*W] (each channel a contiguous block)?"""
    if node.op == "call_module":
        module = modules[node.target]
        return type(module) is nn.Flatten and module.start_dim == 1 and module.end_dim in (-1, 3)
    if (node.op == "call_function" and node.target is torch.flatten) or (
        node.op == "call_method" and node.target == "flatten"
    ):
        return arg(node, 1, "start_dim", 0) == 1 and arg(node, 2, "end_dim", -1) in (-1, 3)
    if node.op == "call_method" and node.target in ("view", "reshape"):
        shape = node.args[1:]
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return len(shape) == 2 and _is_batch_size(shape[0], node.args[0]) and shape[1] == -1
    return False


class FlattenHandler(Handler):
    """A flatten of [N, C, H, W] from dim 1: the channels' ids on a [N, C * block] layout."""

    def trace(self, tracer: FlowTracer, node: fx.Node, module: Optional[nn.Module]) -> None:
        tracked = tracer.tracked(node.args[0]) if node.args else None
        if not is_flatten(node, tracer.modules) or tracked is None or tracked.layout != CONV:
            tracer.unsupported(node)
            return
        tracer.flow.values[node] = Tracked(tracked.ids, FLAT)

    def constant(self, constants: ConstantContext, node: fx.Node, module: Optional[nn.Module]) -> Tensor:
        return constants.incoming(node)


_FLATTEN = FlattenHandler()
for _op in (nn.Flatten, torch.flatten, "flatten", "view", "reshape"):
    register_handler(_op, _FLATTEN)
