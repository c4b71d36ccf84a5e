"""Sparsity report: parameters, zeros and multiply-accumulates per layer and in total."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from prunekit.measure.macs import count_macs
from prunekit.tables import format_table

__all__ = ["LayerSparsity", "SparsityReport", "count_macs", "sparsity_report"]

_MIB = 1024.0 * 1024.0


@dataclass(frozen=True)
class LayerSparsity:
    """One conv or linear layer: weight and bias counts, and MACs for one input when measured.

    ``params``/``zeros`` count the weight and the bias (what the layer stores);
    ``sparsity`` is the weight's alone, the quantity a plan sets (a plan of 0.7
    reads 70.0 %, not the 69.5 % that counting the dense bias would give).
    """

    name: str
    kind: str
    params: int
    zeros: int
    macs: Optional[int] = None
    effective_macs: Optional[int] = None
    weights: int = 0
    weight_zeros: int = 0

    @property
    def nonzeros(self) -> int:
        return self.params - self.zeros

    @property
    def sparsity(self) -> float:
        """Fraction of the weight's entries that are zero (biases not counted)."""
        return self.weight_zeros / self.weights if self.weights else 0.0


@dataclass(frozen=True)
class SparsityReport:
    """What pruning bought: per-layer and total zeros, sizes and MACs.

    ``total_params``/``total_zeros`` cover every parameter of the model
    (BatchNorm included); the sizes assume each parameter is stored at its
    dtype, the non-zero size counts the non-zero values alone.
    """

    layers: List[LayerSparsity]
    total_params: int
    total_zeros: int
    dense_bytes: int
    nonzero_bytes: int
    input_size: Optional[Sequence[int]] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def total_nonzeros(self) -> int:
        return self.total_params - self.total_zeros

    @property
    def sparsity(self) -> float:
        return self.total_zeros / self.total_params if self.total_params else 0.0

    @property
    def compression(self) -> float:
        """Dense parameters per non-zero parameter (the "6.64x" of a counting report)."""
        return self.total_params / self.total_nonzeros if self.total_nonzeros else float("inf")

    @property
    def macs(self) -> Optional[int]:
        return None if self.input_size is None else sum(layer.macs or 0 for layer in self.layers)

    @property
    def effective_macs(self) -> Optional[int]:
        return None if self.input_size is None else sum(layer.effective_macs or 0 for layer in self.layers)

    def to_dict(self) -> Dict[str, Any]:
        """Plain data for JSON: every layer plus the totals."""
        layers = [dict(asdict(layer), sparsity=layer.sparsity, nonzeros=layer.nonzeros) for layer in self.layers]
        return {
            "layers": layers,
            "total_params": self.total_params,
            "total_zeros": self.total_zeros,
            "total_nonzeros": self.total_nonzeros,
            "sparsity": self.sparsity,
            "compression": self.compression,
            "dense_mib": self.dense_bytes / _MIB,
            "nonzero_mib": self.nonzero_bytes / _MIB,
            "input_size": list(self.input_size) if self.input_size is not None else None,
            "macs": self.macs,
            "effective_macs": self.effective_macs,
        }

    def __str__(self) -> str:
        with_macs = self.input_size is not None
        header = ["layer", "kind", "params", "zeros", "weight sparsity"] + (["MACs", "eff. MACs"] if with_macs else [])
        rows = [
            [layer.name, layer.kind, f"{layer.params:,}", f"{layer.zeros:,}", f"{layer.sparsity:.1%}"]
            + ([_macs(layer.macs), _macs(layer.effective_macs)] if with_macs else [])
            for layer in self.layers
        ]
        rows.append(
            ["total (all params)", "", f"{self.total_params:,}", f"{self.total_zeros:,}", f"{self.sparsity:.1%}"]
            + ([_macs(self.macs), _macs(self.effective_macs)] if with_macs else [])
        )
        lines, rule = format_table([header] + rows, left=2)
        lines.insert(1, rule)
        lines.insert(len(lines) - 1, rule)
        lines.append(
            f"size: {self.dense_bytes / _MIB:.2f} MiB dense, {self.nonzero_bytes / _MIB:.2f} MiB of non-zeros "
            f"({self.compression:.2f}x fewer parameters)"
        )
        if with_macs and self.effective_macs:
            lines.append(
                f"MACs per input of size {'x'.join(map(str, self.input_size))}: {_macs(self.macs)} dense, "
                f"{_macs(self.effective_macs)} on non-zero weights ({self.macs / self.effective_macs:.2f}x)"
            )
        return "\n".join(lines)


def _macs(value: Optional[int]) -> str:
    if value is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return str(value)


def _count(module: nn.Module) -> Dict[str, int]:
    # module.weight is the masked tensor when the module is pruned, so the
    # zeros of masks and of finalized weights are counted alike.
    counts = {"params": 0, "zeros": 0, "weights": 0, "weight_zeros": 0}
    for name in ("weight", "bias"):
        tensor = getattr(module, name, None)
        if isinstance(tensor, torch.Tensor):
            zeros = int((tensor == 0).sum())
            counts["params"] += tensor.numel()
            counts["zeros"] += zeros
            if name == "weight":
                counts["weights"], counts["weight_zeros"] = tensor.numel(), zeros
    return counts


def sparsity_report(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> SparsityReport:
    """Count parameters, zeros and (with ``input_size``) MACs of every conv and linear layer.

    Args:
        model: a dense, pruned (masked) or finalized model.
        input_size: one input's shape without the batch dimension, e.g. ``(3, 224, 224)``;
            MACs are then measured by one forward pass of zeros (the model is not changed).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
        >>> report = sparsity_report(model, input_size=(3, 8, 8))
        >>> report.layers[0].macs
        7776
        >>> from prunekit.plans import apply_plan
        >>> sparsity_report(apply_plan(model, {"0": 0.75})).layers[0].sparsity  # the weight's, bias not counted
        0.75
    """
    if input_size is not None:
        input_size = tuple(int(size) for size in input_size)
        if not input_size or any(size <= 0 for size in input_size):
            raise ValueError(f"input_size={input_size} must be positive sizes without the batch, e.g. (3, 224, 224)")
    layers = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
    }
    macs = count_macs(model, input_size, layers) if input_size is not None else {}
    rows = []
    for name, module in layers.items():
        dense, effective = macs.get(name, (None, None))
        rows.append(LayerSparsity(name, type(module).__name__, macs=dense, effective_macs=effective, **_count(module)))
    total_params = total_zeros = dense_bytes = nonzero_bytes = 0
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            # A pruned tensor is stored as <name>_orig; count its masked version.
            tensor = getattr(module, name[: -len("_orig")]) if name.endswith("_orig") else param
            nonzero = int((tensor != 0).sum())
            total_params += tensor.numel()
            total_zeros += tensor.numel() - nonzero
            dense_bytes += tensor.numel() * tensor.element_size()
            nonzero_bytes += nonzero * tensor.element_size()
    return SparsityReport(rows, total_params, total_zeros, dense_bytes, nonzero_bytes, input_size)
