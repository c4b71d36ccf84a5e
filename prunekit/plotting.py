"""Figures for prunekit's PNGs: matplotlib without pyplot (no global state, no display), written atomically.

Example:
    >>> figure = new_figure(2.0, 1.5)
    >>> _ = figure.subplots().plot([0, 1], [1, 0])
    >>> save_png(figure, "line.png")
    >>> open("line.png", "rb").read(4)[1:]
    b'PNG'
"""

from __future__ import annotations

from typing import Any

from prunekit.io.files import PathLike, atomic_write

__all__ = ["new_figure", "save_png"]


def new_figure(width: float, height: float) -> Any:
    """A matplotlib ``Figure`` of ``width`` x ``height`` inches with an Agg canvas (constrained layout).

    Raises:
        ImportError: matplotlib is not installed (the message gives the install command).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'prunekit[plots]'") from None
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_png(figure: Any, path: PathLike, dpi: int = 100) -> None:
    """Write ``figure`` to ``path`` as a PNG, atomically."""
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=dpi)
