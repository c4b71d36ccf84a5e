"""Pruning methods: each is a ``torch.nn.utils.prune.BasePruningMethod`` with a functional twin."""

from prunekit.methods.channel import CRITERIA, ChannelActivation, channel_activation, channel_scores
from prunekit.methods.fine_grained import FineGrainedL1, fine_grained_l1

__all__ = [
    "CRITERIA",
    "ChannelActivation",
    "FineGrainedL1",
    "channel_activation",
    "channel_scores",
    "fine_grained_l1",
]
