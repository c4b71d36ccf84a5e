"""Per-channel spatial ops: pooling, resampling, padding, and the spatial mean written by hand.

Each keeps channels apart on [N, C, H, W]. A removed channel's constant passes unchanged
through max pooling, adaptive pooling, resampling and reflect/replicate padding. Zero padding
and averaging that counts padded zeros keep it only when it is 0; otherwise the channel is
refused, naming the node (its value would vary at the border).

Example:
    >>> from torch import nn
    >>> from prunekit.dependency.registry import handler_of
    >>> type(handler_of(nn.AvgPool2d(2))).__name__
    'PaddingPoolHandler'
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.dependency.flow import CONV, FLAT, FlowTracer, Tracked, UnsupportedGraphError, arg, describe_node
from prunekit.dependency.registry import ConstantContext, Handler, register_handler

__all__ = ["ConstantPoolHandler", "PaddingPoolHandler", "SpatialMeanHandler", "is_spatial_mean"]


def _returns_indices(node: fx.Node, module: Optional[nn.Module]) -> bool:
    if isinstance(module, nn.MaxPool2d):
        return module.return_indices
    return node.op == "call_function" and node.target is F.max_pool2d and bool(arg(node, 6, "return_indices", False))


class ConstantPoolHandler(Handler):
    """Maps a constant map to the same constant (max and adaptive pooling, resampling, reflect padding)."""

    def trace(self, tracer: FlowTracer, node: fx.Node, module: Optional[nn.Module]) -> None:
        if _returns_indices(node, module):
            tracer.unsupported(node, "returns indices")
            return
        tracer.pass_through(node, layouts=(CONV,))

    def constant(self, constants: ConstantContext, node: fx.Node, module: Optional[nn.Module]) -> Tensor:
        return constants.incoming(node)


class PaddingPoolHandler(ConstantPoolHandler):
    """Keeps a constant only under conditions: average pooling and padding with a value."""

    def constant(self, constants: ConstantContext, node: fx.Node, module: Optional[nn.Module]) -> Tensor:
        incoming = constants.incoming(node)
        all_zero = bool((incoming[constants.mask(constants.flow.values[node].ids)] == 0).all())
        problem = _padding_problem(node, module, all_zero)
        if problem is not None:
            where = describe_node(node, constants.flow.modules)
            raise UnsupportedGraphError(f"cannot remove the dead channels that reach {where}: {where} {problem}")
        return incoming


def _avg_pool_keeps_constants(pool: nn.AvgPool2d) -> bool:
    padding = pool.padding if isinstance(pool.padding, tuple) else (pool.padding,)
    no_padding = all(p == 0 for p in padding)
    return pool.divisor_override is None and (no_padding or not pool.count_include_pad)


def _padding_problem(node: fx.Node, module: Optional[nn.Module], all_zero: bool) -> Optional[str]:
    """Why a padding/averaging op would not map the removed channels' constants to themselves."""
    if isinstance(module, nn.AvgPool2d):
        if _avg_pool_keeps_constants(module) or all_zero:
            return None
        return "averages in zero padding, so the removed channels' non-zero constants would vary at the border"
    if isinstance(module, (nn.ZeroPad2d, nn.ConstantPad2d)):
        if all_zero and module.value == 0:
            return None
        return f"pads with {module.value}, but removed channels carry non-zero constants"
    if node.target is F.pad:
        keeps = arg(node, 2, "mode", "constant") in ("reflect", "replicate", "circular")
        if keeps or (all_zero and not arg(node, 3, "value", None)):
            return None
    else:  # F.avg_pool2d
        padding = arg(node, 3, "padding", 0)
        no_padding = all(p == 0 for p in (padding if isinstance(padding, (tuple, list)) else (padding,)))
        keeps = arg(node, 6, "divisor_override", None) is None and (no_padding or not arg(node, 5, "count_include_pad", True))
        if keeps or all_zero:
            return None
    return "may pad with zeros, but removed channels carry non-zero constants"


def is_spatial_mean(node: fx.Node) -> bool:
    """``x.mean((2, 3))`` or ``torch.mean(x, [-2, -1], keepdim=True)``: global average pooling by hand."""
    if not ((node.op == "call_method" and node.target == "mean") or (node.op == "call_function" and node.target is torch.mean)):
        return False
    dims = arg(node, 1, "dim", None)
    dims = tuple(dims) if isinstance(dims, (list, tuple)) else (dims,)
    return sorted(d for d in dims if isinstance(d, int)) in ([2, 3], [-2, -1]) and len(dims) == 2


class SpatialMeanHandler(Handler):
    """The mean over H and W of [N, C, H, W]: [N, C, 1, 1] with ``keepdim``, else [N, C] (for a Linear)."""

    def trace(self, tracer: FlowTracer, node: fx.Node, module: Optional[nn.Module]) -> None:
        if not (is_spatial_mean(node) and tracer.single_conv_source(node)):
            tracer.unsupported(node)
            return
        source = tracer.flow.values[node.args[0]]
        keepdim = arg(node, 2, "keepdim", False) is True
        tracer.flow.values[node] = source if keepdim else Tracked(source.ids, FLAT)

    def constant(self, constants: ConstantContext, node: fx.Node, module: Optional[nn.Module]) -> Tensor:
        return constants.incoming(node)


_CONSTANT = ConstantPoolHandler()
for _op in (
    nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate, F.upsample, F.upsample_nearest,
    F.upsample_bilinear, F.max_pool2d,
):  # fmt: skip
    register_handler(_op, _CONSTANT)

_PADDING = PaddingPoolHandler()
for _op in (nn.AvgPool2d, nn.ZeroPad2d, nn.ConstantPad2d, F.avg_pool2d, F.pad):
    register_handler(_op, _PADDING)

_MEAN = SpatialMeanHandler()
register_handler(torch.mean, _MEAN)
register_handler("mean", _MEAN)
