"""prunekit: a pruning toolkit built as a plugin on ``torch.nn.utils.prune``.

Example:
    >>> import torchvision, prunekit
    >>> model = torchvision.models.vgg11()
    >>> model = prunekit.apply_plan(model, {"features.3": 0.8})
    >>> print(prunekit.sparsity_report(model))  # doctest: +SKIP
"""

__version__ = "0.1.0"

from prunekit.layers import ConvBlock, conv_block, conv_layers
from prunekit.methods import ChannelActivation, FineGrainedL1, channel_activation, fine_grained_l1
from prunekit.plans import apply_plan, copy_model, finalize
from prunekit.report import LayerSparsity, SparsityReport, sparsity_report

__all__ = [
    "ChannelActivation",
    "ConvBlock",
    "FineGrainedL1",
    "LayerSparsity",
    "SparsityReport",
    "__version__",
    "apply_plan",
    "channel_activation",
    "conv_block",
    "conv_layers",
    "copy_model",
    "finalize",
    "fine_grained_l1",
    "sparsity_report",
]
