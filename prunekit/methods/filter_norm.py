"""Data-free channel pruning by filter norm ("Pruning Filters for Efficient ConvNets", Li et al., ICLR 2017).

Each output channel of a conv is scored by the L1 norm of its filter (the sum of
``|w|`` over the channel's input channels and kernel); the channels with the
smallest norms are masked, with their bias and the BatchNorm that follows, as the
activation-driven ``"channel"`` method masks them. No images are needed, so it
works where none exist (the scores come from the weights alone).

Example:
    >>> conv = filter_norm(nn.Conv2d(3, 4, 3), amount=2)
    >>> conv.weight_mask.flatten(1).amax(1).tolist().count(0.0)
    2
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, Mapping, Optional

import torch  # noqa: F401  (the docstring examples use it)
from torch import Tensor, nn

from prunekit.layers import channel_weight
from prunekit.methods._amount import Amount
from prunekit.methods.channel import ChannelMethod, channel_activation
from prunekit.methods.registry import register_method

__all__ = ["FilterNormMethod", "filter_norm", "filter_norms"]


def filter_norms(conv: nn.Conv2d, p: int = 1) -> Tensor:
    """The L``p`` norm of each output filter of ``conv`` (one score per output channel), in float32.

    An attention's "filters" are the rows of its ``in_proj_weight``: a head scores by its query, key and value rows.

    Masked entries count as zero (the norm of ``weight = weight_orig * weight_mask``).

    Example:
        >>> conv = nn.Conv2d(1, 2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = conv.weight.copy_(torch.tensor([[[[-3.0]]], [[[2.0]]]]))
        >>> filter_norms(conv).tolist()
        [3.0, 2.0]
    """
    if p not in (1, 2):
        raise ValueError(f"p={p!r}: filter norms are L1 (p=1, Li et al.) or L2 (p=2)")
    return channel_weight(conv).detach().float().flatten(1).norm(p=p, dim=1)


def filter_norm(
    module: nn.Conv2d, amount: Amount, batchnorm: Optional[nn.BatchNorm2d] = None, p: int = 1
) -> nn.Conv2d:
    """Mask the ``amount`` output channels of ``module`` with the smallest filter norms; return it.

    The functional twin of the ``"filter-norm"`` method: :func:`prunekit.methods.channel.channel_activation`
    with :func:`filter_norms` as the scores (the weight, bias and ``batchnorm`` are masked alike).
    """
    return channel_activation(module, filter_norms(module, p), amount=amount, batchnorm=batchnorm)


@register_method
class FilterNormMethod(ChannelMethod):
    """``"filter-norm"``: whole output channels with the smallest filter L1 norms; data-free.

    A sparsity is the fraction of output channels masked, as for ``"channel"``; the
    scores are read from the dense weights when a plan is applied or a scan starts.

    Example:
        >>> from prunekit.plans import apply_plan
        >>> model = apply_plan(nn.Sequential(nn.Conv2d(3, 8, 3)), {"0": 0.5}, method="filter-norm")
        >>> int((model[0].weight.flatten(1) == 0).all(1).sum())
        4
    """

    name = "filter-norm"
    needs_statistics = False
    needs_data = False
    default_options: ClassVar[Dict[str, Any]] = {}

    def member_scores(self, model: nn.Module, blocks: Mapping[str, Any]) -> Dict[str, Tensor]:
        return {member.conv_name: filter_norms(member.conv) for block in blocks.values() for member in block.members}
