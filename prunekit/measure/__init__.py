"""What pruning buys, measured: zeroed weights per layer (:mod:`~prunekit.measure.sparsity`),
multiply-accumulates (:mod:`~prunekit.measure.macs`) and latency with its spread
(:mod:`~prunekit.measure.timing`).

Public entry points are re-exported by :mod:`prunekit` (``prunekit.sparsity_report``).
"""
