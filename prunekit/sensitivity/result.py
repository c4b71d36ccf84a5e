"""The outcome of a sensitivity scan: scores per layer and sparsity, plan selection, table, JSON, CSV.

Everything here is pure data: no model, no torch. A result may be partial
(``None`` for points not measured yet) while a scan runs or after it was
interrupted; ``scan(..., resume_from=result)`` completes it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from prunekit.io.files import PathLike, atomic_write, read_json
from prunekit.tables import format_table
from prunekit.sensitivity.tolerance import check_tolerance, within_tolerance

__all__ = [
    "DEFAULT_SPARSITIES",
    "SensitivityResult",
    "check_sparsities",
    "select_plan",
    "select_sparsity",
]

#: The sparsity levels of the reference analysis (one VGG-19 conv layer at a time).
DEFAULT_SPARSITIES: Tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

_FORMAT = "prunekit.sensitivity/1"


def check_sparsities(sparsities: Iterable[float]) -> Tuple[float, ...]:
    """Return ``sparsities`` as a tuple of floats, checking they are in [0, 1), increasing and unique.

    Raises:
        ValueError: empty, a value outside [0, 1), a duplicate or a value out of order
            (the message names it).
        TypeError: a value is not a number.

    Example:
        >>> check_sparsities([0.5, 0.9])
        (0.5, 0.9)
    """
    if isinstance(sparsities, (str, bytes)):
        raise TypeError(f"sparsities must be a sequence of numbers, got the string {sparsities!r}")
    values = list(sparsities)
    if not values:
        raise ValueError("sparsities is empty; pass at least one level, e.g. (0.4, 0.5, ..., 0.9)")
    checked: List[float] = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"sparsity {value!r} is not a number; use fractions in [0, 1)")
        value = float(value)
        if not 0.0 <= value < 1.0:
            raise ValueError(
                f"sparsity {value:g} is outside [0, 1); a sparsity is the fraction of weights "
                "removed (1.0 would remove the whole layer)"
            )
        if value in checked:
            raise ValueError(f"sparsity {value:g} is listed twice; list each level once")
        if checked and value < checked[-1]:
            raise ValueError(
                f"sparsity {value:g} comes after {checked[-1]:g}; list the levels in increasing order"
            )
        checked.append(value)
    return tuple(checked)


def select_sparsity(
    scores: Sequence[Optional[float]],
    sparsities: Sequence[float],
    baseline: float,
    higher_is_better: bool,
    max_drop: float,
    relative: bool = False,
) -> float:
    """Highest scanned sparsity whose score, and the scores of every lower level, stay within tolerance.

    A point is within tolerance when ``baseline - score <= max_drop`` (higher is
    better) or ``score - baseline <= max_drop`` (lower is better); with
    ``relative=True`` the drop is divided by ``|baseline|`` first. The scan stops
    at the first level that fails (a later level that recovers is noise, not a
    safe setting). A missing (``None``) or NaN score fails. Returns 0.0 when even
    the lowest level fails.

    Example:
        >>> select_sparsity([0.97, 0.96, 0.90], [0.4, 0.5, 0.6], 0.97, True, max_drop=0.01)
        0.5
    """
    if len(scores) != len(sparsities):
        raise ValueError(f"{len(scores)} scores for {len(sparsities)} sparsities; they must match")
    check_tolerance(max_drop, baseline, relative)
    chosen = 0.0
    for sparsity, score in zip(sparsities, scores):
        if score is None or not within_tolerance(score, baseline, higher_is_better, relative, max_drop):
            break
        chosen = float(sparsity)
    return chosen


def select_plan(
    scores: Mapping[str, Sequence[Optional[float]]],
    sparsities: Sequence[float],
    baseline: float,
    higher_is_better: bool,
    max_drop: float,
    relative: bool = False,
) -> Dict[str, float]:
    """Apply :func:`select_sparsity` to every layer; returns ``{layer: sparsity}`` in layer order.

    Example:
        >>> select_plan({"0": [0.1, 0.3]}, [0.5, 0.9], 0.0, False, max_drop=0.2)
        {'0': 0.5}
    """
    return {
        layer: select_sparsity(values, sparsities, baseline, higher_is_better, max_drop, relative)
        for layer, values in scores.items()
    }


def _encode(value: Optional[float]) -> Any:
    # JSON has no NaN/Infinity; spell them as strings so any JSON reader copes.
    if value is None or math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _decode(value: Any, where: str) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, str) and value in ("NaN", "Infinity", "-Infinity"):
        return float(value.replace("Infinity", "inf"))
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{where}: {value!r} is not a score (a number, null or NaN/Infinity)")
    return float(value)


def _decode_estimates(data: Any, source: str) -> Dict[str, List[Optional[Dict[str, Any]]]]:
    """A file's ``estimates`` checked field by field (see :class:`~prunekit.sensitivity.settle.Estimate`)."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ValueError("'estimates' must map layer names to lists")
    from prunekit.sensitivity.settle import Estimate

    decoded: Dict[str, List[Optional[Dict[str, Any]]]] = {}
    for layer, values in data.items():
        if not isinstance(values, list):
            raise ValueError(f"estimates of layer {layer!r} must be a list")
        decoded[str(layer)] = [None if value is None else Estimate.from_dict(value).to_dict() for value in values]
    return decoded


