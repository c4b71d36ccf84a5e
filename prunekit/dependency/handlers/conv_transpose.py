"""``nn.ConvTranspose2d`` (``groups=1``, a U-Net's upsampling): reads channels and makes new ones, like a conv.

It loses its own dead output channels and input channels whose constants are 0: a non-zero
constant spread by a transposed conv is a position-dependent pattern no bias can hold.
Grouped transposed convs are not followed.

Example:
    >>> from torch import nn
    >>> resize_conv_transpose(nn.ConvTranspose2d(4, 6, 2), torch.tensor([1, 3]), None).weight.shape
    torch.Size([2, 6, 2, 2])
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.fx as fx
from torch import Tensor, nn

from prunekit.dependency.flow import CONV, Consumer, FlowTracer, Tracked, UnsupportedGraphError
from prunekit.dependency.registry import LayerHandler, bias_constant, register_handler
from prunekit.dependency.resize import copy_training, fill

__all__ = ["ConvTransposeHandler", "resize_conv_transpose"]


class ConvTransposeHandler(LayerHandler):
    """A plain transposed conv with ``groups=1`` called on one tensor."""

    def trace(self, tracer: FlowTracer, node: fx.Node, module: Optional[nn.Module]) -> None:
        if type(module) is not nn.ConvTranspose2d or module.groups != 1 or len(node.args) != 1 or node.kwargs:
            tracer.unsupported(node)
            return
        flow = tracer.flow
        tracked = tracer.tracked(node.args[0])
        if tracked is not None and (tracked.layout != CONV or len(tracked.ids) != module.in_channels):
            tracer.unsupported(node, f"expects {module.in_channels} input channels laid out as [N, C, H, W]")
            tracked = None
        in_ids = tracked.ids if tracked is not None else tracer.input_ids(module.in_channels, "channels of the model's input")
        out_ids = flow.new_ids(module.out_channels)
        flow.producers[node.target] = out_ids
        flow.consumers[node.target] = Consumer(node.target, in_ids, CONV, node)
        flow.values[node] = Tracked(out_ids, CONV)

    def channels(self, module: nn.Module) -> Tuple[int, int]:
        return module.in_channels, module.out_channels

    def dead_channels(self, module: nn.Module) -> Tuple[Tensor, Tensor]:
        weight = module.weight.detach().transpose(0, 1)  # [out, in, kh, kw]
        return (weight.flatten(1) == 0).all(dim=1), bias_constant(module, weight.shape[0], weight.device)

    def fold(
        self, name: str, module: nn.Module, consumer: Consumer, keep: Tensor, removed: Tensor, constant: Tensor
    ) -> Tuple[Tensor, Optional[Tensor]]:
        if bool((constant != 0).any()):
            raise UnsupportedGraphError(
                f"cannot remove the dead channels that reach ConvTranspose2d '{name}': they carry non-zero "
                "constants (a BatchNorm after a masked conv), which a transposed conv spreads into a "
                "position-dependent pattern no bias can hold; mask the BatchNorm too (the channel methods "
                "do) so that they are 0"
            )
        return keep.to(module.weight.device), None

    def resize(
        self, module: nn.Module, keep_in: Optional[Tensor], keep_out: Optional[Tensor], fold: Optional[Tensor]
    ) -> nn.Module:
        return resize_conv_transpose(module, keep_in, keep_out)


def resize_conv_transpose(conv: nn.ConvTranspose2d, keep_in: Optional[Tensor], keep_out: Optional[Tensor]) -> nn.ConvTranspose2d:
    """A copy of a transposed ``conv`` (``groups=1``) with only the input channels ``keep_in`` and outputs ``keep_out``."""
    weight = conv.weight.detach()  # [in, out, kh, kw]
    bias = conv.bias.detach() if conv.bias is not None else None
    if keep_in is not None:
        weight = weight.index_select(0, keep_in.to(weight.device))
    if keep_out is not None:
        weight = weight.index_select(1, keep_out.to(weight.device))
        bias = bias.index_select(0, keep_out.to(weight.device)) if bias is not None else None
    new = nn.ConvTranspose2d(
        weight.shape[0], weight.shape[1], conv.kernel_size, stride=conv.stride, padding=conv.padding,
        output_padding=conv.output_padding, groups=1, bias=bias is not None, dilation=conv.dilation,
        padding_mode=conv.padding_mode, device=weight.device, dtype=weight.dtype,
    )
    fill(new, weight, bias)
    return copy_training(new, conv)


register_handler(nn.ConvTranspose2d, ConvTransposeHandler())
