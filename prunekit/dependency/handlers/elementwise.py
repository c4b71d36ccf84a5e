"""Ops applied to each element on its own: activations, arithmetic, dropout, stochastic depth.

An activation module passes its one tensor's channels on and maps a removed channel's
constant through itself. Arithmetic (``x + y``, ``x * gate``, ``torch.add``) joins its
operands channel by channel: a residual addition couples the convs that add into one stream,
a squeeze-and-excitation gate the channels it scales. A module's own parameter with one value
per channel (ConvNeXt's layer scale, ``gamma * x`` with ``gamma`` of shape [C, 1, 1]) is
followed too: ``compact`` keeps its kept channels' values. Dropout is the identity in eval mode,
where compaction is exact; so is torchvision's ``stochastic_depth()`` (the residual branch
dropped per sample in training), traced with ``training=False``.

Example:
    >>> import operator
    >>> from torch import nn
    >>> from prunekit.dependency.registry import handler_of
    >>> type(handler_of(nn.ReLU())).__name__, type(handler_of(nn.Dropout())).__name__
    ('ActivationHandler', 'IdentityInEvalHandler')
"""

from __future__ import annotations

import operator
from typing import Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.dependency.flow import CONV, LAST, FlowTracer, Tracked, arg, tensor_args
from prunekit.dependency.registry import ConstantContext, Handler, register_handler
from prunekit.layers import ELEMENTWISE_ACTIVATIONS

__all__ = ["ActivationHandler", "ArithmeticHandler", "IdentityInEvalHandler", "StochasticDepthHandler"]


class ActivationHandler(Handler):
    """A parameter-free element-wise module on one tensor: same channels out; constants mapped through it."""

    def trace(self, tracer: FlowTracer, node: fx.Node, module: Optional[nn.Module]) -> None:
        tracer.pass_through(node)


class IdentityInEvalHandler(Handler):
    """Dropout: the identity in eval mode (at random per element or channel in training)."""

    def trace(self, tracer: FlowTracer, node: fx.Node, module: Optional[nn.Module]) -> None:
        tracer.pass_through(node)

    def constant(self, constants: ConstantContext, node: fx.Node, module: Optional[nn.Module]) -> Tensor:
        return constants.incoming(node)


class StochasticDepthHandler(IdentityInEvalHandler):
    """``stochastic_depth(x, p, mode, training)``: the identity when traced with ``training=False`` (or ``p=0``)."""

    def trace(self, tracer: FlowTracer, node: fx.Node, module: Optional[nn.Module]) -> None:
        if arg(node, 3, "training", True) is not False and arg(node, 1, "p", None) != 0:
            tracer.unsupported(node, "drops samples at random (training=True); prunekit follows it in eval mode")
            return
        tracer.pass_through(node)


def channel_dim_of_parameter(shape: Tuple[int, ...], tracked: Tracked) -> Optional[int]:
    """The dim of a parameter of ``shape`` that lies along ``tracked``'s channels when broadcast with it;
    -1 when it is one value for all; None when it is neither.

    Example:
        >>> channel_dim_of_parameter((4, 1, 1), Tracked((0, 1, 2, 3), "conv")), channel_dim_of_parameter((1,), Tracked((0, 1), "last"))
        (0, -1)
    """
    if all(size == 1 for size in shape):
        return -1
    channels = len(tracked.ids)
    if tracked.layout == CONV and len(shape) >= 3 and shape[-3] == channels and shape[-2:] == (1, 1):
        dim = len(shape) - 3
    elif tracked.layout == LAST and shape and shape[-1] == channels:
        dim = len(shape) - 1
    else:
        return None
    return dim if all(size == 1 for size in shape[:dim]) else None


class ArithmeticHandler(Handler):
    """Element-wise functions and tensor methods: tracked operands joined channel by channel; a per-channel
    parameter operand (a layer scale) goes with the channels."""

    def trace(self, tracer: FlowTracer, node: fx.Node, module: Optional[nn.Module]) -> None:
        operands = [a for a in tensor_args(node) if a not in tracer.shapes]
        parameters = [a for a in operands if a.op == "get_attr"]
        tracked = [tracer.tracked(a) for a in operands if a.op != "get_attr"]
        if len(operands) != 2 or len(parameters) != 1 or tracked[0] is None:
            tracer.join(node)
            return
        parameter = parameters[0]
        value = tracer.flow.attribute(parameter.target)
        uses = tracer.attribute_uses[parameter.target]
        dim = channel_dim_of_parameter(tuple(getattr(value, "shape", ())), tracked[0])
        if dim is None or uses != 1:
            why = "is used more than once" if dim is not None else "does not lie along the channels"
            tracer.unsupported(node, f"combines them with the tensor '{parameter.target}', which {why}")
            return
        if dim >= 0:
            tracer.flow.scales[parameter.target] = (tracked[0].ids, dim)
        tracer.flow.values[node] = tracked[0]


_ACTIVATION = ActivationHandler()
for _module in ELEMENTWISE_ACTIVATIONS + (nn.Identity,):
    if _module is not nn.PReLU:  # its slopes may be per channel: prelu.py
        register_handler(_module, _ACTIVATION)

_IDENTITY_IN_EVAL = IdentityInEvalHandler()
for _op in (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.FeatureAlphaDropout,
    F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout, F.feature_alpha_dropout,
):  # fmt: skip
    register_handler(_op, _IDENTITY_IN_EVAL)
register_handler("torchvision.ops.stochastic_depth.stochastic_depth", StochasticDepthHandler())  # by name: no torchvision import

_ARITHMETIC = ArithmeticHandler()
for _op in (
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.leaky_relu_,
    F.elu, F.elu_, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.hardtanh_, F.sigmoid, torch.sigmoid, F.tanh, torch.tanh, F.softplus,
    torch.clamp, torch.clip, torch.abs, torch.neg,
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.iadd, operator.imul,
    torch.add, torch.sub, torch.mul, torch.div,
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clamp_min",
    "clamp_max", "clip", "abs", "neg", "add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_",
    "contiguous", "clone", "detach",
):  # fmt: skip
    register_handler(_op, _ARITHMETIC)
