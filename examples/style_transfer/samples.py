"""Sample images that need no download: drawn here, or matplotlib's bundled photograph.

* ``landscape`` (content): sky, sun, hills, a house and a lake, drawn with Pillow.
* ``hopper`` (content): Grace Hopper's portrait shipped with matplotlib (``grace_hopper.jpg``).
* ``waves`` (style): interfering colour waves.
* ``mosaic`` (style): Voronoi tiles with dark grout.

Pass them as ``sample:NAME`` wherever the CLI expects an image, or write them
to files with ``python -m examples.style_transfer samples DIR``.

Example:
    >>> draw_sample("waves", 64).size
    (64, 64)
"""

from __future__ import annotations

import colorsys
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from scipy.spatial import cKDTree
from torch import Tensor

from examples.style_transfer.imaging import load_image, save_image
from prunekit.io.files import PathLike

__all__ = ["SAMPLE_PREFIX", "draw_sample", "load_image_or_sample", "sample_names", "write_samples"]

SAMPLE_PREFIX = "sample:"
_BASE = 512  # drawing size; samples are drawn at this size and resized


def _landscape(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    horizon = int(height * 0.62)
    for y in range(horizon):  # sky: deep blue to warm haze
        t = y / max(1, horizon - 1)
        draw.line([(0, y), (width, y)], fill=(int(40 + 200 * t), int(90 + 110 * t), int(200 - 40 * t)))
    sun = (int(width * 0.72), int(height * 0.25), int(min(width, height) * 0.08))
    draw.ellipse([sun[0] - sun[2], sun[1] - sun[2], sun[0] + sun[2], sun[1] + sun[2]], fill=(255, 226, 120))
    far = [(0, horizon)] + [
        (x, int(horizon - height * (0.16 + 0.07 * math.sin(x / width * 7.0) + 0.04 * math.sin(x / width * 19.0))))
        for x in range(0, width + 8, 8)
    ] + [(width, horizon)]
    draw.polygon(far, fill=(88, 104, 140))
    near = [(0, horizon)] + [
        (x, int(horizon - height * (0.07 + 0.05 * math.sin(x / width * 4.0 + 1.3))))
        for x in range(0, width + 8, 8)
    ] + [(width, horizon)]
    draw.polygon(near, fill=(58, 120, 64))
    draw.rectangle([0, horizon, width, height], fill=(40, 92, 150))  # lake
    for y in range(horizon + 4, height, 6):  # ripples
        draw.line([(int(width * 0.05), y), (int(width * 0.95), y)], fill=(70, 130, 185), width=1)
    reflection = (sun[0], 2 * horizon - sun[1])
    draw.ellipse(
        [reflection[0] - sun[2], reflection[1] - sun[2] // 3, reflection[0] + sun[2], reflection[1] + sun[2] // 3],
        fill=(230, 210, 140),
    )
    hx, hy, hw = int(width * 0.2), int(horizon - height * 0.02), int(width * 0.16)
    draw.rectangle([hx, hy - int(hw * 0.7), hx + hw, hy], fill=(200, 70, 50))
    draw.polygon([(hx - hw // 8, hy - int(hw * 0.7)), (hx + hw // 2, hy - int(hw * 1.2)), (hx + hw + hw // 8, hy - int(hw * 0.7))], fill=(90, 50, 40))
    draw.rectangle([hx + hw // 2 - hw // 10, hy - int(hw * 0.35), hx + hw // 2 + hw // 10, hy], fill=(60, 40, 30))
    draw.rectangle([hx + hw // 8, hy - int(hw * 0.55), hx + hw // 3, hy - int(hw * 0.38)], fill=(250, 240, 170))
    return image.filter(ImageFilter.SMOOTH)


def _hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB, all in [0, 1] (``colorsys`` works on one pixel at a time)."""
    sector = np.floor(hue * 6.0)
    fraction = hue * 6.0 - sector
    p = value * (1.0 - saturation)
    q = value * (1.0 - saturation * fraction)
    t = value * (1.0 - saturation * (1.0 - fraction))
    choices = [
        np.stack(channels, axis=-1)
        for channels in ((value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q))
    ]
    index = (sector.astype(int) % 6)[..., None]
    return np.choose(np.broadcast_to(index, choices[0].shape), choices)


def _waves(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    x /= width
    y /= height
    field = np.sin(14.0 * x + 4.0 * np.sin(9.0 * y)) + np.sin(11.0 * y + 3.0 * np.cos(7.0 * x)) + np.sin(20.0 * (x + y))
    hue = (field / 6.0 + 0.5) % 1.0
    bands = 0.55 + 0.45 * np.cos(field * 3.0)
    rgb = _hsv_to_rgb(hue, np.full_like(hue, 0.85), bands)
    return Image.fromarray((rgb * 255).round().astype(np.uint8), mode="RGB")


def _mosaic(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(7)
    count = 90
    seeds = rng.uniform(0, 1, size=(count, 2)) * (width, height)
    palette = np.array(
        [colorsys.hsv_to_rgb(h, s, v) for h, s, v in zip(rng.uniform(0, 1, count), rng.uniform(0.5, 0.9, count), rng.uniform(0.6, 1.0, count))]
    )
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    # The two nearest seeds of every pixel: the nearest gives the tile, the gap to the second the grout.
    distance, index = cKDTree(seeds).query(np.stack([x.ravel(), y.ravel()], axis=1), k=2)
    distance = distance.reshape(height, width, 2)
    nearest = index[:, 0].reshape(height, width)
    grout = (distance[..., 1] - distance[..., 0]) < max(2.0, width / 150)
    rgb = palette[nearest]
    rgb[grout] = (0.12, 0.1, 0.08)
    return Image.fromarray((rgb * 255).round().astype(np.uint8), mode="RGB")


def _hopper_path() -> str:
    from matplotlib import cbook

    return str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


_DRAWN: Dict[str, Callable[[int, int], Image.Image]] = {
    "landscape": _landscape,
    "waves": _waves,
    "mosaic": _mosaic,
}
_ASPECT = {"landscape": (4, 3), "waves": (1, 1), "mosaic": (1, 1)}


def sample_names() -> List[str]:
    """Names of the available samples (``hopper`` needs matplotlib)."""
    return sorted([*_DRAWN, "hopper"])


def draw_sample(name: str, size: Optional[int] = None) -> Image.Image:
    """The sample ``name`` as a PIL image whose longer side is ``size`` (default 512, hopper: its own size)."""
    if name == "hopper":
        with Image.open(_hopper_path()) as opened:
            image = opened.convert("RGB")
    elif name in _DRAWN:
        aspect_w, aspect_h = _ASPECT[name]
        longer = _BASE
        width, height = (longer, longer * aspect_h // aspect_w) if aspect_w >= aspect_h else (longer * aspect_w // aspect_h, longer)
        image = _DRAWN[name](width, height)
    else:
        raise KeyError(f"unknown sample {name!r}; samples are: {', '.join(sample_names())}")
    if size is not None:
        scale = int(size) / max(image.size)
        new_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        if new_size != image.size:
            image = image.resize(new_size, Image.Resampling.LANCZOS)
    return image


def load_image_or_sample(spec: str, size: Optional[int] = None) -> Tensor:
    """Load ``spec`` as an image tensor ``[1, 3, H, W]``: a file path, or ``sample:NAME``."""
    if spec.startswith(SAMPLE_PREFIX):
        image = draw_sample(spec[len(SAMPLE_PREFIX) :], size)
        array = np.asarray(image, dtype=np.float32) / 255.0
        return torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0).contiguous()
    return load_image(spec, size)


def write_samples(folder: PathLike, size: Optional[int] = None) -> List[Path]:
    """Write every sample as ``NAME.png`` into ``folder``; returns the paths."""
    paths = []
    for name in sample_names():
        path = Path(folder) / f"{name}.png"
        image = draw_sample(name, size)
        save_image(image, path)
        paths.append(path)
    return paths
