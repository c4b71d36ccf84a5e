"""Pruning methods: each family in one file, as a ``torch.nn.utils.prune.BasePruningMethod`` with a functional
twin, and as a :class:`~prunekit.methods.base.PruningMethod` subclass decorated with
:func:`~prunekit.methods.registry.register_method`, that plans, scans and schedules ask by name
(:func:`~prunekit.methods.registry.get_method`). A new method is one more such file.

* ``fine_grained.py``: ``"fine-grained"``, single weights by L1 magnitude (:class:`FineGrainedL1`).
* ``channel.py``: ``"channel"``, whole output channels by activation statistics (:class:`ChannelActivation`).
* ``filter_norm.py``: ``"filter-norm"``, whole output channels by filter L1 norm, data-free (Li et al. 2017).
* ``taylor.py``: ``"taylor"``, whole output channels by first-order Taylor importance (Molchanov et al. 2019).
"""

from prunekit._lazy import lazy_exports

# Imported on first use: the registry's names (the CLI's choices) need no torch.
_EXPORTS = {
    "CRITERIA": "prunekit.defaults:CRITERIA",
    "METHODS": "prunekit.methods.registry:METHODS",
    "get_method": "prunekit.methods.registry:get_method",
    "method_names": "prunekit.methods.registry:method_names",
    "register_method": "prunekit.methods.registry:register_method",
    "unregister_method": "prunekit.methods.registry:unregister_method",
    "TaylorMethod": "prunekit.methods.taylor:TaylorMethod",
    "taylor_importance": "prunekit.methods.taylor:taylor_importance",
    "PruningMethod": "prunekit.methods.base:PruningMethod",
    "ChannelActivation": "prunekit.methods.channel:ChannelActivation",
    "ChannelMethod": "prunekit.methods.channel:ChannelMethod",
    "channel_activation": "prunekit.methods.channel:channel_activation",
    "channel_scores": "prunekit.methods.channel:channel_scores",
    "FineGrainedL1": "prunekit.methods.fine_grained:FineGrainedL1",
    "FineGrainedMethod": "prunekit.methods.fine_grained:FineGrainedMethod",
    "fine_grained_l1": "prunekit.methods.fine_grained:fine_grained_l1",
    "FilterNormMethod": "prunekit.methods.filter_norm:FilterNormMethod",
    "filter_norm": "prunekit.methods.filter_norm:filter_norm",
    "filter_norms": "prunekit.methods.filter_norm:filter_norms",
}

__all__ = sorted(_EXPORTS)

lazy_exports(__name__, _EXPORTS)
