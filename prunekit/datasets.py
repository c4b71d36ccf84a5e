"""Evaluation data for scans: the shipped digits test set, folders of images and synthetic images.

Every dataset here is deterministic (no shuffling, no random augmentation), so a
scan measured twice on the same data gives the same numbers.

* ``digits_test_set()``: the held-out split of scikit-learn's handwritten digits,
  shipped in ``prunekit/assets/digits_test.npz`` (scikit-learn is not needed at run time).
* ``load_image_folder(path, image_size)``: every readable image below a folder,
  resized, center-cropped and normalised with the ImageNet mean/std.
* ``builtin_photos(image_size)``: real photographs that ship inside matplotlib
  and scikit-learn (Grace Hopper, a Chinese temple, a flower), for real-image
  scans offline;
* ``synthetic_images(n, image_size)``: procedurally drawn images for running a
  torchvision VGG offline when no image folder is at hand.

Unlabelled datasets yield image tensors ``[3, S, S]``; labelled ones yield
``(image, label)`` pairs, as ``torchvision.datasets.ImageFolder`` does.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, TensorDataset

from prunekit.defaults import DIGITS_SIZE
from prunekit.io.files import PathLike, atomic_write, package_folder

__all__ = [
    "PHOTO_NAMES",
    "DIGITS_TEST_FILE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "SkippedFileWarning",
    "SyntheticImages",
    "builtin_photos",
    "digits_split",
    "digits_test_set",
    "digits_train_set",
    "load_image_folder",
    "make_loader",
    "photo_files",
    "random_crops",
    "preprocess_digits",
    "synthetic_image_array",
    "synthetic_images",
    "write_synthetic_images",
]

IMAGE_EXTENSIONS = (
    ".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_NORMALIZATIONS = ("imagenet", "none")

# sklearn's digits are 8x8; upsampling to 16x16 leaves enough spatial positions
# for three 2x2 max-pool stages in the built-in VGG-style model.
DIGITS_TEST_FILE = Path(__file__).resolve().parent / "assets" / "digits_test.npz"
# 360 of the 1797 digits (20 %), stratified by class, with a fixed seed.
_DIGITS_TEST_SIZE = 360
_DIGITS_SPLIT_SEED = 0


class SkippedFileWarning(UserWarning):
    """A file in an image folder was skipped because it is not a readable image."""


# ---------------------------------------------------------------------------
# Handwritten digits (the built-in default)


def preprocess_digits(images: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """Turn raw 8x8 digits (grey levels 0..16) into the model's input ``[N, 1, 16, 16]`` in [-1, 1].

    Example:
        >>> preprocess_digits(np.zeros((2, 8, 8), dtype=np.uint8)).shape
        torch.Size([2, 1, 16, 16])
    """
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if x.dim() != 3 or tuple(x.shape[1:]) != (8, 8):
        raise ValueError(f"expected digits of shape [N, 8, 8], got {list(x.shape)}")
    x = (x / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    return (x - 0.5) / 0.5


def digits_split() -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split scikit-learn's digits into the fixed train and test sets used by the built-in model.

    Returns:
        ``(train_images, train_labels, test_images, test_labels)``: uint8 arrays, images ``[N, 8, 8]``.

    Raises:
        ImportError: scikit-learn is not installed (``pip install scikit-learn``).
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise ImportError(
            "the digits training data needs scikit-learn: pip install scikit-learn "
            "(or prunekit[dev]); the shipped test set does not need it"
        ) from err
    digits = load_digits()
    images = digits.images.astype(np.uint8)
    labels = digits.target.astype(np.uint8)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=_DIGITS_TEST_SIZE, stratify=labels, random_state=_DIGITS_SPLIT_SEED
    )
    return train_x, train_y, test_x, test_y


def digits_train_set() -> TensorDataset:
    """The training split of the digits as ``(input [1, 16, 16], label)`` pairs; needs scikit-learn.

    Only the training script uses it; scans use :func:`digits_test_set`.
    """
    train_x, train_y, _, _ = digits_split()
    return TensorDataset(preprocess_digits(train_x), torch.as_tensor(train_y, dtype=torch.int64))


def digits_test_set(path: Optional[PathLike] = None) -> TensorDataset:
    """The held-out digits shipped with prunekit, as ``(input [1, 16, 16], label)`` pairs.

    Args:
        path: the ``.npz`` file to read (default: the one shipped in ``prunekit/assets``).

    Raises:
        FileNotFoundError: the file is missing (reinstall prunekit or run
            ``scripts/train_default_model.py``).

    Example:
        >>> len(digits_test_set())
        360
    """
    target = Path(path) if path is not None else DIGITS_TEST_FILE
    if not target.is_file():
        raise FileNotFoundError(
            f"digits test set {str(target)!r} not found; reinstall prunekit or regenerate it "
            "with: python scripts/train_default_model.py"
        )
    with np.load(target, allow_pickle=False) as data:
        images, labels = data["images"], data["labels"]
    return TensorDataset(preprocess_digits(images), torch.as_tensor(labels, dtype=torch.int64))


# ---------------------------------------------------------------------------
# Folders of images


def _check_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int (e.g. 224), got {image_size!r}")


def _normalization(normalize: str) -> Optional[Tuple[Sequence[float], Sequence[float]]]:
    if normalize not in _NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r} is not supported; use one of {', '.join(_NORMALIZATIONS)}")
    return (IMAGENET_MEAN, IMAGENET_STD) if normalize == "imagenet" else None


def _to_input(
    image: Image.Image, image_size: int, norm: Optional[Tuple[Sequence[float], Sequence[float]]]
) -> torch.Tensor:
    """Resize the shorter side to ``image_size``, center-crop a square, scale to [0, 1] and normalise."""
    import torchvision.transforms.functional as TF

    image = image.convert("RGB")
    image = TF.resize(image, [image_size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    image = TF.center_crop(image, [image_size, image_size])
    x = TF.pil_to_tensor(image).float().div_(255.0)
    if norm is not None:
        x = TF.normalize(x, list(norm[0]), list(norm[1]))
    return x


def _readable(path: Path, image_size: int) -> Optional[str]:
    """Decode ``path`` once; return why it cannot be used, or None when it is fine."""
    try:
        with Image.open(path) as image:
            # draft() lets JPEG decode at reduced scale; the whole stream is still read,
            # so truncated files are caught here rather than in the middle of a scan.
            image.draft("RGB", (image_size, image_size))
            image.load()
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return f"{type(err).__name__}: {err}"
    return None


def _is_hidden(name: str) -> bool:
    # Dot-files (.DS_Store, ._x.jpg from macOS) are metadata, not images the user put there.
    return name.startswith(".")


# Folders that hold the system, not a user's images: walking them would take hours or never end.
_SYSTEM_FOLDERS = ("/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/run", "/sbin", "/sys",
                   "/usr", "/var")


def _refuse_system_folder(root: Path) -> None:
    resolved = root.resolve()
    for system in map(Path, _SYSTEM_FOLDERS):
        if resolved == system or (system != Path("/") and system in resolved.parents
                                  and system.name in ("proc", "sys", "dev")):
            raise ValueError(
                f"image folder {str(root)!r} is the system folder {system}, not a folder of images; pass the "
                "folder that holds your images"
            )


def _list_files(root: Path) -> List[Path]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not _is_hidden(d))
        for name in files:
            path = Path(folder) / name
            if _is_hidden(name):
                continue
            if not path.is_file():  # a pipe, socket or device: opening it could block forever
                warnings.warn(f"skipping {str(path)!r}: not a regular file", SkippedFileWarning, stacklevel=3)
                continue
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _usable_images(files: Sequence[Path], image_size: int) -> List[Path]:
    usable = []
    for path in files:
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            warnings.warn(
                f"skipping {str(path)!r}: not an image file (extension {path.suffix or 'none'!r}; "
                f"accepted: {' '.join(IMAGE_EXTENSIONS)})",
                SkippedFileWarning,
                stacklevel=3,
            )
            continue
        problem = _readable(path, image_size)
        if problem is not None:
            warnings.warn(f"skipping {str(path)!r}: unreadable image ({problem})", SkippedFileWarning, stacklevel=3)
            continue
        usable.append(path)
    return usable


class ImageFolderDataset(Dataset):
    """Images listed up front and decoded lazily; yields tensors, or ``(tensor, label)`` when labelled.

    Build it with :func:`load_image_folder`, which checks every file first.

    Attributes:
        files: the image paths, sorted.
        targets: class index per file (labelled) or None.
        classes: sorted class folder names (labelled) or None.
    """

    def __init__(
        self,
        files: Sequence[Path],
        image_size: int,
        targets: Optional[Sequence[int]] = None,
        classes: Optional[Sequence[str]] = None,
        normalize: str = "imagenet",
    ) -> None:
        _check_size(image_size)
        self.files = list(files)
        self.image_size = image_size
        self.targets = list(targets) if targets is not None else None
        self.classes = list(classes) if classes is not None else None
        self.normalize = normalize
        self._norm = _normalization(normalize)

    @property
    def class_to_idx(self) -> Optional[dict]:
        """``{class name: index}`` for a labelled folder, else None."""
        return None if self.classes is None else {name: i for i, name in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Union[torch.Tensor, Tuple[torch.Tensor, int]]:
        path = self.files[index]
        try:
            with Image.open(path) as image:
                x = _to_input(image, self.image_size, self._norm)
        except Exception as err:
            raise OSError(f"cannot read image {str(path)!r} ({err}); was it changed after listing?") from err
        if self.targets is None:
            return x
        return x, self.targets[index]


def load_image_folder(
    path: PathLike, image_size: int, labelled: bool = False, normalize: str = "imagenet"
) -> ImageFolderDataset:
    """Every readable image below ``path`` (recursively), as ``[3, image_size, image_size]`` tensors.

    Images are converted to RGB, resized so the shorter side is ``image_size``,
    center-cropped to a square and normalised (``normalize="imagenet"``: ImageNet
    mean/std, ``"none"``: values in [0, 1]). Files that are not images or cannot
    be decoded are skipped, each with a :class:`SkippedFileWarning`.

    Args:
        path: the folder.
        image_size: side of the square inputs, e.g. 224 for ImageNet VGGs.
        labelled: the first-level subfolders are classes (sorted names -> indices,
            like ``torchvision.datasets.ImageFolder``) and items are ``(image, label)``.
        normalize: ``"imagenet"`` or ``"none"``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        NotADirectoryError: ``path`` is a file.
        ValueError: no readable image remains (the message lists the accepted extensions), or
            ``path`` is a system folder (``/``, ``/usr``, ``/proc``, ...), which holds no images.

    Pipes, sockets and devices below ``path`` are skipped with a warning (opening one could block).

    Example:
        >>> _ = write_synthetic_images("imgs", n=4, image_size=32)
        >>> len(load_image_folder("imgs", image_size=32))
        4
    """
    _check_size(image_size)
    _normalization(normalize)
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{str(root)!r} is a file; pass the folder that holds the images")
    _refuse_system_folder(root)

    if not labelled:
        files = _usable_images(_list_files(root), image_size)
        targets = classes = None
    else:
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not _is_hidden(d.name))
        if not classes:
            raise ValueError(
                f"labelled folder {str(root)!r} has no class subfolders; put each class's images "
                "in its own subfolder (root/cat/1.jpg, root/dog/2.jpg) or drop labelled=True"
            )
        for loose in sorted(p for p in root.iterdir() if not p.is_dir() and not _is_hidden(p.name)):
            warnings.warn(
                f"skipping {str(loose)!r}: not inside a class subfolder", SkippedFileWarning, stacklevel=2
            )
        files, targets = [], []
        for index, name in enumerate(classes):
            class_files = _usable_images(_list_files(root / name), image_size)
            if not class_files:
                warnings.warn(
                    f"class folder {str(root / name)!r} has no readable image", SkippedFileWarning, stacklevel=2
                )
            files.extend(class_files)
            targets.extend([index] * len(class_files))

    if not files:
        raise ValueError(
            f"no readable image in {str(root)!r}; accepted extensions: {' '.join(IMAGE_EXTENSIONS)}"
        )
    return ImageFolderDataset(files, image_size, targets=targets, classes=classes, normalize=normalize)


# ---------------------------------------------------------------------------
# Real photos shipped inside other packages

# name -> (package, path inside it, the pip package that provides it)
_PHOTOS = {
    "grace_hopper": ("matplotlib", ("mpl-data", "sample_data", "grace_hopper.jpg"), "matplotlib"),
    "china": ("sklearn", ("datasets", "images", "china.jpg"), "scikit-learn"),
    "flower": ("sklearn", ("datasets", "images", "flower.jpg"), "scikit-learn"),
}
PHOTO_NAMES = tuple(_PHOTOS)
"""The built-in photos, in order: ``grace_hopper`` (matplotlib), ``china`` and ``flower`` (scikit-learn)."""


def photo_files(names: Optional[Sequence[str]] = None) -> List[Path]:
    """The files of the built-in photos (default: all of :data:`PHOTO_NAMES`), found without importing their packages.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
        ImportError: a package that carries a photo is missing (the message says what to install).

    Example:
        >>> [path.name for path in photo_files(["china"])]
        ['china.jpg']
    """
    chosen = list(PHOTO_NAMES if names is None else names)
    unknown = [name for name in chosen if name not in _PHOTOS]
    if unknown or not chosen:
        raise ValueError(f"unknown photo {unknown[0] if unknown else 'list []'!r}; built-in photos: {', '.join(PHOTO_NAMES)}")
    paths = []
    for name in chosen:
        package, parts, pip_name = _PHOTOS[name]
        folder = package_folder(package)
        path = folder.joinpath(*parts) if folder is not None else None
        if path is None or not path.is_file():
            raise ImportError(
                f"the built-in photo {name!r} ships with {pip_name}, which is not installed here "
                f"(or lacks {'/'.join(parts)}); install it with: pip install {pip_name}"
            )
        paths.append(path)
    return paths


def builtin_photos(
    image_size: int, normalize: str = "imagenet", names: Optional[Sequence[str]] = None
) -> ImageFolderDataset:
    """Real photographs shipped inside matplotlib and scikit-learn, as ``[3, image_size, image_size]`` tensors.

    Each photo is resized (shorter side ``image_size``), center-cropped and
    normalised as in :func:`load_image_folder`. No one here made them: they
    are honest test images for models with real weights, offline.

    Args:
        image_size: side of the square inputs.
        normalize: ``"imagenet"`` (mean/std) or ``"none"`` (values in [0, 1], e.g. for HED).
        names: a subset of :data:`PHOTO_NAMES` (default: all three).

    Example:
        >>> photos = builtin_photos(64, normalize="none")
        >>> len(photos), photos[0].shape
        (3, torch.Size([3, 64, 64]))
    """
    _check_size(image_size)
    _normalization(normalize)
    return ImageFolderDataset(photo_files(names), image_size, normalize=normalize)


# ---------------------------------------------------------------------------
# Synthetic images


def synthetic_image_array(rng: np.random.Generator, image_size: int) -> np.ndarray:
    """Draw one ``[S, S, 3]`` uint8 image: a colour gradient overlaid with stripes, discs, checks or blobs.

    Natural-looking structure (edges, smooth regions, textures at several scales)
    makes conv activations behave more like on photos than white noise does.
    """
    _check_size(image_size)
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float64) / max(image_size - 1, 1)

    angle = rng.uniform(0.0, 2.0 * math.pi)
    ramp = xx * math.cos(angle) + yy * math.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-12)
    low, high = rng.uniform(0.0, 1.0, size=(2, 3))
    image = low + ramp[..., None] * (high - low)

    for kind in rng.choice(4, size=int(rng.integers(1, 3)), replace=False):
        colour = rng.uniform(0.0, 1.0, size=3)
        if kind == 0:  # stripes at a random angle and frequency
            theta = rng.uniform(0.0, math.pi)
            wave = np.sin(2.0 * math.pi * rng.uniform(2.0, 10.0) * (xx * math.cos(theta) + yy * math.sin(theta))
                          + rng.uniform(0.0, 2.0 * math.pi))
            alpha = 0.6 * (wave > 0) if rng.random() < 0.5 else 0.3 * (wave + 1.0)
        elif kind == 1:  # a few discs
            alpha = np.zeros_like(xx)
            for _ in range(int(rng.integers(1, 5))):
                cx, cy = rng.uniform(0.0, 1.0, size=2)
                radius = rng.uniform(0.08, 0.35)
                alpha = np.maximum(alpha, ((xx - cx) ** 2 + (yy - cy) ** 2 < radius**2).astype(np.float64))
        elif kind == 2:  # checkerboard
            cells = int(rng.integers(2, 9))
            alpha = 0.7 * ((np.floor(xx * cells) + np.floor(yy * cells)) % 2)
        else:  # smooth gaussian blobs
            alpha = np.zeros_like(xx)
            for _ in range(int(rng.integers(2, 6))):
                cx, cy = rng.uniform(0.0, 1.0, size=2)
                width = rng.uniform(0.05, 0.25)
                alpha += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2.0 * width**2))
            alpha = np.clip(alpha, 0.0, 1.0)
        image = image * (1.0 - alpha[..., None]) + colour * alpha[..., None]

    image += rng.normal(0.0, 0.02, size=image.shape)
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _check_count(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int (the number of images), got {n!r}")


class SyntheticImages(Dataset):
    """``n`` synthetic images, each drawn from its own seed ``(seed, index)``: same index, same image."""

    def __init__(self, n: int, image_size: int, seed: int = 0, normalize: str = "imagenet") -> None:
        _check_count(n)
        _check_size(image_size)
        self.n = n
        self.image_size = image_size
        self.seed = seed
        self._norm = _normalization(normalize)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} synthetic images")
        array = synthetic_image_array(np.random.default_rng([self.seed, index]), self.image_size)
        return _to_input(Image.fromarray(array), self.image_size, self._norm)


def synthetic_images(n: int, image_size: int, seed: int = 0) -> SyntheticImages:
    """A dataset of ``n`` procedurally drawn RGB images, ImageNet-normalised (no download needed).

    Example:
        >>> synthetic_images(8, 32)[0].shape
        torch.Size([3, 32, 32])
    """
    return SyntheticImages(n, image_size, seed=seed)


def write_synthetic_images(folder: PathLike, n: int, image_size: int, seed: int = 0) -> List[Path]:
    """Write ``n`` synthetic images as PNG files ``synthetic_0000.png``, ... into ``folder``.

    The images are the ones :func:`synthetic_images` yields for the same seed.

    Returns:
        The paths written, in order.
    """
    _check_count(n)
    _check_size(image_size)
    root = Path(folder)
    paths = []
    for index in range(n):
        array = synthetic_image_array(np.random.default_rng([seed, index]), image_size)
        path = root / f"synthetic_{index:04d}.png"
        with atomic_write(path, "wb") as handle:
            Image.fromarray(array).save(handle, format="PNG")
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------


def random_crops(
    images: torch.Tensor, size: int, count: int, batch_size: int, seed: int = 0
) -> List[torch.Tensor]:
    """``count`` batches of random ``size`` x ``size`` crops (randomly mirrored) of ``images`` ``[N, C, H, W]``.

    Deterministic for a ``seed``. A few photos give many different training
    inputs this way (what :func:`prunekit.training.recover` needs from unlabelled images);
    images smaller than ``size`` are refused.

    Example:
        >>> batches = random_crops(torch.rand(2, 3, 40, 40), 32, count=3, batch_size=4)
        >>> len(batches), batches[0].shape
        (3, torch.Size([4, 3, 32, 32]))
    """
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty [N, C, H, W] batch, got shape {tuple(images.shape)}")
    height, width = images.shape[-2:]
    if size > min(height, width):
        raise ValueError(f"crop size {size} exceeds the images ({height}x{width}); load them larger or crop smaller")
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        picks = torch.randint(images.shape[0], (batch_size,), generator=generator)
        tops = torch.randint(height - size + 1, (batch_size,), generator=generator)
        lefts = torch.randint(width - size + 1, (batch_size,), generator=generator)
        flips = torch.rand(batch_size, generator=generator) < 0.5
        crops = []
        for pick, top, left, flip in zip(picks.tolist(), tops.tolist(), lefts.tolist(), flips.tolist()):
            crop = images[pick, :, top : top + size, left : left + size]
            crops.append(crop.flip(-1) if flip else crop)
        batches.append(torch.stack(crops))
    return batches


def make_loader(dataset: Dataset, batch_size: int) -> DataLoader:
    """A deterministic loader: dataset order, no worker processes, last partial batch kept.

    Example:
        >>> next(iter(make_loader(synthetic_images(5, 32), batch_size=4))).shape
        torch.Size([4, 3, 32, 32])
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int (e.g. 32), got {batch_size!r}")
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, drop_last=False)
