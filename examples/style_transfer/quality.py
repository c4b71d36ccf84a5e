"""Image quality of a pruned network's result against the dense network's: PSNR and SSIM.

SSIM comes from pytorch-msssim (``pip install pytorch-msssim``), a maintained
implementation of Wang et al. 2004 (Gaussian window 11, sigma 1.5, valid
positions only, ``K1 = 0.01``, ``K2 = 0.03``); PSNR is one line of arithmetic.

Example:
    >>> x = torch.rand(1, 3, 32, 32)
    >>> psnr(x + 0.1, x) < 21, round(ssim(x, x), 6)
    (True, 1.0)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SSIM_WINDOW", "psnr", "ssim"]

SSIM_WINDOW = 11
"""Side of SSIM's Gaussian window: images must be at least this large."""


def psnr(image: Tensor, reference: Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1] (clamped), over the whole batch; inf when identical."""
    _check_pair(image, reference)
    mse = F.mse_loss(image.detach().clamp(0, 1).double(), reference.detach().clamp(0, 1).double()).item()
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(1.0 / mse, dtype=torch.float64)).item()


def ssim(image: Tensor, reference: Tensor) -> float:
    """Mean structural similarity of images in [0, 1] (clamped), computed in float64 by pytorch-msssim.

    Raises:
        ImportError: pytorch-msssim is not installed (the message says how to install it).
        ValueError: shapes differ, or an image side is below :data:`SSIM_WINDOW` pixels.
    """
    _check_pair(image, reference)
    if min(image.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"images of {tuple(image.shape[-2:])} px are smaller than the {SSIM_WINDOW} px SSIM window")
    try:
        from pytorch_msssim import ssim as library_ssim
    except ImportError:
        raise ImportError("SSIM needs pytorch-msssim: pip install pytorch-msssim") from None
    x = image.detach().clamp(0, 1).double()
    y = reference.detach().clamp(0, 1).double()
    return float(library_ssim(x, y, data_range=1.0, size_average=True, win_size=SSIM_WINDOW))


def _check_pair(image: Tensor, reference: Tensor) -> None:
    if image.shape != reference.shape or image.dim() != 4:
        raise ValueError(
            f"expected two [B, C, H, W] batches of one shape, got {tuple(image.shape)} and {tuple(reference.shape)}"
        )
