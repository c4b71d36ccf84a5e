"""prunekit's reference example: neural style transfer on a pruned VGG-19.

Modules: :mod:`vgg` (network, weights, preprocessing, feature taps), :mod:`imaging`
(image files), :mod:`gatys` (Gatys et al. optimisation), :mod:`gatys_prune`
(sensitivity metrics, plan, fine-tuning, report), :mod:`samples` (bundled
images), :mod:`gatys_cli` and ``__main__`` (the command line). Run
``python -m examples.style_transfer --help`` from the repository root.
"""

__all__: list = []
