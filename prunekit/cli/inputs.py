"""What a command builds before its work: the process group, the evaluation batches, checked input sizes.

Sizes are checked before anything large is allocated: an input the model's
pooling layers cannot take gets the smallest size that works, an input with
the wrong number of channels gets the right shape, and an image size whose
batches would not fit in this machine's memory is refused up front.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shlex
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple

from typing import TYPE_CHECKING

import click

from prunekit._lazy import lazy_module
from prunekit.cli.errors import one_line
from prunekit.cli.options import DEFAULT_BATCH, DEFAULT_IMAGE_SIZE, DIGITS_SIZE

if TYPE_CHECKING:
    from torch import nn

torch = lazy_module("torch")  # imported when a command runs, not for -h or an argument error

__all__ = [
    "DEFAULT_TIMEOUT",
    "architecture",
    "batch_inputs",
    "check_input_fits",
    "evaluation_data",
    "in_channels",
    "load_checkpoint_argument",
    "process_group",
    "recovery_batches",
    "status",
]

_LARGEST_PROBE = 4096


def status(quiet: bool, message: str) -> None:
    """A status line on stderr (rank 0 only; none with ``--quiet``)."""
    from prunekit.sensitivity.distributed import is_main_process

    if not quiet and is_main_process():
        click.echo(message, err=True)


#: Seconds a rank waits for the others in one collective before failing (torch's default is 30 minutes).
DEFAULT_TIMEOUT = 600


@contextlib.contextmanager
def process_group(device: "torch.device", timeout: float = DEFAULT_TIMEOUT) -> Iterator["torch.device"]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): join its process group for the command, and leave it after.

    The ``env://`` variables torchrun sets say where to meet; CPU ranks use gloo,
    CUDA ranks NCCL on ``cuda:LOCAL_RANK``. A group the caller made is used as is.
    A rank that stops answering (killed, stopped) fails the others after ``timeout`` seconds.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or not torch.distributed.is_available() or torch.distributed.is_initialized():
        yield device
        return
    backend = "gloo"
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
        torch.cuda.set_device(device)
        backend = "nccl"
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    try:
        yield device
    finally:
        torch.distributed.destroy_process_group()


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
        ValueError: naming ``flag value`` and the fix.
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
    if _runs(model, shape):
        return
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


def evaluation_data(
    model: nn.Module,
    data: str,
    image_size: Optional[int],
    batch_size: Optional[int],
    metric: Optional[str],
    seed: int,
) -> Tuple[List[Any], bool, str, int, int]:
    """Load the evaluation batches; returns (batches, labelled, description, image size, batch size).

    The image size is checked against the model (and this machine's memory) before any image is decoded.
    """
    from prunekit import datasets

    channels = in_channels(model)
    choice = data.strip().lower()
    builtin = choice == "builtin"
    normalize = getattr(model, "input_normalization", "imagenet")
    if choice not in ("builtin", "photos") and not Path(data).exists():
        raise FileNotFoundError(f"--data {data}: no such folder; pass a folder of images, builtin or photos")
    if builtin and channels == 3:
        choice = getattr(model, "builtin_data", "synthetic")
    if builtin and channels == 1:
        if image_size not in (None, DIGITS_SIZE):
            raise ValueError(
                f"--image-size {image_size}: the built-in digits are {DIGITS_SIZE}x{DIGITS_SIZE}; drop --image-size"
            )
        dataset = datasets.digits_test_set()
        # Tiny images: one big batch is several times faster than many small ones.
        batch_size = batch_size or len(dataset)
        labelled, size = True, DIGITS_SIZE
        description = f"built-in digits test split ({len(dataset)} images, 1x{size}x{size})"
        return list(datasets.make_loader(dataset, batch_size)), labelled, description, size, batch_size
    if channels != 3:
        shown = data if choice == "photos" else "builtin" if builtin else "FOLDER"
        raise ValueError(
            f"the model's first conv takes {channels} input channels; --data {shown} provides RGB images "
            f"(3 channels): pass a model with 3 input channels, or --data builtin for the built-in digits"
        )
    batch_size = batch_size or DEFAULT_BATCH
    size = image_size or DEFAULT_IMAGE_SIZE
    check_input_fits(model, (3, size, size), "--image-size", size, count=batch_size)
    if choice == "photos" or (builtin and choice == "synthetic"):
        if metric == "accuracy":
            raise ValueError(
                f"--metric accuracy needs labelled images: the built-in {choice} have no labels; pass "
                "--data FOLDER with one subfolder per class (labels = sorted subfolder names), or "
                "use --metric distortion"
            )
        labelled = False
        if choice == "photos":
            dataset = datasets.builtin_photos(size, normalize=normalize)
            description = f"{len(dataset)} built-in photos ({', '.join(datasets.PHOTO_NAMES)}; 3x{size}x{size})"
        else:
            dataset = datasets.SyntheticImages(batch_size, size, seed=seed, normalize=normalize)
            description = f"{batch_size} synthetic images (3x{size}x{size}, seed {seed})"
    else:
        labelled = metric == "accuracy"
        folder = Path(data)
        if labelled and folder.is_dir() and not any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir()):
            raise ValueError(
                f"--metric accuracy needs labelled images, one subfolder per class (e.g. {data}/cat/1.jpg); "
                f"--data {data} has no subfolders: add them, or use --metric distortion"
            )
        try:
            dataset = datasets.load_image_folder(data, size, labelled=labelled, normalize=normalize)
        except (ValueError, OSError) as err:
            raise type(err)(f"--data {data}: {one_line(err)}") from None
        classes = f", {len(dataset.classes)} classes" if labelled and dataset.classes is not None else ""
        description = f"{len(dataset)} images from {data} (3x{size}x{size}{classes})"
    return list(datasets.make_loader(dataset, batch_size)), labelled, description, size, batch_size


def batch_inputs(batches: List[Any]) -> List["torch.Tensor"]:
    """The input tensors of ``batches`` (labels dropped)."""
    return [batch[0] if isinstance(batch, (tuple, list)) else batch for batch in batches]


def architecture(spec: str) -> str:
    """The spec that rebuilds ``spec``'s architecture, for ``save_checkpoint``."""
    from prunekit.sparse import is_sparse_file, read_sparse_header
    from prunekit.zoo import is_factory_spec, is_model_name

    if is_model_name(spec) or is_factory_spec(spec):
        return spec.strip()
    if is_sparse_file(spec):
        arch = read_sparse_header(spec).get("arch")
    else:
        obj = None
        # Memory-mapped first: only the "arch" string is read, not the (already loaded) weights again;
        # a legacy (non-zip) file cannot be mapped and is read whole.
        for mmap in (True, False):
            try:
                obj = torch.load(spec, map_location="cpu", weights_only=True, mmap=mmap)
                break
            except Exception:
                continue
        arch = obj.get("arch") if isinstance(obj, dict) else None
    if isinstance(arch, str):
        return arch
    raise ValueError(
        f"--model {spec} does not record its architecture (a pickled model), so the pruned model "
        "cannot be saved as a prunekit checkpoint; pass --model as a VGG name or "
        "package.module:factory with --weights PATH"
    )


def recovery_batches(
    model: nn.Module,
    data: str,
    held_out: Optional[str],
    image_size: Optional[int],
    batch_size: Optional[int],
    steps: int,
    seed: int,
) -> Tuple[List["torch.Tensor"], List["torch.Tensor"], str]:
    """Unlabelled training batches and held-out batches for ``prunekit prune --recover-steps``.

    RGB images: the held-out images are ``held_out``'s, or else the last fifth of
    ``data``'s images (at least one, when there are two or more); training batches are
    random crops (mirrored at random) of the other images, loaded at 1.25x the size,
    so that a few photos give many different inputs. The built-in digits: the last
    fifth of the shipped test split is held out, the rest trains. Returns
    ``(train, held_out, description)``.
    """
    from prunekit import datasets

    channels = in_channels(model)
    if channels == 1 and data.strip().lower() == "builtin":
        inputs = torch.cat(batch_inputs(evaluation_data(model, data, image_size, None, None, seed)[0]))
        cut = max(1, len(inputs) // 5)
        train, held = inputs[:-cut], inputs[-cut:]
        size = min(64, len(train))
        batches = [train[i : i + size] for i in range(0, len(train), size)]
        return batches, [held], f"{len(train)} digits to train on, {len(held)} held out (the shipped test split)"
    if channels != 3:
        raise ValueError(f"--recover-data {data}: the model takes {channels} input channels; pass RGB images")
    size = image_size or DEFAULT_IMAGE_SIZE
    batch = batch_size or 2
    normalize = getattr(model, "input_normalization", "imagenet")
    check_input_fits(model, (3, size, size), "--image-size", size, count=batch)

    def images(flag: str, source: str, side: int) -> Tuple[Any, str]:
        """The dataset ``source`` names (images decoded lazily, when indexed) and how to call it."""
        choice = source.strip().lower()
        if choice == "builtin":
            choice = getattr(model, "builtin_data", "synthetic")
        if choice == "photos":
            return datasets.builtin_photos(side, normalize=normalize), "the built-in photos"
        if choice == "synthetic":
            raise ValueError(
                f"{flag} {source}: synthetic images teach a pruned model nothing real; pass a folder of "
                "real images (or photos, the built-in photos)"
            )
        try:
            return datasets.load_image_folder(source, side, normalize=normalize), source
        except (ValueError, OSError) as err:
            raise type(err)(f"{flag} {source}: {one_line(err)}") from None

    def stack(found: Any, indices: Sequence[int]) -> "torch.Tensor":
        return torch.stack([found[i] for i in indices])

    train_set, name = images("--recover-data", data, int(round(size * 1.25)))
    count = len(train_set)
    if held_out is not None:
        held_set, held_name = images("--held-out", held_out, size)
        held = stack(held_set, range(len(held_set)))
        kept = stack(train_set, range(count))
    else:
        if count < 2:
            raise ValueError(
                f"--recover-data {data} holds one image: nothing is left to hold out; add images or pass --held-out FOLDER"
            )
        cut = max(1, count // 5)
        # Each image is decoded once: the training ones large (for crops), the held-out ones at the size.
        kept = stack(train_set, range(count - cut))
        held = stack(images("--recover-data", data, size)[0], range(count - cut, count))
        held_name = f"the last {cut} of {name}"
    train = datasets.random_crops(kept, size, count=min(max(steps, 1), 32), batch_size=batch, seed=seed)
    held_batches = [held[i : i + batch] for i in range(0, len(held), batch)]
    description = (
        f"random {size}x{size} crops of {len(kept)} image(s) from {name} to train on; "
        f"{len(held)} held out ({held_name})"
    )
    return train, held_batches, description


def load_checkpoint_argument(command: str, checkpoint: str, weights: Optional[str], trust_checkpoint: bool) -> nn.Module:
    """Load a command's CHECKPOINT argument (a file, or a model spec with ``--weights``).

    The library words its hints for ``--model``/``--weights``; here the model is the
    positional CHECKPOINT, so the hint says so.
    """
    from prunekit.zoo import RecordedFactoryError, load_model

    try:
        return load_model(checkpoint, weights, trust_checkpoint=trust_checkpoint, progress=False,
                          factory_folder=os.getcwd())
    except RecordedFactoryError as err:
        raise ValueError(
            f"checkpoint {err.path} asks to build its model with {err.arch}, which imports and runs code named by "
            f"the file; pass --trust-checkpoint if you trust it, or type the architecture yourself: prunekit "
            f"{command} {err.arch} --weights {shlex.quote(err.path)}"
        ) from None
    except ValueError as err:
        message = str(err)
        if "as --model and the file as --weights" not in message:
            raise
        head = message.split("; pass the architecture")[0]
        raise ValueError(
            f"{head}; pass the architecture as CHECKPOINT and the file as --weights, e.g. "
            f"prunekit {command} vgg16 --weights {checkpoint}"
        ) from None
