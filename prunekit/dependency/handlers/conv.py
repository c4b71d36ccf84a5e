"""``nn.Conv2d``: makes new channels from the ones it reads; a grouped conv joins each group's inputs and outputs.

Removing a conv's input channels folds their constants into its bias (and, under zero padding,
into a :class:`~prunekit.dependency.border_bias.BorderBiasConv2d`'s border bias); a grouped
conv loses whole groups. Subclasses other than ``BorderBiasConv2d`` are refused: prunekit
cannot rebuild them.

Example:
    >>> from torch import nn
    >>> resize_conv(nn.Conv2d(4, 6, 3), torch.tensor([0, 2]), torch.tensor([1])).weight.shape
    torch.Size([1, 2, 3, 3])
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.fx as fx
from torch import Tensor, nn

from prunekit.dependency.border_bias import BorderBiasConv2d, has_zero_padding
from prunekit.dependency.flow import CONV, Consumer, FlowTracer, Tracked, describe_node
from prunekit.dependency.registry import LayerHandler, register_handler
from prunekit.dependency.resize import copy_training, fill, folded_bias

__all__ = ["ConvHandler", "resize_conv"]

_PLAIN = (nn.Conv2d, BorderBiasConv2d)


class ConvHandler(LayerHandler):
    """A conv (``groups >= 1``): a producer of channels and a consumer of the ones it reads."""

    def trace(self, tracer: FlowTracer, node: fx.Node, module: Optional[nn.Module]) -> None:
        name, flow = node.target, tracer.flow
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        tracked = tracer.tracked(source)
        out_ids = flow.new_ids(module.out_channels)
        if type(module) not in _PLAIN or source is None:
            why = (
                f"is a {type(module).__name__} (an nn.Conv2d subclass prunekit cannot rebuild)"
                if type(module) not in _PLAIN
                else "is called with extra arguments"
            )
            tracer.unsupported(node, why)
            flow.fix(out_ids, f"{describe_node(node, tracer.modules)} {why}")
            return
        if tracked is not None and (tracked.layout != CONV or len(tracked.ids) != module.in_channels):
            tracer.unsupported(node, f"expects {module.in_channels} input channels laid out as [N, C, H, W]")
            tracked = None
        in_ids = tracked.ids if tracked is not None else tracer.input_ids(module.in_channels, "channels of the model's input")
        flow.producers[name] = out_ids
        flow.consumers[name] = Consumer(name, in_ids, CONV, node)
        flow.values[node] = Tracked(out_ids, CONV)
        if module.groups > 1:
            where = f"grouped conv '{name}' (groups={module.groups})"
            per_in, per_out = module.in_channels // module.groups, module.out_channels // module.groups
            for group in range(module.groups):
                members = list(in_ids[group * per_in : (group + 1) * per_in]) + list(
                    out_ids[group * per_out : (group + 1) * per_out]
                )
                for other in members[1:]:
                    flow.union(members[0], other, where)

    def channels(self, module: nn.Module) -> Tuple[int, int]:
        return module.in_channels, module.out_channels

    def dead_channels(self, module: nn.Module) -> Tuple[Tensor, Tensor]:
        dead, constant = super().dead_channels(module)
        border = getattr(module, "border_weight", None)
        if border is not None:
            dead &= (border.detach().flatten(1) == 0).all(dim=1)
        return dead, constant

    def fold(
        self, name: str, module: nn.Module, consumer: Consumer, keep: Tensor, removed: Tensor, constant: Tensor
    ) -> Tuple[Tensor, Optional[Tensor]]:
        weights = module.weight.detach()
        if module.groups > 1:
            return keep.to(weights.device), None  # whole groups go: the removed inputs feed only removed outputs
        fold = torch.einsum("okhw,k->ohw", weights.index_select(1, removed.to(weights.device)).double(), constant)
        return keep.to(weights.device), fold

    def resize(
        self, module: nn.Module, keep_in: Optional[Tensor], keep_out: Optional[Tensor], fold: Optional[Tensor]
    ) -> nn.Module:
        return resize_conv(module, keep_in, keep_out, fold)


def resize_conv(
    conv: nn.Conv2d,
    keep_in: Optional[Tensor],
    keep_out: Optional[Tensor],
    fold: Optional[Tensor] = None,
) -> nn.Conv2d:
    """A copy of ``conv`` with only the input channels ``keep_in`` and output channels ``keep_out``.

    Args:
        conv: a plain ``nn.Conv2d`` (or :class:`BorderBiasConv2d`).
        keep_in, keep_out: sorted channel indices to keep; ``None`` keeps all. A grouped conv
            keeps whole groups: ``keep_in`` and ``keep_out`` must name the same groups.
        fold: [out, kh, kw] float64, the removed input channels' kernels weighted by
            the constant each carried; added as bias (and border bias under zero padding).
    """
    weight = conv.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else None
    old_border = getattr(conv, "border_weight", None)
    border = old_border.detach().double() if old_border is not None else None
    if fold is not None and bool(fold.abs().sum() > 0):
        # Computed in float64 from the full weight, then sliced like the rest.
        bias = folded_bias(bias, fold.sum(dim=(1, 2)), conv.out_channels, weight.device)
        if has_zero_padding(conv):
            border = fold.unsqueeze(1) if border is None else border + fold.unsqueeze(1)
    if keep_out is not None:
        weight = weight.index_select(0, keep_out)
        bias = bias.index_select(0, keep_out) if bias is not None else None
        border = border.index_select(0, keep_out) if border is not None else None
    groups = conv.groups
    if groups > 1:
        groups = _kept_groups(conv, keep_in, keep_out)
    elif keep_in is not None:
        weight = weight.index_select(1, keep_in)
    cls = BorderBiasConv2d if border is not None else nn.Conv2d
    new = cls(
        weight.shape[1] * groups,
        weight.shape[0],
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=groups,
        bias=bias is not None,
        padding_mode=conv.padding_mode,
        device=weight.device,
        dtype=weight.dtype,
    )
    fill(new, weight, bias)
    if border is not None:
        with torch.no_grad():
            new.border_weight.copy_(border.to(weight.dtype))
    return copy_training(new, conv)


def _kept_groups(conv: nn.Conv2d, keep_in: Optional[Tensor], keep_out: Optional[Tensor]) -> int:
    """How many groups a grouped conv keeps; its kept inputs and outputs must be whole, matching groups."""
    per_in, per_out = conv.in_channels // conv.groups, conv.out_channels // conv.groups
    keep_in = torch.arange(conv.in_channels) if keep_in is None else keep_in.cpu()
    keep_out = torch.arange(conv.out_channels) if keep_out is None else keep_out.cpu()
    groups_in, groups_out = torch.unique(keep_in // per_in), torch.unique(keep_out // per_out)
    whole = len(keep_in) == len(groups_in) * per_in and len(keep_out) == len(groups_out) * per_out
    if not whole or not torch.equal(groups_in, groups_out):
        raise ValueError(
            f"a grouped conv (groups={conv.groups}) can only lose whole groups; kept inputs "
            f"{keep_in.tolist()[:8]}... and outputs {keep_out.tolist()[:8]}... do not name the same groups"
        )
    return len(groups_out)


register_handler(nn.Conv2d, ConvHandler())
