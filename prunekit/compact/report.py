"""Parameters and multiply-accumulates of a model before and after :func:`prunekit.compact`."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

from torch import nn

from prunekit.dependency.registry import handler_of
from prunekit.measure.macs import batched_shape, count_macs
from prunekit.tables import format_table

__all__ = ["CompactionReport", "LayerCost", "compaction_report", "layer_costs"]


@dataclass(frozen=True)
class LayerCost:
    """One conv or Linear layer: its input/output channels (features), parameters and MACs per sample."""

    name: str
    in_channels: int
    out_channels: int
    params: int
    macs: int


def layer_costs(model: nn.Module, input_size: Sequence[int]) -> "OrderedDict[str, LayerCost]":
    """Measure each ``Conv2d`` / ``Linear`` of ``model`` on a zero input of ``input_size`` (per sample).

    Counts are dense: every weight counts, zero or not. The model runs once in
    eval mode without gradients and is left in its previous mode.

    Example:
        >>> costs = layer_costs(nn.Sequential(nn.Conv2d(3, 8, 3)), (3, 8, 8))
        >>> costs["0"].macs
        7776
    """
    shape = batched_shape(input_size, dims=4)
    macs = count_macs(model, shape)  # prunekit's one MAC counter: every call counts
    costs: "OrderedDict[str, LayerCost]" = OrderedDict()
    for name, module in model.named_modules():
        if name not in macs:
            continue
        channels = handler_of(module).channels(module)
        params = sum(p.numel() for p in module.parameters(recurse=False))
        costs[name] = LayerCost(name, channels[0], channels[1], params, macs[name][0])
    return costs


@dataclass(frozen=True)
class CompactionReport:
    """Parameters and MACs per sample of each layer, before and after compaction.

    ``str(report)`` is a table; :meth:`to_dict` is JSON-ready.
    """

    input_size: Tuple[int, ...]
    before: "OrderedDict[str, LayerCost]"
    after: "OrderedDict[str, LayerCost]"
    params_before: int
    params_after: int

    @property
    def macs_before(self) -> int:
        """Total multiply-accumulates per sample of the conv and Linear layers before compaction."""
        return sum(c.macs for c in self.before.values())

    @property
    def macs_after(self) -> int:
        """Total multiply-accumulates per sample after compaction."""
        return sum(c.macs for c in self.after.values())

    @property
    def macs_ratio(self) -> float:
        """How many times fewer MACs the compacted model does."""
        return self.macs_before / max(self.macs_after, 1)

    @property
    def params_ratio(self) -> float:
        """How many times fewer parameters the compacted model has."""
        return self.params_before / max(self.params_after, 1)

    def to_dict(self) -> Dict[str, Any]:
        """The report as plain Python data."""
        layers: List[Dict[str, Any]] = []
        for name, before in self.before.items():
            after = self.after.get(name)
            layers.append(
                {
                    "layer": name,
                    "out_channels_before": before.out_channels,
                    "out_channels_after": after.out_channels if after else None,
                    "params_before": before.params,
                    "params_after": after.params if after else None,
                    "macs_before": before.macs,
                    "macs_after": after.macs if after else None,
                }
            )
        return {
            "input_size": list(self.input_size),
            "layers": layers,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "params_ratio": self.params_ratio,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "macs_ratio": self.macs_ratio,
        }

    def __str__(self) -> str:
        header = ("layer", "in,out channels", "params before", "params after", "MACs before", "MACs after")
        rows = [header]
        for name, before in self.before.items():
            after = self.after.get(name)
            rows.append(
                (
                    name,
                    f"{before.in_channels},{before.out_channels} -> "
                    + (f"{after.in_channels},{after.out_channels}" if after else "?"),
                    f"{before.params:,}",
                    f"{after.params:,}" if after else "?",
                    f"{before.macs:,}",
                    f"{after.macs:,}" if after else "?",
                )
            )
        rows.append(
            (
                "total",
                "",
                f"{self.params_before:,}",
                f"{self.params_after:,}",
                f"{self.macs_before:,}",
                f"{self.macs_after:,}",
            )
        )
        lines, rule = format_table(rows)
        lines.insert(1, rule)
        lines.append(
            f"params {self.params_ratio:.2f}x fewer, MACs {self.macs_ratio:.2f}x fewer "
            f"(input {tuple(self.input_size)}, per sample)"
        )
        return "\n".join(lines)


def compaction_report(before: nn.Module, after: nn.Module, input_size: Sequence[int]) -> CompactionReport:
    """Compare a model with its :func:`prunekit.compact` result: parameters and MACs per layer and in total.

    Args:
        before: the model given to ``compact`` (masked or not; all weights count).
        after: the compacted model.
        input_size: ``(C, H, W)`` or ``(N, C, H, W)``; MACs are per sample.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> compaction_report(model, model, (3, 16, 16)).macs_ratio
        1.0
    """
    shape = batched_shape(input_size, dims=4)
    return CompactionReport(
        input_size=shape[1:],
        before=layer_costs(before, shape),
        after=layer_costs(after, shape),
        params_before=sum(p.numel() for p in before.parameters()),
        params_after=sum(p.numel() for p in after.parameters()),
    )
