"""The conv ``compact`` builds where a removed channel's constant meets zero padding.

A plain bias holds a removed input channel's constant away from the border; near a border
padded with zeros the conv sees fewer taps of it, and :class:`BorderBiasConv2d` adds the
exact per-position difference. The conv handler (:mod:`prunekit.dependency.handlers.conv`)
builds it.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn

__all__ = ["BorderBiasConv2d", "has_zero_padding"]

class BorderBiasConv2d(nn.Conv2d):
    """``nn.Conv2d`` with an extra, input-independent bias near the border.

    When :func:`prunekit.compact` removes an input channel that carried a
    constant ``c`` (e.g. a masked channel followed by a BatchNorm whose shift is
    not zero), the conv's response to it is ``c`` times the sum of the weight taps
    that fall inside the image. Away from the border that is every tap, a plain
    bias; with zero padding, outputs near the border see fewer taps. This layer
    keeps ``border_weight`` ([out, 1, kh, kw], the constant-weighted sum of the
    removed input channels' kernels) and adds the exact per-position difference,
    computed from the input's shape (two small matrix products) and kept for the
    next forward of the same shape; exported and compiled graphs compute it inline.

    Example:
        >>> conv = BorderBiasConv2d(2, 3, 3, padding=1)
        >>> conv(torch.zeros(1, 2, 5, 5)).shape
        torch.Size([1, 3, 5, 5])
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        kh, kw = self.kernel_size
        # A parameter (not trained: requires_grad is False) so that pruning a channel masks its border
        # bias with its weights (torch's pruning reparametrizes parameters only).
        self.border_weight = nn.Parameter(
            torch.zeros(self.out_channels, 1, kh, kw, device=self.weight.device, dtype=self.weight.dtype),
            requires_grad=False,
        )

    def border_bias(self, like: Tensor) -> Tensor:
        """The correction ``[1, out, H_out, W_out]`` added to the conv output for an input shaped like ``like``.

        A function of the input's shape and ``border_weight`` only. Computed from them in
        every call: :meth:`forward` keeps the last result in eager mode (see :meth:`cached_border_bias`).
        """
        # The taps that fall inside the image form a rectangle: rows valid for output row i times
        # columns valid for output column j, so their sum is two small matrix products instead of
        # a convolution over the whole map. float64, so that the interior (all taps) cancels to ~0.
        taps = self.border_weight.to(torch.float64)[:, 0]  # [out, kh, kw]
        rows, cols = (
            _valid_taps(like.shape[dim - 2], self.kernel_size[dim], self.stride[dim], self._padding(dim), self.dilation[dim], like.device)
            for dim in (0, 1)
        )
        inside = torch.matmul(torch.matmul(rows, taps), cols.transpose(0, 1))  # [out, H_out, W_out]
        return (inside - taps.sum(dim=(1, 2)).view(-1, 1, 1)).unsqueeze(0)

    def _padding(self, dim: int) -> Tuple[int, int]:
        """(before, total) zero padding along spatial ``dim`` (``padding="same"`` pads the extra one after)."""
        if self.padding == "same":
            total = self.dilation[dim] * (self.kernel_size[dim] - 1)
            return total // 2, total
        if self.padding == "valid":
            return 0, 0
        return self.padding[dim], 2 * self.padding[dim]

    def cached_border_bias(self, like: Tensor, dtype: torch.dtype) -> Tensor:
        """:meth:`border_bias` in ``dtype``, reused while the input shape, device and ``border_weight`` stay the same.

        At batch 1 the correction's few small operations cost as much as the conv of a late
        layer, so eager forwards reuse it. The key includes ``border_weight``'s version counter
        (an in-place change recomputes it); a whole tuple is swapped in at once, so concurrent
        forwards see an old or a new entry, never half of one. ``torch.export``, ``torch.compile``
        and ONNX export compute it inline instead (no state in the graph).
        """
        if (torch.compiler.is_compiling() or not isinstance(self.border_weight, nn.Parameter)
                or type(like) is not torch.Tensor):
            # Pruned (the masked product is a new tensor every forward) or swapped for a masked copy by a
            # scan: a new tensor may reuse a freed one's memory and version, so nothing is kept; nor is a
            # result computed on a tensor subclass (the fake tensors a shape propagation runs on).
            return self.border_bias(like).to(dtype)
        key = (tuple(like.shape[-2:]), like.device, dtype, self.border_weight._version, self.border_weight.data_ptr())
        cached = self.__dict__.get("_border_cache")
        if cached is None or cached[0] != key:
            cached = (key, self.border_bias(like).to(dtype))
            self.__dict__["_border_cache"] = cached
        return cached[1]

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - torch's parameter name
        out = super().forward(input)
        if self.padding_mode != "zeros":
            return out  # reflect/replicate/circular padding keep a constant channel constant
        return out + self.cached_border_bias(input, out.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", border_bias=True"


def _valid_taps(size: int, kernel: int, stride: int, padding: Tuple[int, int], dilation: int, device: torch.device) -> Tensor:
    """[out positions, kernel] float64: 1 where a kernel tap reads inside an input of length ``size``.

    ``padding`` is (zeros before, zeros in all) along this dimension.
    """
    before, total = padding
    positions = torch.arange(0, size + total - dilation * (kernel - 1), stride, device=device)
    index = positions.view(-1, 1) - before + torch.arange(kernel, device=device).view(1, -1) * dilation
    return ((index >= 0) & (index < size)).to(torch.float64)


def has_zero_padding(conv: nn.Conv2d) -> bool:
    """True when ``conv`` pads its input with zeros (so a constant input channel is not constant at the border)."""
    if conv.padding_mode != "zeros":
        return False
    if isinstance(conv.padding, str):
        return conv.padding == "same"
    return any(p > 0 for p in conv.padding)
