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

__all__ = ["randomize_batchnorms", "randomize_layer_norms"]


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


def randomize_layer_norms(model: nn.Module, seed: int = 1) -> nn.Module:
    """In a model with LayerNorms (ConvNeXt), give them seeded affine pairs and every conv and Linear a bias.

    torchvision builds LayerNorms as weight 1, bias 0 and ConvNeXt's biases as 0, so a removed
    channel would bring only zeros into a norm. Weights become 1 + 0.2 N(0, 1), LayerNorm biases
    0.2 N(0, 1), conv and Linear biases 0.1 N(0, 1), drawn in module order from a generator seeded
    with ``seed``. A model without LayerNorm is left as it is. Returns ``model``.

    Example:
        >>> norm = randomize_layer_norms(nn.Sequential(nn.LayerNorm(4)))[0]
        >>> bool((norm.bias != 0).all())
        True
    """
    if not any(isinstance(module, nn.LayerNorm) for module in model.modules()):
        return model
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=generator))
            elif isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
    return model
