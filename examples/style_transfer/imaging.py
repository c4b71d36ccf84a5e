"""Image I/O for the style-transfer examples: files <-> tensors in [0, 1], resizing, panels.

Tensors are RGB batches ``[1, 3, H, W]`` (a single ``[3, H, W]`` image is accepted
where noted) with values in [0, 1].

Example:
    >>> img = torch.rand(1, 3, 32, 48)
    >>> save_image(img, "out.png")
    >>> load_image("out.png", size=24).shape
    torch.Size([1, 3, 16, 24])
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError
from torch import Tensor

from prunekit.io.files import PathLike, atomic_write

__all__ = ["crop_to_multiple", "image_format", "load_image", "match_size", "resize_longer_side", "save_image",
           "side_by_side", "stack_rows", "to_pil"]


def _as_batch(img: Tensor) -> Tensor:
    if img.dim() == 3:
        img = img.unsqueeze(0)
    if img.dim() != 4 or img.shape[0] != 1 or img.shape[1] != 3:
        raise ValueError(f"expected an RGB image [1, 3, H, W] or [3, H, W], got shape {tuple(img.shape)}")
    return img


def _target_size(width: int, height: int, size: int) -> tuple:
    """(width, height) with the longer side ``size``, aspect kept, each side at least 1."""
    scale = size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def load_image(path: PathLike, size: Optional[int] = None) -> Tensor:
    """Read an image file as an RGB tensor ``[1, 3, H, W]`` in [0, 1].

    Args:
        path: any format Pillow reads (PNG, JPEG, ...); alpha is dropped, grey becomes RGB.
        size: resize so the LONGER side is ``size`` pixels, keeping the aspect ratio;
            ``None`` keeps the file's size.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a readable image, or ``size`` < 1.
    """
    if size is not None and int(size) < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    target = Path(path)
    if not target.is_file():
        raise FileNotFoundError(f"image {str(target)!r} does not exist")
    try:
        with Image.open(target) as opened:
            image = opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(
            f"cannot read {str(target)!r} as an image ({err.__class__.__name__}); pass a PNG or JPEG file"
        ) from None
    if size is not None:
        new_size = _target_size(image.width, image.height, int(size))
        if new_size != image.size:
            image = image.resize(new_size, Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0).contiguous()


def to_pil(img01: Tensor) -> Image.Image:
    """Convert ``[1, 3, H, W]`` or ``[3, H, W]`` in [0, 1] to an 8-bit RGB PIL image (values are clamped)."""
    img = _as_batch(img01.detach().float().cpu())[0]
    array = (img.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array, mode="RGB")


def image_format(path: PathLike) -> str:
    """Pillow's format name for the suffix of ``path`` (``PNG`` for ``.png``); ValueError if unknown."""
    return _format_for(Path(path))


def _format_for(path: Path) -> str:
    extensions = Image.registered_extensions()
    suffix = path.suffix.lower()
    if suffix not in extensions:
        raise ValueError(
            f"cannot tell the image format of {str(path)!r} from its suffix {suffix!r}; "
            f"use .png or .jpg"
        )
    return extensions[suffix]


def save_image(img01: Union[Tensor, Image.Image], path: PathLike) -> None:
    """Write an image atomically; the format follows the suffix (``.png``, ``.jpg``, ...)."""
    target = Path(path)
    image_format = _format_for(target)
    image = img01 if isinstance(img01, Image.Image) else to_pil(img01)
    with atomic_write(target, "wb") as handle:
        image.save(handle, format=image_format)


def resize_longer_side(img: Tensor, size: int) -> Tensor:
    """Resize ``[1, 3, H, W]`` so its longer side is ``size`` (antialiased bilinear)."""
    img = _as_batch(img)
    height, width = img.shape[-2:]
    new_width, new_height = _target_size(width, height, size)
    if (new_height, new_width) == (height, width):
        return img
    return F.interpolate(img, size=(new_height, new_width), mode="bilinear", align_corners=False, antialias=True)


def match_size(img: Tensor, like: Tensor) -> Tensor:
    """Resize ``img`` to the height and width of ``like`` (antialiased bilinear; aspect not kept)."""
    img = _as_batch(img)
    size = tuple(like.shape[-2:])
    if tuple(img.shape[-2:]) == size:
        return img
    return F.interpolate(img, size=size, mode="bilinear", align_corners=False, antialias=True).clamp(0.0, 1.0)


def side_by_side(
    images: Sequence[Tensor], labels: Optional[Sequence[str]] = None, height: Optional[int] = None
) -> Image.Image:
    """Lay images out in one row, each scaled to the same height, with its label underneath.

    Args:
        images: tensors ``[1, 3, H, W]`` in [0, 1].
        labels: one caption per image (``None``: no captions).
        height: row height in pixels; default the tallest image's height.

    Example:
        >>> panel = side_by_side([torch.zeros(1, 3, 16, 16)], ["a caption wider than the image"])
        >>> panel.width > 16 + 8
        True
    """
    if not images:
        raise ValueError("images is empty; pass at least one image")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels; pass one label per image")
    pils: List[Image.Image] = [to_pil(img) for img in images]
    row_height = int(height) if height is not None else max(p.height for p in pils)
    scaled = [
        p if p.height == row_height else p.resize((max(1, round(p.width * row_height / p.height)), row_height), Image.Resampling.LANCZOS)
        for p in pils
    ]
    font = ImageFont.load_default()
    gap = 4
    caption = 0
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_widths = [0] * len(scaled)
    if labels:
        caption = max(probe.textbbox((0, 0), text, font=font)[3] for text in labels) + 2 * gap
        text_widths = [probe.textbbox((0, 0), text, font=font)[2] for text in labels]
    # Each column is as wide as its image or its caption, whichever is wider: small images keep whole captions.
    columns = [max(image.width, text) for image, text in zip(scaled, text_widths)]
    width = sum(columns) + gap * (len(scaled) + 1)
    canvas = Image.new("RGB", (width, row_height + caption + 2 * gap), "white")
    draw = ImageDraw.Draw(canvas)
    x = gap
    for index, (image, column) in enumerate(zip(scaled, columns)):
        canvas.paste(image, (x + (column - image.width) // 2, gap))
        if labels is not None:
            draw.text((x + (column - text_widths[index]) // 2, row_height + 2 * gap), labels[index], fill="black", font=font)
        x += column + gap
    return canvas


def stack_rows(rows: Sequence[Image.Image]) -> Image.Image:
    """Stack images top to bottom on a white canvas as wide as the widest, left-aligned.

    Example:
        >>> stack_rows([Image.new("RGB", (4, 2)), Image.new("RGB", (3, 5))]).size
        (4, 7)
    """
    canvas = Image.new("RGB", (max(row.width for row in rows), sum(row.height for row in rows)), "white")
    top = 0
    for row in rows:
        canvas.paste(row, (0, top))
        top += row.height
    return canvas


def crop_to_multiple(image: Tensor, multiple: int = 8) -> Tensor:
    """Centre-crop ``[..., H, W]`` so both sides are multiples of ``multiple`` (AdaIN: three poolings).

    Raises:
        ValueError: a side is shorter than ``multiple``.

    Example:
        >>> crop_to_multiple(torch.zeros(1, 3, 37, 20)).shape
        torch.Size([1, 3, 32, 16])
    """
    height, width = image.shape[-2:]
    if height < multiple or width < multiple:
        raise ValueError(f"an image of {height}x{width} px is too small; use --size {multiple} or more")
    top, left = (height % multiple) // 2, (width % multiple) // 2
    return image[..., top : top + height - height % multiple, left : left + width - width % multiple]
