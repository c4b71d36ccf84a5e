"""The images a command works on: evaluation batches (``--data``) and recovery batches (``--recover-data``).

The image size is checked against the model (:mod:`prunekit.input_size`) before any image is decoded.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple

from prunekit._lazy import lazy_module
from prunekit.cli.errors import one_line
from prunekit.cli.options import DEFAULT_BATCH, DEFAULT_IMAGE_SIZE, DIGITS_SIZE
from prunekit.input_size import check_input_fits, in_channels

if TYPE_CHECKING:
    from torch import nn

torch = lazy_module("torch")  # imported when a command runs, not for -h or an argument error

__all__ = ["batch_inputs", "evaluation_data", "recovery_batches"]

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
    so that a few photos give many different inputs. The built-in digits: scikit-learn's training
    split (the shipped test split without scikit-learn), its last fifth held out. Returns
    ``(train, held_out, description)``.
    """
    from prunekit import datasets

    channels = in_channels(model)
    if channels == 1 and data.strip().lower() == "builtin":
        try:  # the training split, so that the scores on the shipped test split stay held out
            inputs = datasets.digits_train_set().tensors[0]
            where = "scikit-learn's training split of the digits (the shipped test split, which scans score, is never trained on)"
        except ImportError:
            inputs = torch.cat(batch_inputs(evaluation_data(model, data, image_size, None, None, seed)[0]))
            where = "the shipped test split (pip install scikit-learn to train on the training split instead)"
        cut = max(1, len(inputs) // 5)
        train, held = inputs[:-cut], inputs[-cut:]
        size = min(64, len(train))
        batches = [train[i : i + size] for i in range(0, len(train), size)]
        return batches, [held], f"{len(train)} digits to train on, {len(held)} held out, from {where}"
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


