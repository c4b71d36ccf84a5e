"""Sensitivity curves as a PNG: one small chart per layer, score against sparsity, with the dense baseline."""

from __future__ import annotations

import math
from typing import Mapping, TYPE_CHECKING, Any, Optional

from prunekit.io.files import PathLike
from prunekit.plotting import new_figure, save_png

from prunekit.sensitivity.tolerance import within_tolerance

if TYPE_CHECKING:  # pragma: no cover
    from prunekit.sensitivity.result import SensitivityResult

__all__ = ["plot_sensitivity"]

_COLUMNS = 4



def plot_sensitivity(
    result: "SensitivityResult",
    path: PathLike,
    max_drop: Optional[float] = None,
    relative: bool = False,
    title: Optional[str] = None,
    plan: Optional[Mapping[str, float]] = None,
) -> Any:
    """Write ``result`` as a grid of per-layer curves to the PNG file ``path`` (atomically); returns the Figure.

    Each chart shows the score at 0 % (the dense baseline) and at every scanned
    sparsity, the baseline as a dashed line, and with ``max_drop`` the band of
    acceptable scores, red crosses on the points beyond it, and each layer's own
    planned sparsity (dotted red). The points a settling scan stopped early carry
    their confidence intervals as error bars. With ``plan`` (e.g. a joint plan from
    :func:`prunekit.planning.fit_plan`), its sparsities are drawn as solid red
    lines. A planned sparsity of 0 (the layer stays dense) is drawn at 0 %. All
    charts share the y axis so layers can be compared at a glance.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'prunekit[plots]'``).
        ValueError: the baseline is not measured yet.

    Example:
        >>> from prunekit.sensitivity import SensitivityResult
        >>> result = SensitivityResult("accuracy", True, 0.9, (0.5, 0.9), {"conv": [0.9, 0.6]})
        >>> figure = plot_sensitivity(result, "sensitivity.png", max_drop=0.01)
        >>> open("sensitivity.png", "rb").read(4)[1:]
        b'PNG'
    """
    if result.baseline is None:
        raise ValueError("the baseline is not measured yet; finish the scan before plotting")
    baseline = result.baseline
    per_layer = result.plan(max_drop, relative) if max_drop is not None else None
    layers = result.layers
    columns = min(_COLUMNS, max(1, len(layers)))
    rows = math.ceil(len(layers) / columns)

    figure = new_figure(3.2 * columns, 2.4 * rows + 0.8)
    axes = figure.subplots(rows, columns, sharex=True, sharey=True, squeeze=False)
    xs = [0.0] + [100.0 * s for s in result.sparsities]
    allowed = None
    if max_drop is not None:
        delta = max_drop * abs(baseline) if relative else max_drop
        allowed = baseline - delta if result.higher_is_better else baseline + delta

    for index, ax in enumerate(axes.flat):
        if index >= len(layers):
            ax.set_visible(False)
            continue
        layer = layers[index]
        scores = result.scores[layer]
        points = [(x, y) for x, y in zip(xs, [baseline] + scores) if y is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, color="tab:blue")
        settled = [(xs[i + 1], result.estimate(layer, i)) for i in range(len(scores)) if result.estimate(layer, i)]
        if settled:  # a settling scan's early-stopped points: their confidence intervals
            ax.errorbar([x for x, _ in settled], [e["score"] for _, e in settled],
                        yerr=[[e["score"] - e["low"] for _, e in settled], [e["high"] - e["score"] for _, e in settled]],
                        linestyle="none", color="tab:blue", alpha=0.6, capsize=2, gid="estimated")
        ax.axhline(baseline, linestyle="--", linewidth=1, color="gray", label="dense")
        if allowed is not None:
            low, high = sorted((baseline, allowed))
            ax.axhspan(low, high, color="tab:green", alpha=0.12, linewidth=0)
            beyond = [
                (x, y) for x, y in points[1:]
                if not within_tolerance(y, baseline, result.higher_is_better, relative, max_drop)
            ]
            if beyond:
                ax.plot([p[0] for p in beyond], [p[1] for p in beyond], linestyle="none", marker="x",
                        markersize=6, color="tab:red", gid="beyond-tolerance")
        if per_layer is not None:
            style = "-" if plan is None else ":"
            ax.axvline(100.0 * per_layer[layer], color="tab:red", linewidth=1, linestyle=style, gid="alone")
        if plan is not None:
            ax.axvline(100.0 * plan.get(layer, 0.0), color="tab:red", linewidth=1.5, gid="plan")
        ax.set_title(layer, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for column in range(columns):
        # The lowest chart of each column carries the x labels (the grid's last row may be partly empty).
        lowest = axes[(len(layers) - 1 - column) // columns, column] if column < len(layers) else None
        if lowest is not None:
            lowest.xaxis.set_tick_params(labelbottom=True)
            lowest.set_xlabel("sparsity (%)", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel(result.metric, fontsize=8)

    direction = "higher" if result.higher_is_better else "lower"
    heading = title or f"Sensitivity: {result.metric} ({direction} is better), {result.method} pruning, one layer at a time"
    if per_layer is not None and plan is not None:
        heading += ("\nband: tolerance; x: beyond it; dotted red: each layer alone; "
                    "solid red: the plan (all layers together)")
    elif per_layer is not None:
        heading += "\nband: tolerance, x: beyond it, red line: planned sparsity"
    elif plan is not None:
        heading += "\nred line: planned sparsity"
    if result.num_estimated:
        heading += f"; bars: intervals of the {result.num_estimated} points stopped early"
    figure.suptitle(heading, fontsize=10)
    save_png(figure, path)
    return figure