def _format_score(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e4 else f"{value:.3e}"


def _percent(sparsity: float) -> str:
    return f"{sparsity * 100:.4g}%"


@dataclass
class SensitivityResult:
    """Scores of a model with one conv layer pruned at a time, at each sparsity level.

    Attributes:
        metric: name of the score (``"accuracy"``, ``"distortion"``, ...).
        higher_is_better: direction of the score.
        baseline: score of the dense model (None until measured).
        sparsities: the scanned levels, increasing.
        scores: layer name -> one score per sparsity (``None``: not measured yet).
        method: ``"fine-grained"`` or ``"channel"`` (what a sparsity means).
        meta: free-form information about the run (model, data, options).
        estimates: for a settling scan (``scan(..., confidence=...)``), layer -> per sparsity the
            :class:`~prunekit.sensitivity.settle.Estimate` as a dict (score, interval, batches used,
            verdict) where the point stopped early, else ``None`` (the score is exact).

    Example:
        >>> result = SensitivityResult("accuracy", True, 0.9, (0.5, 0.9), {"conv1": [0.89, 0.6]})
        >>> result.plan(max_drop=0.02)
        {'conv1': 0.5}
    """

    metric: str
    higher_is_better: bool
    baseline: Optional[float]
    sparsities: Tuple[float, ...]
    scores: Dict[str, List[Optional[float]]]
    method: str = "fine-grained"
    meta: Dict[str, Any] = field(default_factory=dict)
    estimates: Dict[str, List[Optional[Dict[str, Any]]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sparsities = check_sparsities(self.sparsities)
        self.scores = {layer: list(values) for layer, values in self.scores.items()}
        self.estimates = {layer: list(values) for layer, values in self.estimates.items()}
        for layer, values in self.estimates.items():
            if layer not in self.scores or len(values) != len(self.sparsities):
                raise ValueError(f"estimates for layer {layer!r} do not match the scanned layers and sparsities")
        for layer, values in self.scores.items():
            if len(values) != len(self.sparsities):
                raise ValueError(
                    f"layer {layer!r} has {len(values)} scores for {len(self.sparsities)} sparsities"
                )

    @property
    def layers(self) -> List[str]:
        """The scanned layer names, in order."""
        return list(self.scores)

    @property
    def complete(self) -> bool:
        """True when the baseline and every (layer, sparsity) point are measured."""
        return self.baseline is not None and all(
            value is not None for values in self.scores.values() for value in values
        )

    @property
    def num_done(self) -> int:
        """Number of measured (layer, sparsity) points."""
        return sum(value is not None for values in self.scores.values() for value in values)

    def score(self, layer: str, sparsity: float) -> Optional[float]:
        """The score of ``layer`` pruned to ``sparsity`` (one of :attr:`sparsities`)."""
        if layer not in self.scores:
            raise KeyError(f"layer {layer!r} was not scanned; scanned layers: {', '.join(self.scores)}")
        for index, level in enumerate(self.sparsities):
            if math.isclose(level, sparsity, abs_tol=1e-9):
                return self.scores[layer][index]
        raise KeyError(
            f"sparsity {sparsity:g} was not scanned; scanned levels: "
            f"{', '.join(f'{s:g}' for s in self.sparsities)}"
        )

    def estimate(self, layer: str, index: int) -> Optional[Dict[str, Any]]:
        """The early-stopped estimate of point (``layer``, ``sparsities[index]``), or None when its score is exact."""
        values = self.estimates.get(layer)
        return None if values is None else values[index]

    @property
    def num_estimated(self) -> int:
        """Number of points a settling scan stopped early."""
        return sum(value is not None for values in self.estimates.values() for value in values)

    def plan(self, max_drop: float, relative: bool = False) -> Dict[str, float]:
        """Per-layer sparsity plan for :func:`prunekit.apply_plan`: see :func:`select_sparsity`.

        Args:
            max_drop: the largest acceptable loss versus the dense baseline, in
                score units (e.g. 0.01 = one accuracy point), or a fraction of the
                baseline with ``relative=True``.
            relative: measure the drop relative to ``|baseline|``.

        Raises:
            ValueError: the baseline is not measured yet, or the tolerance is invalid.
        """
        if self.baseline is None:
            raise ValueError("the baseline is not measured yet; finish the scan before planning")
        return select_plan(
            self.scores, self.sparsities, self.baseline, self.higher_is_better, max_drop, relative
        )

    # ------------------------------------------------------------------ text

    def table(
        self, max_drop: Optional[float] = None, relative: bool = False, plan: Optional[Mapping[str, float]] = None
    ) -> str:
        """A plain-text table: one row per layer, one column per sparsity, and the plan if ``max_drop`` is given.

        Scores outside the tolerance are marked with ``*``. The ``plan`` column shows
        ``plan`` when given (the plan actually written, e.g. a joint one), with an
        ``alone`` column for each layer's own level where the two differ; without it,
        each layer's own level.

        Example:
            >>> result = SensitivityResult("accuracy", True, 0.9, (0.5, 0.9), {"conv": [0.9, 0.5]})
            >>> print(result.table(max_drop=0.01, plan={"conv": 0.0}))  # doctest: +NORMALIZE_WHITESPACE
            accuracy (higher is better), dense baseline 0.9000, method fine-grained, one layer pruned at a time
            layer  50%     90%  plan  alone
            conv   0.9000  0.5000*  0%  50%
            * beyond the tolerance; max drop 0.01; plan = the plan written (alone: each layer's own highest level within tolerance)
        """
        direction = "higher" if self.higher_is_better else "lower"
        baseline = _format_score(self.baseline)
        lines = [
            f"{self.metric} ({direction} is better), dense baseline {baseline}, "
            f"method {self.method}, one layer pruned at a time"
        ]
        own = self.plan(max_drop, relative) if max_drop is not None else None
        written = dict(plan) if plan is not None and own is not None else None
        differs = written is not None and any(
            abs(written.get(layer, 0.0) - level) > 1e-12 for layer, level in own.items()  # type: ignore[union-attr]
        )
        plan = written if written is not None else own
        header = ["layer"] + [_percent(s) for s in self.sparsities]
        if plan is not None:
            header.append("plan")
        if differs:
            header.append("alone")
        rows = []
        starred = False
        for layer, values in self.scores.items():
            cells = [layer]
            for index, value in enumerate(values):
                cell = _format_score(value) + ("~" if self.estimate(layer, index) is not None else "")
                if plan is not None and value is not None and self.baseline is not None:
                    bad = not within_tolerance(value, self.baseline, self.higher_is_better, relative,
                                               max_drop)  # type: ignore[arg-type]
                    cell += "*" if bad else " "
                    starred = starred or bad
                cells.append(cell)
            if plan is not None:
                cells.append(_percent(plan.get(layer, 0.0)))
            if differs:
                cells.append(_percent(own[layer]))  # type: ignore[index]
            rows.append(cells)
        lines.extend(line.rstrip() for line in format_table([header] + rows)[0])
        if plan is not None:
            kind = f"{max_drop:g} of the baseline (relative)" if relative else f"{max_drop:g}"
            word = "drop" if self.higher_is_better else "rise"
            star = "* beyond the tolerance; " if starred else "every score within the tolerance; "
            meaning = (
                "plan = the plan written (alone: each layer's own highest level within tolerance)"
                if differs
                else "plan = highest sparsity with it and every lower level within tolerance"
            )
            lines.append(f"{star}max {word} {kind}; {meaning}")
        if self.num_estimated:
            lines.append(f"~ estimated: {self.num_estimated} points stopped once their verdict was settled "
                         f"(confidence {self.meta.get('settle', {}).get('confidence', '?')}); the others used every batch")
        if not self.complete:
            lines.append(f"partial scan: {self.num_done} of {len(self.scores) * len(self.sparsities)} points measured")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    # ------------------------------------------------------------------ files

    def to_dict(self) -> Dict[str, Any]:
        """Plain data (JSON-ready); :meth:`from_dict` reads it back."""
        return {
            "format": _FORMAT,
            "complete": self.complete,
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "method": self.method,
            "baseline": _encode(self.baseline),
            "sparsities": list(self.sparsities),
            "scores": {layer: [_encode(v) for v in values] for layer, values in self.scores.items()},
            "meta": self.meta,
            **({"estimates": self.estimates} if self.estimates else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "scan result") -> "SensitivityResult":
        """Rebuild a result from :meth:`to_dict` output; ValueError naming ``source`` if malformed."""
        if not isinstance(data, Mapping) or data.get("format") != _FORMAT:
            raise ValueError(f"{source} is not a prunekit sensitivity scan (expected format {_FORMAT!r})")
        try:
            scores = data["scores"]
            if not isinstance(scores, Mapping):
                raise ValueError("'scores' must map layer names to lists")
            return cls(
                metric=str(data["metric"]),
                higher_is_better=bool(data["higher_is_better"]),
                baseline=_decode(data.get("baseline"), f"{source} baseline"),
                sparsities=tuple(data["sparsities"]),
                scores={
                    str(layer): [_decode(v, f"{source} layer {layer!r}") for v in values]
                    for layer, values in scores.items()
                },
                method=str(data.get("method", "fine-grained")),
                meta=dict(data.get("meta") or {}),
                estimates=_decode_estimates(data.get("estimates"), source),
            )
        except KeyError as err:
            raise ValueError(f"{source} misses the field {err.args[0]!r}; regenerate it") from None
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source} is malformed ({err}); regenerate it") from None

    def to_json(self, path: Optional[PathLike] = None) -> str:
        """Return the result as JSON text; also write it atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            with atomic_write(path, "w") as handle:
                handle.write(text)
        return text

    @classmethod
    def from_json(cls, source: Union[str, PathLike]) -> "SensitivityResult":
        """Read a result from JSON text or from a file path (a ``str`` starting with ``{`` is text).

        Raises:
            FileNotFoundError: the file does not exist.
            ValueError: the text is not a scan result.
        """
        if isinstance(source, str) and source.lstrip().startswith("{"):
            try:
                data = json.loads(source)
            except (json.JSONDecodeError, RecursionError) as err:
                raise ValueError(f"JSON text is not valid JSON ({type(err).__name__}: {err})") from None
            return cls.from_dict(data, "JSON text")
        path = Path(os.fspath(source))
        if not path.exists():
            raise FileNotFoundError(f"no such scan file: {str(path)!r}")
        return cls.from_dict(read_json(path), repr(str(path)))

    def to_csv(self, path: Optional[PathLike] = None) -> str:
        """CSV text: ``layer``, the dense ``baseline`` (sparsity 0), then one column per sparsity.

        An empty cell is a point not measured yet. Also written atomically to ``path`` when given.

        Example:
            >>> print(SensitivityResult("accuracy", True, 0.9, (0.5,), {"conv": [0.8]}).to_csv())
            layer,baseline,0.5
            conv,0.9,0.8
            <BLANKLINE>
        """
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["layer", "baseline"] + [f"{s:g}" for s in self.sparsities])
        baseline = "" if self.baseline is None else repr(self.baseline)
        for layer, values in self.scores.items():
            writer.writerow([layer, baseline] + ["" if v is None else repr(v) for v in values])
        text = buffer.getvalue()
        if path is not None:
            with atomic_write(path, "w") as handle:
                handle.write(text)
        return text

    def plot(
        self,
        path: PathLike,
        max_drop: Optional[float] = None,
        relative: bool = False,
        title: Optional[str] = None,
        plan: Optional[Mapping[str, float]] = None,
    ) -> Any:
        """Write a PNG grid of per-layer curves with the dense baseline (needs matplotlib); returns the Figure.

        With ``max_drop``, the tolerance band, each layer's planned sparsity and red
        crosses on the points beyond the tolerance are drawn too; ``plan`` (e.g. a
        joint plan) is drawn as solid red lines.
        """
        from prunekit.sensitivity.plot import plot_sensitivity

        return plot_sensitivity(self, path, max_drop=max_drop, relative=relative, title=title, plan=plan)
