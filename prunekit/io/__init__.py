"""Files prunekit reads and writes: atomic writes and JSON (:mod:`~prunekit.io.files`), the sparse
checkpoint format (:mod:`~prunekit.io.sparse`), compacted checkpoints (:mod:`~prunekit.io.compacted`) and
state_dict reading (:mod:`~prunekit.io.weights`).

Public entry points are re-exported by :mod:`prunekit` (``prunekit.save_sparse``, ``prunekit.load_sparse``).
"""
