"""A channel plan's latency on this machine, from each layer timed at the widths plans give it, not guessed from MACs.

MACs predict CPU time poorly: a conv's time does not fall in proportion with its channels
(memory traffic, the kernels' blocking), and the BatchNorms, activations and adds between
the convs cost time but no MACs. So each conv / Linear whose channels a plan can remove is
timed alone, at the input shape it sees in the model, on a grid of kept input and kept
output channels (:data:`GRID`, fractions of its dense widths); a plan's latency is each
layer's time at its kept widths (interpolated on the grid), plus the rest of the model (the
dense model's measured time less its layers' time), which is taken to shrink with the
activations the layers emit. At the dense widths the prediction is the dense model's
measured time; :func:`~prunekit.planning.budget.fit_budget` times the compacted model
too, and corrects the target by what it measured.

Timings depend on the machine, the threads, the device, the batch and torch, and not on
the weights: each layer's grid is cached on disk (:func:`cache_folder`) keyed by all of
those and by the layer's shape, so a second scan of the same model (or of another with
the same layers) measures only its dense time.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3))
    >>> latency = measure_latency(model, (3, 24, 24), {"0": (False, True), "2": (True, False)},
    ...                           repeats=2, progress=False, cache=False)
    >>> latency.tables["0"].inputs, latency.tables["0"].outputs  # conv 0's grid: its output widths timed
    ((3,), (2, 4, 8, 12, 16))
    >>> latency.layer_seconds("0", 3, 10) > 0  # between grid points: interpolated
    True
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

import torch
from torch import nn

from prunekit._rollback import eval_mode
from prunekit.io.files import read_json, write_json
from prunekit.measure.timing import latency_samples
from prunekit.progress import progress_bar

__all__ = ["GRID", "LatencyModel", "LayerTiming", "cache_folder", "measure_latency", "time_widths", "timing_setting"]

#: Fractions of a layer's dense widths it is timed at (each axis a plan can narrow).
GRID = (0.125, 0.25, 0.5, 0.75, 1.0)
_FORMAT = 1  # the cache file's layout; another value is measured again


def cache_folder() -> Path:
    """Where latency tables are kept: ``$PRUNEKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/prunekit``, else ``~/.cache/prunekit``."""
    explicit = os.environ.get("PRUNEKIT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "prunekit"


def _processor() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timing_setting(device: torch.device, batch: int = 1, dtype: torch.dtype = torch.float32) -> Dict[str, Any]:
    """What a timing depends on besides the layer: machine, device, threads, batch, dtype, torch version."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else _processor()
    return {"format": _FORMAT, "device": device.type, "hardware": where, "threads": torch.get_num_threads(),
            "batch": int(batch), "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__}


@dataclass(frozen=True)
class LayerTiming:
    """One layer's seconds per forward on a grid of kept ``inputs`` x kept ``outputs`` channels (ascending counts)."""

    inputs: Tuple[int, ...]
    outputs: Tuple[int, ...]
    seconds: Tuple[Tuple[float, ...], ...]

    def at(self, kept_in: float, kept_out: float) -> float:
        """The time at ``kept_in`` x ``kept_out`` channels: bilinear between grid points, clamped to the grid's ends."""
        (i0, i1, a) = _bracket(self.inputs, kept_in)
        (o0, o1, b) = _bracket(self.outputs, kept_out)
        row0 = self.seconds[i0][o0] * (1 - b) + self.seconds[i0][o1] * b
        row1 = self.seconds[i1][o0] * (1 - b) + self.seconds[i1][o1] * b
        return row0 * (1 - a) + row1 * a

    def to_dict(self) -> Dict[str, Any]:
        return {"inputs": list(self.inputs), "outputs": list(self.outputs), "seconds": [list(r) for r in self.seconds]}

    @classmethod
    def from_dict(cls, entry: Any) -> "LayerTiming":
        """Read a cached entry back; ValueError when it is not a well-formed grid (it is then measured again)."""
        if not isinstance(entry, dict):
            raise ValueError("not an object")
        inputs, outputs, seconds = entry.get("inputs"), entry.get("outputs"), entry.get("seconds")
        if not (isinstance(inputs, list) and isinstance(outputs, list) and isinstance(seconds, list)
                and inputs and outputs and len(seconds) == len(inputs)
                and all(isinstance(row, list) and len(row) == len(outputs) for row in seconds)):
            raise ValueError("not a grid")
        values = [float(v) for row in seconds for v in row]
        if any(not (v >= 0 and v < float("inf")) for v in values):
            raise ValueError("not a time")
        counts = [int(v) for v in inputs + outputs]
        if any(c < 1 for c in counts):
            raise ValueError("not a channel count")
        return cls(tuple(int(v) for v in inputs), tuple(int(v) for v in outputs),
                   tuple(tuple(float(v) for v in row) for row in seconds))


def _bracket(points: Sequence[int], value: float) -> Tuple[int, int, float]:
    if value <= points[0] or len(points) == 1:
        return 0, 0, 0.0
    for k in range(1, len(points)):
        if value <= points[k]:
            return k - 1, k, (value - points[k - 1]) / (points[k] - points[k - 1])
    return len(points) - 1, len(points) - 1, 0.0


@dataclass
class LatencyModel:
    """Predicted seconds per forward of the model a channel plan builds (see the module docstring).

    Attributes:
        dense_seconds: the dense model's measured time per forward.
        setting: what the timings depend on (:func:`timing_setting`) and the input size.
        tables: per layer name, its :class:`LayerTiming`.
        scale: multiplies every layer's time (1, unless the layers timed alone add up to more than the model).
        rest_per_element: seconds of the rest of the model per output element of a timed layer.
        elements_per_channel: per layer, its output elements per output channel (the spatial size).
    """

    dense_seconds: float
    setting: Dict[str, Any]
    tables: Dict[str, LayerTiming]
    scale: float
    rest_per_element: float
    elements_per_channel: Dict[str, float]

    def layer_seconds(self, name: str, kept_in: float, kept_out: float) -> float:
        """Seconds that layer ``name`` accounts for at ``kept_in`` x ``kept_out`` channels (its share of the rest included)."""
        table = self.tables.get(name)
        if table is None:
            return 0.0  # not called by the model's forward
        return (self.scale * table.at(kept_in, kept_out)
                + self.rest_per_element * kept_out * self.elements_per_channel[name])

    def describe(self) -> str:
        """E.g. "1 thread(s), batch 1, cpu (Intel ...), 3x224x224"."""
        s = self.setting
        size = "x".join(str(v) for v in s.get("input_size", ()))
        return f"{s['threads']} thread(s), batch {s['batch']}, {s['device']} ({s['hardware']}), {size}"


class _Layer:
    """A conv / Linear to time: its module, the input it sees, and which widths a plan can narrow."""

    def __init__(self, module: nn.Module, shape: Tuple[int, ...], out_shape: Tuple[int, ...], narrow: Tuple[bool, bool]):
        self.module, self.shape, self.narrow = module, shape, narrow
        linear = isinstance(module, nn.Linear)
        self.channel_axis = len(shape) - 1 if linear else 1
        self.dense_in = int(shape[self.channel_axis])
        self.dense_out = int(out_shape[len(out_shape) - 1 if linear else 1])
        self.elements_per_channel = float(torch.Size(out_shape).numel()) / max(self.dense_out, 1)
        groups = int(getattr(module, "groups", 1))
        # depthwise: each group reads one channel, so its kept inputs are its kept outputs' groups
        self.depthwise = groups > 1 and groups == self.dense_in
        self.groups = groups

    def key(self) -> str:
        m = self.module
        parts = [type(m).__name__, f"in={self.dense_in}", f"out={self.dense_out}", f"shape={list(self.shape)}",
                 f"narrow={list(self.narrow)}", f"grid={list(GRID)}", f"bias={getattr(m, 'bias', None) is not None}"]
        for attr in ("kernel_size", "stride", "padding", "dilation", "groups", "output_padding", "padding_mode"):
            if hasattr(m, attr):
                parts.append(f"{attr}={getattr(m, attr)}")
        return "|".join(parts)

    def counts(self, dense: int, narrow: bool, multiple: int = 1) -> Tuple[int, ...]:
        if not narrow:
            return (dense,)
        return tuple(sorted({min(dense, max(multiple, int(round(f * dense / multiple)) * multiple)) for f in GRID}))

    def replica(self, kept_in: int, kept_out: int) -> nn.Module:
        m = self.module
        parameter = m.weight
        if isinstance(m, nn.Linear):
            made: nn.Module = nn.Linear(kept_in, kept_out, bias=m.bias is not None)
        else:
            kwargs = dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
                          bias=m.bias is not None, padding_mode=m.padding_mode)
            groups = kept_in if self.depthwise else self.groups
            if isinstance(m, nn.modules.conv._ConvTransposeNd):
                kwargs["output_padding"] = m.output_padding
            made = type(m)(kept_in, kept_out, groups=groups, **kwargs)
        return made.to(device=parameter.device, dtype=parameter.dtype)

    def grid(self) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        if self.depthwise:
            multiplier = max(self.dense_out // max(self.dense_in, 1), 1)
            outs = self.counts(self.dense_out, self.narrow[1] or self.narrow[0], multiplier)
            return tuple(max(o // multiplier, 1) for o in outs), outs
        multiple = self.groups
        return (self.counts(self.dense_in, self.narrow[0], multiple), self.counts(self.dense_out, self.narrow[1], multiple))

    def measure(self, repeats: int) -> LayerTiming:
        inputs, outputs = self.grid()
        parameter = self.module.weight
        rows: List[Tuple[float, ...]] = []
        for k, kept_in in enumerate(inputs):
            shape = list(self.shape)
            shape[self.channel_axis] = kept_in
            example = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(parameter.device, parameter.dtype)
            # depthwise: the kept inputs are the kept outputs' (one width each); the row holds that one time
            widths = (outputs[k],) if self.depthwise else outputs
            models = {str(kept_out): self.replica(kept_in, kept_out) for kept_out in widths}
            medians = {key: statistics.median(values)
                       for key, values in latency_samples(models, example, repeats=repeats, warmup=1).items()}
            rows.append(tuple(medians[str(outputs[k] if self.depthwise else kept_out)] for kept_out in outputs))
        return LayerTiming(tuple(inputs), tuple(outputs), tuple(rows))


class _OwnInput(nn.Module):
    """A layer replica that runs on its own input (so replicas of different input widths are timed in one interleaved run)."""

    def __init__(self, layer: nn.Module, example: torch.Tensor) -> None:
        super().__init__()
        self.layer, self.example = layer, example

    def forward(self, _: Any) -> torch.Tensor:
        return self.layer(self.example)


def time_widths(
    model: nn.Module,
    input_size: Sequence[int],
    widths: Mapping[str, Sequence[Tuple[int, int]]],
    *,
    batch: int = 1,
    repeats: int = 9,
) -> Dict[str, Dict[Tuple[int, int], float]]:
    """Seconds per forward of each named conv / Linear at exact ``(kept inputs, kept outputs)`` widths, timed here.

    Where :func:`measure_latency` times a coarse grid once (cached) to predict any plan,
    this times the few exact widths a decision needs: a layer's widths are timed in one
    interleaved run (each on an input of its width, at the shape the layer sees in
    ``model`` on a ``batch`` of ``input_size``), and each time is the median of ``repeats``
    rounds. Nothing is cached: the widths are the plan's own. The model is not changed.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3))
        >>> times = time_widths(model, (3, 24, 24), {"2": [(16, 8), (9, 8)]}, repeats=2)
        >>> sorted(times["2"]), all(t > 0 for t in times["2"].values())
        ([(9, 8), (16, 8)], True)
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    parameter = next(model.parameters())
    example, shapes = _example_and_shapes(model, input_size, list(widths), batch)
    layers = dict(model.named_modules())
    unknown = sorted(name for name in widths if name not in shapes or not isinstance(
        layers[name], (nn.Linear, nn.modules.conv._ConvNd)))
    if unknown:
        raise ValueError(f"{unknown} are not convs / Linears that the model calls on a {tuple(input_size)} input; "
                         "pass the names of layers its forward runs")
    times: Dict[str, Dict[Tuple[int, int], float]] = {}
    for name, pairs in widths.items():
        layer = _Layer(model.get_submodule(name), shapes[name][0], shapes[name][1], (True, True))
        replicas: Dict[str, nn.Module] = {}
        for kept_in, kept_out in dict.fromkeys((int(i), int(o)) for i, o in pairs):
            if not (1 <= kept_in <= layer.dense_in and 1 <= kept_out <= layer.dense_out):
                raise ValueError(f"widths ({kept_in}, {kept_out}) of {name!r} are not within its dense widths "
                                 f"({layer.dense_in}, {layer.dense_out})")
            shape = list(layer.shape)
            shape[layer.channel_axis] = kept_in
            own = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(parameter.device, parameter.dtype)
            replicas[f"{kept_in}x{kept_out}"] = _OwnInput(layer.replica(kept_in, kept_out), own)
        samples = latency_samples(replicas, example[:0], repeats=repeats, warmup=1)
        times[name] = {tuple(int(v) for v in key.split("x")): statistics.median(values)  # type: ignore[misc]
                       for key, values in samples.items()}
    return times


def _example_and_shapes(model: nn.Module, input_size: Sequence[int], names: Sequence[str], batch: int
                        ) -> Tuple[torch.Tensor, Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]]]:
    """A seeded ``batch`` of ``input_size`` on the model's device and dtype, and each named layer's shapes on it
    (the model in eval mode meanwhile)."""
    parameter = next(model.parameters())
    example = torch.randn((batch, *input_size), generator=torch.Generator().manual_seed(0)).to(
        parameter.device, parameter.dtype)
    with eval_mode(model):
        return example, _shapes(model, names, example)


def _shapes(model: nn.Module, names: Sequence[str], example: torch.Tensor) -> Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]]:
    """The input and output shape of each named layer on ``example`` (its first call)."""
    seen: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = {}
    handles = []
    for name in names:
        def hook(module: nn.Module, inputs: tuple, output: Any, name: str = name) -> None:
            if name not in seen and inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
                seen[name] = (tuple(inputs[0].shape), tuple(output.shape))
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _cache_file(folder: Path, setting: Mapping[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(dict(setting), sort_keys=True).encode()).hexdigest()[:16]
    return folder / f"latency-{digest}.json"


def _read_cache(path: Path, setting: Mapping[str, Any]) -> Dict[str, Any]:
    """The cached grids for ``setting`` (an unreadable or foreign file is ignored: measured again)."""
    try:
        document = read_json(path)
    except (OSError, ValueError):
        return {}
    if not isinstance(document, dict) or document.get("setting") != dict(setting) or not isinstance(
            document.get("layers"), dict):
        return {}
    return document["layers"]


def measure_latency(
    model: nn.Module,
    input_size: Sequence[int],
    layers: Mapping[str, Tuple[bool, bool]],
    *,
    batch: int = 1,
    repeats: int = 5,
    dense_repeats: int = 15,
    progress: bool = True,
    cache: Union[bool, str, Path] = True,
) -> LatencyModel:
    """Time ``model`` and its ``layers`` on this machine (see the module docstring); the model is not changed.

    Args:
        model: the dense model, on the device it will run on.
        input_size: one input's shape without the batch, e.g. ``(3, 224, 224)``.
        layers: per conv / Linear name, ``(inputs, outputs)``: whether a plan can narrow its
            input channels and its output channels. Layers the model does not call are left out.
        batch: the batch the model is timed at.
        repeats: timed rounds per grid point (their median); ``dense_repeats`` for the whole model.
        progress: show a bar while layers are timed.
        cache: True for :func:`cache_folder`, a folder, or False to time every layer afresh.
    """
    if repeats < 1 or dense_repeats < 1:
        raise ValueError(f"repeats={repeats} and dense_repeats={dense_repeats} must be >= 1")
    parameter = next(model.parameters())
    example, shapes = _example_and_shapes(model, input_size, list(layers), batch)
    setting = dict(timing_setting(parameter.device, batch, parameter.dtype))
    timed = {name: _Layer(model.get_submodule(name), shapes[name][0], shapes[name][1], tuple(narrow))
             for name, narrow in layers.items() if name in shapes}
    folder = None if cache is False else (cache_folder() if cache is True else Path(cache))
    path = None if folder is None else _cache_file(folder, setting)
    stored = {} if path is None else dict(_read_cache(path, setting))
    tables: Dict[str, LayerTiming] = {}
    missing: Dict[str, List[str]] = {}
    for name, layer in timed.items():
        key = layer.key()
        try:
            tables[name] = LayerTiming.from_dict(stored[key])
        except (KeyError, ValueError, TypeError):
            missing.setdefault(key, []).append(name)
    with progress_bar(len(missing), "timing layers on this machine", progress) as tick:
        for key, names in missing.items():
            timing = timed[names[0]].measure(repeats)
            stored[key] = timing.to_dict()
            for name in names:
                tables[name] = timing
            tick(names[0])
    if path is not None and missing:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, {"setting": setting, "layers": stored})
        except OSError:
            pass  # a read-only home: the timings are still used, only not kept
    dense = statistics.median(latency_samples({"dense": model}, example, repeats=dense_repeats, warmup=2)["dense"])
    layer_sum = sum(tables[name].at(layer.dense_in, layer.dense_out) for name, layer in timed.items())
    scale, rest = (1.0, dense - layer_sum) if dense >= layer_sum else (dense / layer_sum, 0.0)
    elements = sum(layer.dense_out * layer.elements_per_channel for layer in timed.values())
    return LatencyModel(
        dense_seconds=float(dense), setting={**setting, "input_size": list(input_size)}, tables=tables, scale=scale,
        rest_per_element=rest / elements if elements else 0.0,
        elements_per_channel={name: layer.elements_per_channel for name, layer in timed.items()},
    )
