"""LayerNorm over the channels: ``nn.LayerNorm`` on channels-last features, torchvision's ``LayerNorm2d`` on [N, C, H, W].

A LayerNorm normalises every position by the mean and variance over all its channels. A
removed channel is a constant at its input (its producer's bias, carried through the graph),
so it still counts in those statistics: ``compact`` builds a
:class:`~prunekit.dependency.partial_layer_norm.PartialLayerNorm` that keeps its share. The
removed channel's own output, ``weight * (c - mean) / std + bias``, depends on the other
channels unless its weight is 0: the LayerNorm's weight and bias are masked with the channel
(:func:`prunekit.dependency.unit_masks` lists them in ``ChannelGroup.norms``; the channel
methods mask them), and the channel then emits its bias, 0 when masked.

Example:
    >>> from torch import nn
    >>> from prunekit.dependency.registry import handler_of
    >>> type(handler_of(nn.LayerNorm(4))).__name__
    'LayerNormHandler'
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
from torch import Tensor, nn

from prunekit.dependency.flow import CONV, LAST, FlowTracer, UnsupportedGraphError, describe_node
from prunekit.dependency.partial_layer_norm import PartialLayerNorm
from prunekit.dependency.registry import ConstantContext, Handler, register_handler
from prunekit.dependency.resize import copy_training

__all__ = ["LayerNormHandler", "resize_layer_norm"]


class LayerNormHandler(Handler):
    """A LayerNorm over one dimension, the channels: the last (``channel_dim=-1``) or dim 1 of [N, C, H, W]."""

    resizable = True

    def __init__(self, channel_dim: int):
        self.channel_dim = channel_dim

    def _dim(self, module: nn.Module) -> int:
        return getattr(module, "channel_dim", self.channel_dim)  # a PartialLayerNorm says where its channels are

    def trace(self, tracer: FlowTracer, node: fx.Node, module: Optional[nn.Module]) -> None:
        tracked = tracer.single(node)
        layout = LAST if self._dim(module) == -1 else CONV
        if tracked is None or tracked.layout != layout or tuple(module.normalized_shape) != (len(tracked.ids),):
            tracer.unsupported(node, "normalises over more than the channels it receives")
            return
        if getattr(module, "weight", None) is None:
            tracer.unsupported(node, "has no weight to mask a removed channel with (elementwise_affine=False)")
            return
        tracer.flow.per_channel[node.target] = tracked.ids
        tracer.flow.norms[node.target] = tracked.ids
        tracer.flow.values[node] = tracked

    def constant(self, constants: ConstantContext, node: fx.Node, module: Optional[nn.Module]) -> Tensor:
        ids = constants.flow.values[node].ids
        removed = constants.mask(ids)
        live = torch.nonzero(removed & (module.weight.detach().cpu() != 0)).flatten().tolist()
        if live:
            raise UnsupportedGraphError(
                f"cannot remove channel{'s' if len(live) > 1 else ''} {', '.join(map(str, live[:6]))} of "
                f"{describe_node(node, constants.flow.modules)}: its weight is not 0 there. A LayerNorm mixes its "
                "channels' statistics, so a removed channel is constant after it only when the LayerNorm's weight "
                "and bias are masked with it (prunekit.dependency.unit_masks lists them; the channel methods mask them)"
            )
        constants.norm_inputs[node.target] = constants.incoming(node)
        out = torch.zeros(len(ids), dtype=torch.float64)
        if module.bias is not None:
            out[removed] = module.bias.detach().double().cpu()[removed]
        return out

    def resize(
        self, module: nn.Module, keep_in: Optional[Tensor], keep_out: Optional[Tensor], fold: Optional[Tensor]
    ) -> nn.Module:
        return resize_layer_norm(module, keep_out, fold if fold is not None else torch.zeros(0), self._dim(module))


def resize_layer_norm(norm: nn.Module, keep: Tensor, removed_constants: Tensor, channel_dim: int) -> PartialLayerNorm:
    """A :class:`PartialLayerNorm` of ``norm``'s channels ``keep`` that counts the removed ones, holding ``removed_constants``."""
    weight = norm.weight.detach()
    new = PartialLayerNorm(
        len(keep), eps=norm.eps, bias=norm.bias is not None, channel_dim=channel_dim,
        device=weight.device, dtype=weight.dtype,
    )
    if isinstance(norm, PartialLayerNorm):  # compacted before: its removed channels stay counted
        new.add_removed_statistics(norm.removed_count, norm.removed_mean, norm.removed_variance)
    new.add_removed(removed_constants)
    with torch.no_grad():
        new.weight.copy_(weight.index_select(0, keep.to(weight.device)))
        if norm.bias is not None:
            new.bias.copy_(norm.bias.detach().index_select(0, keep.to(weight.device)))
    return copy_training(new, norm)


register_handler(nn.LayerNorm, LayerNormHandler(channel_dim=-1))
register_handler(PartialLayerNorm, LayerNormHandler(channel_dim=-1))
register_handler("torchvision.models.convnext.LayerNorm2d", LayerNormHandler(channel_dim=1))  # by name: no torchvision import
