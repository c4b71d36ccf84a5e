"""Names and defaults that several parts share, importable without torch.

The command line reads its choices and defaults from here, so that ``prunekit -h``
and argument errors answer before torch is imported (about 2 s, several times that
on a busy machine). Each name's home is here; the modules that use it re-export it.

The pruning methods' names live in their registry, :mod:`prunekit.methods.registry`
(torch-free as well).

Example:
    >>> CRITERIA, DEFAULT_MODEL
    (('l2', 'l0'), 'digits-vgg')
"""

__all__ = ["CRITERIA", "DEFAULT_IMAGE_SIZE", "DEFAULT_LR", "DEFAULT_MODEL", "DIGITS_SIZE", "check_criterion"]

#: Channel scores from activation statistics: l2 (response magnitude) and l0 (firing frequency).
CRITERIA = ("l2", "l0")


def check_criterion(criterion: object) -> str:
    """``criterion`` if it is one of :data:`CRITERIA`, else a ValueError naming it and the choices.

    Example:
        >>> check_criterion("l0")
        'l0'
    """
    if not isinstance(criterion, str) or criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r} is unknown; choose one of {', '.join(CRITERIA)}")
    return criterion

#: The model a command uses when none is named: the built-in digits VGG with its shipped weights.
DEFAULT_MODEL = "digits-vgg"

#: Side of the built-in digits (scikit-learn's 8x8 digits, upsampled) that digits-vgg takes.
DIGITS_SIZE = 16

#: Adam's learning rate by default: measured on HED's real weights, every backbone conv at 80 %,
#: 200 steps on crops of two photos, held-out edge-map distortion (one-shot 0.505): 3e-5 0.421,
#: 1e-4 0.409, 3e-4 0.402, 1e-3 0.401 (``benchmarks/recovery.py --lrs``); 3e-4 is the lowest of the best.
DEFAULT_LR = 3e-4

#: Side of the square images a command works on when ``--image-size`` is not given.
DEFAULT_IMAGE_SIZE = 224
