"""The LayerNorm ``compact`` builds where channels were removed: it still counts them in its statistics.

A LayerNorm normalises each position by the mean and variance over *all* its channels, so a
channel removed before it would change every other channel's output. A removed channel is
constant there (its producer's bias, carried through the graph), so its share of the
statistics is known ahead: :class:`PartialLayerNorm` keeps how many channels were removed
and the mean and variance of their constants, and normalises the kept channels exactly
as the whole LayerNorm did. The LayerNorm handler (:mod:`prunekit.dependency.handlers.layer_norm`)
builds it; a removed channel's own output (its masked weight is 0) is its bias, folded onward.

Example:
    >>> import torch
    >>> full = torch.nn.LayerNorm(3)
    >>> x = torch.randn(2, 3)
    >>> x[:, 2] = 0.5  # channel 2 constant: removed
    >>> part = PartialLayerNorm(2, removed_constants=torch.tensor([0.5]))
    >>> torch.allclose(part(x[:, :2]), full(x)[:, :2], atol=1e-6)
    True
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["PartialLayerNorm"]


class PartialLayerNorm(nn.Module):
    """LayerNorm over ``channels`` kept channels (of dim ``channel_dim``) that also counts removed constant channels.

    Args:
        channels: the kept channels.
        removed_constants: what each removed channel held ([removed], any float dtype; empty: none); their
            count, mean and variance are stored, not the constants (:meth:`add_removed` counts more).
        eps, elementwise_affine, bias: as for ``nn.LayerNorm``.
        channel_dim: where the channels are: ``-1`` (``nn.LayerNorm`` over the last dimension) or ``1``
            ([N, C, H, W], torchvision's ``LayerNorm2d``).

    The outputs are computed in float32 at least (fp16 and bf16 inputs are normalised in float32 and cast back).
    The forward takes the kept channels' statistics from torch's fused LayerNorm, merges them with the removed
    channels' (the parallel-variance formula), and normalises every position by the whole norm's statistics in
    one fused pass (``batch_norm`` in eval mode, the positions as its channels), then applies the affine pair:
    a handful of small operations per call besides the two passes.
    """

    def __init__(
        self,
        channels: int,
        removed_constants: Optional[Tensor] = None,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        channel_dim: int = -1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if channel_dim not in (-1, 1):
            raise ValueError(f"channel_dim is {channel_dim}; a PartialLayerNorm normalises dim -1 or dim 1")
        self.channels = int(channels)
        self.removed_count = 0
        self.eps = float(eps)
        self.channel_dim = channel_dim
        self.elementwise_affine = elementwise_affine
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(channels, **factory)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(channels, **factory)) if elementwise_affine and bias else None
        # The removed constants' mean and (biased) variance: constants of the module like eps (Python floats,
        # double precision; a copy or .to() keeps them, the state_dict does not hold them).
        self.removed_mean = 0.0
        self.removed_variance = 0.0
        if removed_constants is not None:
            self.add_removed(removed_constants)

    def add_removed(self, constants: Tensor) -> None:
        """Count ``constants`` ([removed], what each newly removed channel holds) in the statistics too."""
        constants = constants.detach().double().cpu().flatten()
        if constants.numel():
            mean = float(constants.mean())
            self.add_removed_statistics(constants.numel(), mean, float((constants - mean).square().mean()))

    def add_removed_statistics(self, count: int, mean: float, variance: float) -> None:
        """Count ``count`` more removed channels whose constants have this ``mean`` and (biased) ``variance``
        (another PartialLayerNorm's ``removed_count``, ``removed_mean`` and ``removed_variance``)."""
        if count <= 0:
            return
        old_count, total = self.removed_count, self.removed_count + int(count)
        delta = float(mean) - self.removed_mean
        self.removed_mean += delta * count / total
        self.removed_variance = (old_count * self.removed_variance + count * float(variance)
                                 + delta * delta * old_count * count / total) / total
        self.removed_count = total

    @property
    def normalized_shape(self):
        return (self.channels,)

    def forward(self, x: Tensor) -> Tensor:
        work = x if x.dtype in (torch.float32, torch.float64) else x.float()
        if self.channel_dim == 1:
            work = work.movedim(1, -1)
        work = work.contiguous()
        weight, bias = self.weight, self.bias
        if weight is not None and weight.dtype != work.dtype:
            weight, bias = weight.to(work.dtype), bias.to(work.dtype) if bias is not None else None
        # The kept channels' mean and 1 / sqrt(var_k + eps) per position, from torch's fused kernel (its output is
        # not used; it runs faster given the affine pair than without).
        _, kept_mean, kept_rstd = torch.native_layer_norm(work, (self.channels,), weight, bias, self.eps)
        # Merged with the removed constants' (the parallel-variance formula), with k = C / (C + R), r = R / (C + R):
        #   var + eps = k * (1 / rstd_k^2 + r * (mean_k - mean_r)^2 + (r / k) * (var_r + eps)),
        #   mean = mean_k - r * (mean_k - mean_r).
        # eval-mode batch_norm with the positions as its channels divides by sqrt(V + E) for the bracket's V and E in
        # one pass; the affine pair takes the factor 1 / sqrt(k).
        total = self.channels + self.removed_count
        kept_share, removed_share = self.channels / total, self.removed_count / total
        kept_mean = kept_mean.view(-1)
        delta = kept_mean - self.removed_mean
        spread = torch.addcmul(kept_rstd.view(-1).pow(-2), delta, delta, value=removed_share)
        mean = kept_mean.sub_(delta, alpha=removed_share)
        offset = removed_share / kept_share * (self.removed_variance + self.eps)
        # (cudnn off: torch's own kernel takes any number of positions as channels.)
        out = torch.batch_norm(work.view(1, -1, self.channels), None, None, mean, spread, False, 0.0, offset,
                               False).view(work.shape)
        scale = kept_share ** -0.5
        if weight is None:
            out = out.mul_(scale)
        elif bias is None:
            out = out.mul_(weight).mul_(scale)
        else:
            out = torch.addcmul(bias, out, weight, value=scale)
        if self.channel_dim == 1:
            out = out.movedim(-1, 1)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.channels}, removed={self.removed_count}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}, channel_dim={self.channel_dim}")
