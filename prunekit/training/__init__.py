"""Training around pruning: the channel/xor losses (:mod:`~prunekit.training.losses`), the
regulariser that applies them (:mod:`~prunekit.training.regularizer`), gradual pruning
schedules (:mod:`~prunekit.training.schedules`) and recovery by distillation
(:mod:`~prunekit.training.recover`).

Public entry points are re-exported by :mod:`prunekit` (``prunekit.recover``, ``prunekit.GradualPruner``).
"""
