"""Helpers for checking pruned models on random weights: BatchNorms that do something.

A freshly built BatchNorm is the identity in eval mode (mean 0, variance 1, weight 1,
bias 0), so a masked channel stays exactly 0 after it and a compaction that drops the
constant a masked channel emits through BatchNorm goes unnoticed. Randomised statistics
and shifts make such a channel emit a non-zero constant, which ``compact`` must fold.

Example:
    >>> import torch
    >>> from torch import nn
    >>> bn = randomize_batchnorms(nn.Sequential(nn.BatchNorm2d(4)))[0]
    >>> bool((bn.bias != 0).all()), bool((bn.running_var > 0).all())
    (True, True)
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["randomize_batchnorms"]


def randomize_batchnorms(model: nn.Module, seed: int = 1, affine: bool = True) -> nn.Module:
    """Give every BatchNorm of ``model`` seeded non-trivial statistics (and, with ``affine``, scales and shifts).

    Running means in [-0.5, 0.5), variances in [0.5, 1.5), weights in [0.5, 1.5), biases in
    [-0.5, 0.5), drawn per BatchNorm in that order from a generator seeded with ``seed`` (the
    global one is not touched). Returns ``model``.
    """
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            features = module.num_features

            def draw(low: float) -> torch.Tensor:
                return torch.rand(features, generator=generator) + low

            with torch.no_grad():
                if module.running_mean is not None:
                    module.running_mean.copy_(draw(-0.5))
                    module.running_var.copy_(draw(0.5))
                if affine and module.affine:
                    module.weight.copy_(draw(0.5))
                    module.bias.copy_(draw(-0.5))
    return model
