"""Differentiable losses that make conv channels switch off, fire sparsely, or decorrelate.

``channel_loss`` and ``xor_loss`` follow *Compact Image Style Transfer: Channel
Pruning on a Single Training of Network* (Sensors 2022); ``uncorrelation_loss``
follows *Uncorrelated feature encoding for faster image style transfer*
(Neural Networks 2021). Each takes a feature map ``[B, C, H, W]`` (or
``[B, C, L]``) and returns a scalar tensor; values and gradients stay finite
for all-zero features and constant channels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["channel_indicator", "channel_loss", "uncorrelation_loss", "xor_loss"]


def _check_feature(feature: Tensor, caller: str) -> Tensor:
    """Validate ``feature`` and return it as ``[B, C, L]``, in float32 at least.

    fp16/bf16 features (autocast) are upcast: their squares overflow fp16 and their
    sums lose bf16's few mantissa bits, so every loss accumulates in float32 (the
    gradient flows back to the half-precision input through the cast).
    """
    if not isinstance(feature, Tensor):
        raise TypeError(f"{caller}: feature must be a torch.Tensor, got {type(feature).__name__}")
    if feature.ndim not in (3, 4):
        raise ValueError(
            f"{caller}: feature must be [B, C, H, W] or [B, C, L], got shape "
            f"{tuple(feature.shape)}; add a batch dimension with feature.unsqueeze(0)"
        )
    if not feature.is_floating_point():
        raise TypeError(f"{caller}: feature must be floating point, got {feature.dtype}")
    if feature.numel() == 0:
        raise ValueError(f"{caller}: feature has an empty dimension, shape {tuple(feature.shape)}")
    if feature.dtype in (torch.float16, torch.bfloat16):
        feature = feature.float()
    return feature.flatten(2)


def _check_eps(eps: float, caller: str) -> None:
    valid = isinstance(eps, (int, float)) and not isinstance(eps, bool)
    if not valid or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"{caller}: eps={eps!r} must be a finite number > 0 (e.g. 1e-5)")


def _safe_norm(values: Tensor) -> Tensor:
    """l2 norm over the last dim whose gradient is 0, not NaN, where the input is all zero."""
    squares = values.pow(2).sum(dim=-1)
    nonzero = squares > 0
    # sqrt is evaluated on 1 where the norm is 0, so neither branch makes inf/NaN gradients.
    roots = torch.where(nonzero, squares, torch.ones_like(squares)).sqrt()
    return torch.where(nonzero, roots, torch.zeros_like(roots))


def channel_indicator(feature: Tensor, eps: float = 1e-5) -> Tensor:
    """Soft "channel fires" indicator ``s[b, c] = ||f_bc||_2 / (||f_bc||_2 + eps)`` in ``[0, 1)``.

    ``f_bc`` is image ``b``'s channel ``c`` map. ``s`` is 0 exactly for an all-zero map
    and close to 1 once its norm is much larger than ``eps``.

    Returns:
        ``[B, C]`` tensor.

    Example:
        >>> channel_indicator(torch.zeros(1, 2, 3, 3)).tolist()
        [[0.0, 0.0]]
    """
    flat = _check_feature(feature, "channel_indicator")
    _check_eps(eps, "channel_indicator")
    norms = _safe_norm(flat)
    return norms / (norms + eps)


def channel_loss(feature: Tensor, eps: float = 1e-5) -> Tensor:
    """Mean soft indicator ``sum_bc s_bc / (B*C)``: minimising it switches whole channels off.

    Example:
        >>> feature = torch.zeros(2, 4, 3, 3)
        >>> feature[:, 0] = 1.0
        >>> round(channel_loss(feature).item(), 3)
        0.25
    """
    _check_eps(eps, "channel_loss")
    _check_feature(feature, "channel_loss")
    return channel_indicator(feature, eps).mean()


def xor_loss(feature: Tensor, eps: float = 1e-5) -> Tensor:
    """Mean pairwise disagreement ``sum_{i<j} sum_c |s_ic - s_jc| / (C * B(B-1)/2)``.

    Minimising it makes each channel fire on all images or on none, so that a
    channel silent on the training images is safe to remove. A batch of one
    image has no pair: the result is a zero that is still attached to the graph.

    Example:
        >>> feature = torch.rand(1, 4, 5, 5).repeat(3, 1, 1, 1)  # three identical images
        >>> xor_loss(feature).item()
        0.0
    """
    _check_eps(eps, "xor_loss")
    _check_feature(feature, "xor_loss")
    indicator = channel_indicator(feature, eps)
    batch, channels = indicator.shape
    if batch < 2:
        return indicator.sum() * 0.0
    # For ascending v_1..v_B, sum_{i<j} |v_j - v_i| = sum_k (v_{k+1} - v_k) * k * (B - k):
    # each gap lies between k lower and B-k higher values. O(B log B) time and O(B*C)
    # memory instead of a [B, B, C] difference tensor; the gaps are >= 0, so the sum is
    # exactly 0 for identical images and never negative from rounding.
    ordered = torch.sort(indicator, dim=0).values
    gaps = ordered[1:] - ordered[:-1]
    below = torch.arange(1, batch, dtype=ordered.dtype, device=ordered.device)
    pairs = batch * (batch - 1) / 2
    return (gaps * (below * (batch - below)).unsqueeze(1)).sum() / (channels * pairs)


def uncorrelation_loss(feature: Tensor) -> Tensor:
    """Mean absolute off-diagonal Pearson correlation between the channels of each image.

    Each channel map is flattened to a vector of ``L = H*W`` values; for every
    image the ``C x C`` correlation matrix of those vectors is formed and the
    mean of ``|corr[i, j]|`` over ``i != j`` is averaged over the batch. A
    constant channel (including an all-zero one) has no defined correlation
    and counts as 0. With one channel the result is an attached zero.

    Example:
        >>> x = torch.randn(1, 1, 16)
        >>> round(uncorrelation_loss(torch.cat([x, 2 * x + 1], dim=1)).item(), 4)
        1.0
    """
    flat = _check_feature(feature, "uncorrelation_loss")
    batch, channels, _ = flat.shape
    if channels < 2:
        return flat.sum() * 0.0
    # Shifting by the first value before removing the mean makes a constant
    # channel exactly zero; the mean alone leaves rounding noise that would
    # normalise to a spurious +-1 correlation.
    shifted = flat - flat[:, :, :1]
    centered = shifted - shifted.mean(dim=2, keepdim=True)
    norms = _safe_norm(centered)
    nonzero = norms > 0
    inverse = torch.where(nonzero, 1.0 / torch.where(nonzero, norms, torch.ones_like(norms)), 0.0)
    unit = centered * inverse.unsqueeze(2)
    correlation = unit @ unit.transpose(1, 2)
    off_diagonal = ~torch.eye(channels, dtype=torch.bool, device=flat.device)
    return correlation.abs()[:, off_diagonal].mean()
