"""prunekit: a pruning toolkit built as a plugin on ``torch.nn.utils.prune``.

Example:
    >>> import torchvision, prunekit
    >>> model = torchvision.models.vgg11()
    >>> model = prunekit.apply_plan(model, {"features.3": 0.8})
    >>> round(prunekit.sparsity_report(model).layers[1].sparsity, 3)
    0.8
"""

__version__ = "0.1.0"

from prunekit import hed, losses
from prunekit.compact import (
    BorderBiasConv2d,
    CompactionReport,
    UnsupportedGraphError,
    compact,
    compact_chain,
    compaction_report,
)
from prunekit.hed import HED, caffe_preprocess, hed_vgg16_features
from prunekit.layers import ConvBlock, conv_block, conv_layers
from prunekit.losses import channel_loss, uncorrelation_loss, xor_loss
from prunekit.methods import ChannelActivation, FineGrainedL1, channel_activation, fine_grained_l1
from prunekit.plans import apply_plan, copy_model, finalize
from prunekit.recover import RecoveryHistory, recover
from prunekit.regularizer import ChannelRegularizer
from prunekit.schedules import GradualPruner
from prunekit.report import LayerSparsity, SparsityReport, sparsity_report
from prunekit.sensitivity import Accuracy, OutputDistortion, SensitivityResult, evaluate_plan, scan
from prunekit.sparse import load_sparse, read_sparse_header, save_sparse
from prunekit.stats import (
    ChannelStats,
    collect_channel_stats,
    load_channel_stats,
    plot_channel_magnitudes,
    plot_channel_response,
    save_channel_stats,
)
from prunekit.zoo import WeightsUnavailableError, load_model, save_checkpoint

__all__ = [
    "Accuracy",
    "OutputDistortion",
    "SensitivityResult",
    "evaluate_plan",
    "scan",
    "BorderBiasConv2d",
    "CompactionReport",
    "UnsupportedGraphError",
    "compact",
    "compact_chain",
    "compaction_report",
    "load_sparse",
    "read_sparse_header",
    "save_sparse",
    "ChannelActivation",
    "ChannelRegularizer",
    "ChannelStats",
    "ConvBlock",
    "FineGrainedL1",
    "GradualPruner",
    "HED",
    "LayerSparsity",
    "SparsityReport",
    "WeightsUnavailableError",
    "__version__",
    "apply_plan",
    "caffe_preprocess",
    "channel_activation",
    "channel_loss",
    "collect_channel_stats",
    "conv_block",
    "conv_layers",
    "copy_model",
    "finalize",
    "fine_grained_l1",
    "hed",
    "hed_vgg16_features",
    "load_channel_stats",
    "load_model",
    "losses",
    "plot_channel_magnitudes",
    "plot_channel_response",
    "recover",
    "RecoveryHistory",
    "save_channel_stats",
    "save_checkpoint",
    "sparsity_report",
    "uncorrelation_loss",
    "xor_loss",
]
