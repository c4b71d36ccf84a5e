"""Smaller copies of conv, BatchNorm, PReLU and Linear layers, for :func:`prunekit.compact`.

Each builder returns a new plain module holding a slice of the old one's
tensors, plus the bias that stands in for removed input channels that carried
a constant (see :class:`BorderBiasConv2d` for why zero padding needs more than
a bias).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = [
    "BorderBiasConv2d",
    "has_zero_padding",
    "resize_batchnorm",
    "resize_conv",
    "resize_conv_transpose",
    "resize_linear",
    "resize_prelu",
]

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
        self.register_buffer(
            "border_weight",
            torch.zeros(
                self.out_channels, 1, kh, kw, device=self.weight.device, dtype=self.weight.dtype
            ),
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
        if torch.compiler.is_compiling():
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


def _copy_training(new: nn.Module, old: nn.Module) -> nn.Module:
    new.train(old.training)
    for name, param in new.named_parameters(recurse=False):
        old_param = getattr(old, name, None)
        if isinstance(old_param, nn.Parameter):
            param.requires_grad_(old_param.requires_grad)
    return new


def _folded_bias(bias: Optional[Tensor], fold: Tensor, features: int, device: torch.device) -> Tensor:
    """``bias + fold`` in float64 (a missing bias counts as zeros)."""
    base = bias.double() if bias is not None else torch.zeros(features, dtype=torch.float64, device=device)
    return base + fold


def _fill(new: nn.Module, weight: Tensor, bias: Optional[Tensor]) -> None:
    """Copy ``weight`` (and ``bias``, at the weight's dtype) into the freshly built layer ``new``."""
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias.to(weight.dtype))


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
        bias = _folded_bias(bias, fold.sum(dim=(1, 2)), conv.out_channels, weight.device)
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
    _fill(new, weight, bias)
    if border is not None:
        with torch.no_grad():
            new.border_weight.copy_(border.to(weight.dtype))
    return _copy_training(new, conv)


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
    _fill(new, weight, bias)
    return _copy_training(new, conv)


def resize_batchnorm(bn: nn.BatchNorm2d, keep: Tensor) -> nn.BatchNorm2d:
    """A copy of ``bn`` with only the channels ``keep`` (affine parameters and running statistics)."""
    new = nn.BatchNorm2d(
        len(keep),
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        device=keep.device if bn.weight is None else bn.weight.device,
        dtype=None if bn.weight is None else bn.weight.dtype,
    )
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight.detach().index_select(0, keep))
            new.bias.copy_(bn.bias.detach().index_select(0, keep))
        if bn.running_mean is not None:
            new.running_mean = bn.running_mean.index_select(0, keep.to(bn.running_mean.device)).clone()
            new.running_var = bn.running_var.index_select(0, keep.to(bn.running_var.device)).clone()
        else:
            new.running_mean = None
            new.running_var = None
        if bn.num_batches_tracked is not None:
            new.num_batches_tracked = bn.num_batches_tracked.clone()
        else:
            new.num_batches_tracked = None
    return _copy_training(new, bn)


def resize_prelu(prelu: nn.PReLU, keep: Tensor) -> nn.PReLU:
    """A copy of a per-channel ``prelu`` with only the channels ``keep``."""
    weight = prelu.weight.detach().index_select(0, keep)
    new = nn.PReLU(len(keep), device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
    return _copy_training(new, prelu)


def resize_linear(
    linear: nn.Linear,
    keep_in: Optional[Tensor],
    fold: Optional[Tensor] = None,
    keep_out: Optional[Tensor] = None,
) -> nn.Linear:
    """A copy of ``linear`` with only the input features ``keep_in`` and outputs ``keep_out`` (``None``: all).

    ``fold`` [out] float64, the removed inputs' constant contribution, is added to the bias.
    """
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    if fold is not None and bool(fold.abs().sum() > 0):
        bias = _folded_bias(bias, fold, linear.out_features, weight.device)
    if keep_out is not None:
        weight = weight.index_select(0, keep_out.to(weight.device))
        bias = bias.index_select(0, keep_out.to(weight.device)) if bias is not None else None
    if keep_in is not None:
        weight = weight.index_select(1, keep_in.to(weight.device))
    new = nn.Linear(
        weight.shape[1],
        weight.shape[0],
        bias=bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    _fill(new, weight, bias)
    return _copy_training(new, linear)
