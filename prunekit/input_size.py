"""Input sizes checked against a model before any work: channels, memory, and that its poolings take them.

An input the model's pooling layers cannot take gets the smallest size that works (found by
forwards of zeros), an input with the wrong number of channels gets the right shape, and an
image size whose batches would not fit in this machine's memory is refused before anything
large is allocated. The commands check ``--image-size`` and ``--input-size`` with it.

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3))
    >>> check_input_fits(model, (3, 32, 32), "--image-size", 32)
    >>> check_input_fits(model, (3, 5, 5), "--image-size", 5)
    Traceback (most recent call last):
    ...
    ValueError: --image-size 5 is too small for this model: its pooling layers need inputs of at least 8x8; pass --image-size 8 or more
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional, Sequence

from prunekit._lazy import lazy_module
from prunekit.defaults import DEFAULT_IMAGE_SIZE
from prunekit.messages import one_line

if TYPE_CHECKING:
    from torch import nn

torch = lazy_module("torch")  # imported when a command runs, not for -h or an argument error

__all__ = ["check_input_fits", "in_channels"]

_LARGEST_PROBE = 4096


def in_channels(model: nn.Module) -> int:
    """The input channels of the model's first conv."""
    from prunekit.layers import conv_layers

    first = next(iter(conv_layers(model).values()))
    return int(first.in_channels)


def _physical_memory() -> Optional[int]:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def _check_memory(flag: str, value: Any, model: nn.Module, shape: Sequence[int], count: int) -> None:
    """Refuse inputs whose batch and first activation alone would exceed half this machine's memory."""
    from prunekit.layers import conv_layers

    memory = _physical_memory()
    if memory is None:
        return
    first = next(iter(conv_layers(model).values()))
    pixels = 1
    for side in shape[1:]:
        pixels *= int(side)
    needed = count * (int(shape[0]) + int(first.out_channels)) * pixels * 4
    if needed > memory // 2:
        raise ValueError(
            f"{flag} {value}: {count} input(s) of {'x'.join(map(str, shape))} and the first conv's output need "
            f"{needed / 2**30:,.1f} GiB, more than half of this machine's {memory / 2**30:.0f} GiB; pass a smaller "
            f"{flag} (e.g. {DEFAULT_IMAGE_SIZE})"
        )


def _runs(model: nn.Module, shape: Sequence[int]) -> bool:
    from prunekit._rollback import eval_mode

    device = next(model.parameters()).device
    try:
        with torch.no_grad(), eval_mode(model):
            model(torch.zeros(1, *shape, device=device))
        return True
    except RuntimeError:
        return False


def check_input_fits(model: nn.Module, shape: Sequence[int], flag: str, value: Any, count: int = 1) -> None:
    """Check an input shape ``(C, H, W)`` before the work: channels, memory, and that the model runs on it.

    One forward pass of zeros (batch of one) in eval mode, without gradients; the
    model is not changed. An input too small for the model's pooling layers gets
    the smallest square size that works, found by trying sizes.

    Raises:
        ValueError: naming ``flag value`` (the option or argument the shape came from) and the fix.
    """
    channels = in_channels(model)
    shape = tuple(int(v) for v in shape)
    if len(shape) != 3:
        raise ValueError(f"{flag} {value}: pass one image's shape CxHxW, e.g. {channels}x224x224")
    if shape[0] != channels:
        fixed = "x".join(map(str, (channels,) + shape[1:]))
        raise ValueError(
            f"{flag} {value}: the model's first conv takes {channels} input channel{'s' if channels != 1 else ''}, "
            f"not {shape[0]}; pass {fixed}"
        )
    _check_memory(flag, value, model, shape, count)
    try:
        if _runs(model, shape):
            return
    except AssertionError as err:  # a model that checks its input itself (torchvision's ViT: its image size)
        raise ValueError(f"{flag} {value}: {type(model).__name__} refuses an input of {'x'.join(map(str, shape))}: "
                         f"{one_line(err)}; pass the size it was built for") from None
    low, high = max(shape[1:]), None
    probe = low
    while probe < _LARGEST_PROBE:
        probe = min(_LARGEST_PROBE, probe * 2)
        if _runs(model, (channels, probe, probe)):
            high = probe
            break
        low = probe
    if high is None:
        from prunekit._rollback import eval_mode

        try:
            with torch.no_grad(), eval_mode(model):
                model(torch.zeros(1, *shape, device=next(model.parameters()).device))
        except RuntimeError as err:
            raise ValueError(f"{flag} {value}: the model fails on an input of {shape}: {one_line(err)}") from None
        return
    while high - low > 1:  # the smallest side that works lies in (low, high]
        middle = (low + high) // 2
        low, high = (low, middle) if _runs(model, (channels, middle, middle)) else (middle, high)
    example = f"{channels}x{high}x{high}" if flag == "--input-size" else str(high)
    raise ValueError(
        f"{flag} {value} is too small for this model: its pooling layers need inputs of at least "
        f"{high}x{high}; pass {flag} {example} or more"
    )
