"""The LayerNorm ``compact`` builds where channels were removed: it still counts them in its statistics.

A LayerNorm normalises each position by the mean and variance over *all* its channels, so a
channel removed before it would change every other channel's output. A removed channel is
constant there (its producer's bias, carried through the graph), so its share of the
statistics is known ahead: :class:`PartialLayerNorm` keeps how many channels were removed
and the sum and sum of squares of their constants, and normalises the kept channels exactly
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
        removed_constants: what each removed channel held ([removed], any float dtype; empty: none).
        removed_count: how many channels were removed (default: ``len(removed_constants)``); the
            sums are stored, not the constants.
        eps, elementwise_affine, bias: as for ``nn.LayerNorm``.
        channel_dim: where the channels are: ``-1`` (``nn.LayerNorm`` over the last dimension) or ``1``
            ([N, C, H, W], torchvision's ``LayerNorm2d``).

    The outputs are computed in float32 at least (fp16 and bf16 inputs are normalised in float32 and cast back).
    """

    def __init__(
        self,
        channels: int,
        removed_constants: Optional[Tensor] = None,
        removed_count: Optional[int] = None,
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
        constants = torch.zeros(0, dtype=torch.float64) if removed_constants is None else removed_constants.detach().double().cpu()
        self.channels = int(channels)
        self.removed_count = int(constants.numel() if removed_count is None else removed_count)
        self.eps = float(eps)
        self.channel_dim = channel_dim
        self.elementwise_affine = elementwise_affine
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(channels, **factory)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(channels, **factory)) if elementwise_affine and bias else None
        # Sums of the removed constants and of their squares, in float32 (float64 for a float64 norm).
        stored = torch.float64 if dtype == torch.float64 else torch.float32
        self.register_buffer("removed_sum", constants.sum().to(device=device, dtype=stored))
        self.register_buffer("removed_square_sum", constants.square().sum().to(device=device, dtype=stored))

    def add_removed(self, constants: Tensor) -> None:
        """Count ``constants`` ([removed], what each newly removed channel holds) in the statistics too."""
        constants = constants.detach().double().cpu()
        self.removed_count += int(constants.numel())
        with torch.no_grad():
            self.removed_sum += constants.sum().to(self.removed_sum)
            self.removed_square_sum += constants.square().sum().to(self.removed_square_sum)

    @property
    def normalized_shape(self):
        return (self.channels,)

    def forward(self, x: Tensor) -> Tensor:
        work = x if x.dtype in (torch.float32, torch.float64) else x.float()
        if self.channel_dim == 1:
            work = work.movedim(1, -1)
        # torch's fused LayerNorm over the kept channels gives y = (x - mean_k) * rstd_k; the whole norm's
        # statistics follow from those and the removed constants' sums, and (x - mean) * rstd = y * scale + shift.
        y, kept_mean, kept_rstd = torch.native_layer_norm(work, (self.channels,), None, None, self.eps)
        kept_var = (kept_rstd.square().reciprocal() - self.eps).clamp_min(0)
        total = self.channels + self.removed_count
        s1 = self.removed_sum.to(work.dtype)
        s2 = self.removed_square_sum.to(work.dtype)
        mean = (kept_mean * self.channels + s1) / total
        removed_part = (s2 - 2 * mean * s1 + self.removed_count * mean.square()).clamp_min(0)  # sum (c - mean)^2
        var = (self.channels * (kept_var + (kept_mean - mean).square()) + removed_part) / total
        rstd = torch.rsqrt(var + self.eps)
        out = torch.addcmul((kept_mean - mean) * rstd, y, rstd / kept_rstd)
        if self.weight is not None:
            bias = self.bias.to(work.dtype) if self.bias is not None else torch.zeros_like(self.weight, dtype=work.dtype)
            out = torch.addcmul(bias, out, self.weight.to(work.dtype))
        if self.channel_dim == 1:
            out = out.movedim(-1, 1)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.channels}, removed={self.removed_count}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}, channel_dim={self.channel_dim}")
