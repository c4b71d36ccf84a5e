"""Procedural style images for training AdaIN offline: five families of textures, one per seed.

The held-out styles (scikit-image's gravel, the drawn ``waves`` and ``landscape``)
are not among them: every texture here is drawn from its own seed with its own
palette, so a decoder trained on them meets the held-out styles for the first time.

Families (``seed % 5``): ``tiles`` (Voronoi cells with grout), ``marble``
(turbulent bands), ``strokes`` (thick brush-like strokes), ``dots``
(pointillist discs) and ``plaid`` (crossed translucent stripes).

Example:
    >>> generate_texture(3, 64).size
    (64, 64)
    >>> texture_family(3)
    'dots'
"""

from __future__ import annotations

import colorsys
import math
from typing import Callable, Dict, List

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy.ndimage import zoom
from scipy.spatial import cKDTree

__all__ = ["TEXTURE_FAMILIES", "generate_texture", "texture_family"]


def _palette(rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` RGB colours in [0, 1] around a random base hue (a harmonious but varied set)."""
    base = rng.uniform(0, 1)
    spread = rng.uniform(0.05, 0.5)
    hues = (base + rng.uniform(-spread, spread, count)) % 1.0
    saturation = rng.uniform(0.3, 1.0, count)
    value = rng.uniform(0.25, 1.0, count)
    return np.array([colorsys.hsv_to_rgb(h, s, v) for h, s, v in zip(hues, saturation, value)])


def _to_image(rgb: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8), mode="RGB")


def _smooth_noise(rng: np.random.Generator, size: int, octaves: int = 4) -> np.ndarray:
    """Fractal noise in [0, 1]: bilinear-upsampled random grids, coarse to fine."""
    field = np.zeros((size, size))
    for octave in range(octaves):
        cells = 2 ** (octave + 2)
        grid = rng.uniform(-1, 1, (cells + 1, cells + 1))
        up = zoom(grid, size / cells, order=1)[:size, :size]
        field += up / 2**octave
    field -= field.min()
    return field / max(field.max(), 1e-9)


def _tiles(rng: np.random.Generator, size: int) -> Image.Image:
    count = int(rng.integers(15, 250))
    seeds = rng.uniform(0, size, (count, 2))
    colours = _palette(rng, count)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    distance, index = cKDTree(seeds).query(np.stack([x.ravel(), y.ravel()], axis=1), k=2)
    distance = distance.reshape(size, size, 2)
    rgb = colours[index[:, 0].reshape(size, size)]
    grout = (distance[..., 1] - distance[..., 0]) < rng.uniform(1.0, max(1.0, size / 80))
    rgb[grout] = rng.uniform(0, 1) ** 2 * np.ones(3)
    return _to_image(rgb)


def _marble(rng: np.random.Generator, size: int) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    angle = rng.uniform(0, math.pi)
    frequency = rng.uniform(3, 20)
    turbulence = rng.uniform(1, 8)
    phase = frequency * (x * math.cos(angle) + y * math.sin(angle)) + turbulence * _smooth_noise(rng, size)
    t = 0.5 + 0.5 * np.sin(2 * math.pi * phase)
    colours = _palette(rng, 3)
    # A three-stop gradient: t=0 -> colours[0], 0.5 -> colours[1], 1 -> colours[2].
    low = np.clip(1 - 2 * t, 0, 1)[..., None]
    high = np.clip(2 * t - 1, 0, 1)[..., None]
    rgb = low * colours[0] + high * colours[2] + (1 - low - high) * colours[1]
    return _to_image(rgb)


def _strokes(rng: np.random.Generator, size: int) -> Image.Image:
    colours = _palette(rng, 8)
    image = Image.new("RGB", (size, size), tuple(int(255 * c) for c in colours[0]))
    draw = ImageDraw.Draw(image)
    direction = rng.uniform(0, math.pi)
    for _ in range(int(rng.integers(150, 600))):
        cx, cy = rng.uniform(0, size, 2)
        angle = direction + rng.normal(0, rng.uniform(0.1, 1.2))
        length = rng.uniform(0.03, 0.2) * size
        dx, dy = math.cos(angle) * length / 2, math.sin(angle) * length / 2
        colour = tuple(int(255 * c) for c in colours[int(rng.integers(0, len(colours)))])
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=colour, width=int(rng.integers(2, max(3, size // 25))))
    return image.filter(ImageFilter.SMOOTH)


def _dots(rng: np.random.Generator, size: int) -> Image.Image:
    colours = _palette(rng, 6)
    image = Image.new("RGB", (size, size), tuple(int(255 * c) for c in colours[0]))
    draw = ImageDraw.Draw(image)
    radius = rng.uniform(0.005, 0.04) * size
    for _ in range(int(min(6000, 0.6 * size * size / max(radius, 1.0) ** 2))):
        cx, cy = rng.uniform(0, size, 2)
        r = radius * rng.uniform(0.6, 1.4)
        colour = tuple(int(255 * c) for c in colours[int(rng.integers(1, len(colours)))])
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    return image


def _plaid(rng: np.random.Generator, size: int) -> Image.Image:
    colours = _palette(rng, 5)
    rgb = np.ones((size, size, 3)) * colours[0]
    coordinate = np.arange(size, dtype=np.float64)
    for colour in colours[1:]:
        period = rng.uniform(0.05, 0.4) * size
        width = rng.uniform(0.1, 0.5) * period
        offset = rng.uniform(0, period)
        band = ((coordinate + offset) % period) < width
        alpha = rng.uniform(0.3, 0.7)
        if rng.uniform() < 0.5:
            mask = np.broadcast_to(band[None, :], (size, size))
        else:
            mask = np.broadcast_to(band[:, None], (size, size))
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * colour
    return _to_image(rgb)


_FAMILIES: Dict[str, Callable[[np.random.Generator, int], Image.Image]] = {
    "tiles": _tiles,
    "marble": _marble,
    "strokes": _strokes,
    "dots": _dots,
    "plaid": _plaid,
}
TEXTURE_FAMILIES: List[str] = list(_FAMILIES)


def texture_family(seed: int) -> str:
    """The family a seed draws: ``TEXTURE_FAMILIES[seed % 5]``."""
    return TEXTURE_FAMILIES[seed % len(TEXTURE_FAMILIES)]


def generate_texture(seed: int, size: int = 256) -> Image.Image:
    """A ``size`` x ``size`` style texture, a pure function of ``(seed, size)``.

    Raises:
        ValueError: ``size`` below 16 or ``seed`` negative.
    """
    if size < 16:
        raise ValueError(f"size={size} is too small for a texture; use 16 or more")
    if seed < 0:
        raise ValueError(f"seed={seed} must be >= 0")
    rng = np.random.default_rng([seed, 20221])
    return _FAMILIES[texture_family(seed)](rng, size)
