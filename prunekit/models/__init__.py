"""Models prunekit knows by name: the registry and loader (:mod:`~prunekit.models.zoo`: digits-vgg,
torchvision classifiers, factories, checkpoints) and HED's VGG-16 with real weights
(:mod:`~prunekit.models.hed`).

Public entry points are re-exported by :mod:`prunekit` (``prunekit.load_model``, ``prunekit.hed``).
"""
