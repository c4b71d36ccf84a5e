"""What a plan costs, counted on the model ``compact`` will build from it, without building it.

A channel plan removes units of channel groups; ``compact`` then drops those channels from
every member, and from every layer that reads them (the next conv's input channels, a
BatchNorm's features), so a conv's cost falls with its own kept outputs times its kept inputs.
:class:`ChannelCosts` counts exactly that per layer, from the channel flow (which input of
which layer is which unit) and the method's own masks at each level (which units a level
removes); a unit that ``compact`` keeps (it reaches the model's output, or meets an op
prunekit does not follow) costs what it cost dense. MACs are per sample, counted as
:func:`prunekit.measure.macs.count_macs` counts them (every Conv2d and Linear call), params
are every parameter of the model.

A fine-grained plan (:class:`WeightCosts`) makes nothing smaller: ``compact`` leaves its
zeros where they are. Its costs count the non-zero weights, which is what it costs only on
hardware that skips zeros (sparse kernels); on dense hardware it costs what the dense model
costs (:attr:`PlanCosts.dense_hardware` says which).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from prunekit.methods.registry import get_method
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> method = get_method("filter-norm")
    >>> costs = plan_costs(model, method, ["0"], (3, 16, 16))
    >>> costs.dense.macs, costs.of({"0": 0.5}).macs
    (83808, 41904)
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from prunekit.dependency.flow import trace_channel_flow
from prunekit.dependency.registry import handler_of
from prunekit.layers import channel_weight
from prunekit.measure.macs import count_macs
from prunekit.methods.base import PruningMethod
from prunekit.methods.registry import get_method

__all__ = ["ChannelCosts", "Cost", "PlanCosts", "Tally", "WeightCosts", "measured_costs", "nonzero_costs", "plan_costs", "scanned_weights"]


@dataclass(frozen=True)
class Cost:
    """Parameters and multiply-accumulates per sample of a model; ``seconds`` per forward where a latency model timed it."""

    params: int
    macs: int
    seconds: Optional[float] = None

    def fraction_of(self, dense: "Cost") -> Tuple[float, float]:
        """``(params, macs)`` as fractions of ``dense``'s."""
        return self.params / max(dense.params, 1), self.macs / max(dense.macs, 1)


class PlanCosts(abc.ABC):
    """The cost of a plan (``{block: sparsity}``) of one method on one model and input size.

    Attributes:
        dense: the unpruned model's cost.
        blocks: the method's blocks the plans name (what it masks per plan entry).
        dense_hardware: whether the counts hold on dense hardware (channel plans: ``compact``
            builds the smaller model); False for fine-grained plans, whose counts hold only
            where zeros are skipped.
    """

    dense: Cost
    blocks: Dict[str, Any]
    dense_hardware: bool = True

    @abc.abstractmethod
    def of(self, plan: Mapping[str, float]) -> Cost:
        """The cost of the model with ``plan`` applied (blocks it leaves out stay dense)."""

    def tally(self, plan: Mapping[str, float]) -> "Tally":
        """``plan``'s cost, to change one level at a time (:class:`Tally`)."""
        return Tally(self, plan)


def plan_costs(
    model: nn.Module, method: PruningMethod, blocks: Sequence[str], input_size: Sequence[int],
) -> PlanCosts:
    """The cost model for ``method``'s plans over ``blocks`` of ``model`` at ``input_size`` (``(C, H, W)``).

    ``method`` is prepared (it owns its scores' data): the units a level removes are the
    ones its masks remove. The model is not changed.
    """
    if method.unit == "channels":
        return ChannelCosts(model, method, blocks, input_size)
    return WeightCosts(model, method, blocks, input_size)


def _parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class WeightCosts(PlanCosts):
    """Fine-grained plans: a layer at sparsity ``s`` keeps ``1 - s`` of its weights and of their MACs."""

    dense_hardware = False

    def __init__(self, model: nn.Module, method: PruningMethod, blocks: Sequence[str], input_size: Sequence[int]):
        macs = count_macs(model, input_size)
        self.blocks = method.blocks(model, list(blocks))
        self._weights: Dict[str, int] = {}
        self._macs: Dict[str, int] = {}
        for key, block in self.blocks.items():
            names = method.block_layers(block)
            self._weights[key] = sum(int(model.get_submodule(n).weight.numel()) for n in names)
            self._macs[key] = sum(macs.get(n, (0, 0))[0] for n in names)
        self.dense = Cost(_parameter_count(model), sum(dense for dense, _ in macs.values()))

    def of(self, plan: Mapping[str, float]) -> Cost:
        params, total = self.dense.params, self.dense.macs
        for key, level in plan.items():
            if key in self._weights and level > 0:
                params -= round(level * self._weights[key])
                total -= round(level * self._macs[key])
        return Cost(int(params), int(total))


@dataclass
class _Layer:
    """One conv / Linear: unit index per output and per input channel (-1: never removed), conv groups, sizes."""

    out_units: np.ndarray
    in_units: np.ndarray
    groups: int
    params_per_pair: float
    macs_per_pair: float
    bias: int


class ChannelCosts(PlanCosts):
    """Channel plans: the cost of what ``compact`` builds (see the module docstring)."""

    def __init__(self, model: nn.Module, method: PruningMethod, blocks: Sequence[str], input_size: Sequence[int]):
        self.method = method
        flow = trace_channel_flow(model)
        macs = count_macs(model, input_size)
        roots: Dict[int, int] = {}  # unit root -> index, for the units compact can remove

        def index(channel_id: int) -> int:
            root = flow.find(channel_id)
            if flow.reasons(root):
                return -1
            return roots.setdefault(root, len(roots))

        self._layers: List[_Layer] = []
        self._layer_names: List[str] = []
        self.latency: Any = None  # a LatencyModel once timed(): costs count seconds too
        counted = 0
        modules = dict(model.named_modules())
        for name, module in modules.items():
            if name not in flow.producers or not isinstance(getattr(module, "weight", None), torch.Tensor):
                continue  # (an attention's heads: no channel method removes them; its parameters count as fixed)
            out_units = np.array([index(i) for i in flow.producers[name]], dtype=np.int64)
            consumer = flow.consumers.get(name)
            inputs, _ = handler_of(module).channels(module)
            if consumer is not None and consumer.ids and inputs % len(consumer.ids) == 0:
                # a Linear after a flatten reads each channel as a block of features, channel-major
                in_units = np.repeat(np.array([index(i) for i in consumer.ids], dtype=np.int64),
                                     inputs // len(consumer.ids))
            else:
                in_units = np.full(inputs, -1, np.int64)
            groups = int(getattr(module, "groups", 1))
            pairs = len(out_units) * len(in_units) / groups
            bias = getattr(module, "bias", None)
            weight = module.weight
            dense_macs = macs.get(name, (0, 0))[0]
            counted += weight.numel() + (bias.numel() if bias is not None else 0)
            self._layer_names.append(name)
            self._layers.append(_Layer(out_units, in_units, groups, weight.numel() / pairs, dense_macs / pairs,
                                       0 if bias is None else 1))
        self._per_channel: List[Tuple[np.ndarray, int]] = []
        for name, ids in flow.per_channel.items():
            module = modules[name]
            size = sum(p.numel() for p in module.parameters(recurse=False))
            if size % max(len(ids), 1):
                continue  # not one value per channel: counted as fixed
            counted += size
            self._per_channel.append((np.array([index(i) for i in ids], dtype=np.int64), size // len(ids)))
        self._fixed_params = _parameter_count(model) - counted
        self._unit_count = len(roots)
        self._roots = roots
        self._flow = flow
        self._model = model
        self.blocks = method.blocks(model, list(blocks))
        self._scores = method.scores(model, self.blocks)
        self._names = {id(module): name for name, module in modules.items()}
        self._removed: Dict[Tuple[str, float], np.ndarray] = {}
        self._unit_readers: "List[List[int]] | None" = None
        self.dense = self._cost(np.ones(self._unit_count + 1, dtype=bool))

    def narrowable(self) -> Dict[str, Tuple[bool, bool]]:
        """Per conv / Linear: whether plans can narrow its inputs and its outputs (what a latency model times)."""
        return {name: (bool((layer.in_units >= 0).any()), bool((layer.out_units >= 0).any()))
                for name, layer in zip(self._layer_names, self._layers)}

    def layer_widths(self, plan: Mapping[str, float]) -> Dict[str, Tuple[int, int]]:
        """Per conv / Linear: its ``(kept inputs, kept outputs)`` in the model ``compact`` builds from ``plan``."""
        alive = self.alive(plan)
        return {name: (int(alive[layer.in_units].sum()), int(alive[layer.out_units].sum()))
                for name, layer in zip(self._layer_names, self._layers)}

    def timed(self, latency: Any) -> "ChannelCosts":
        """Count seconds too, from ``latency`` (a :class:`~prunekit.planning.latency.LatencyModel` of this model)."""
        self.latency = latency
        self.dense = self._cost(np.ones(self._unit_count + 1, dtype=bool))
        return self

    # ------------------------------------------------------------------ which units a level removes

    def removed_units(self, block: str, level: float) -> np.ndarray:
        """Indices of the units compact removes when ``block`` is at ``level`` (the method's own masks)."""
        key = (block, round(float(level), 12))
        if key not in self._removed:
            self._removed[key] = self._units_at(block, float(level))
        return self._removed[key]

    def _units_at(self, block: str, level: float) -> np.ndarray:
        if level <= 0:
            return np.zeros(0, dtype=np.int64)
        scores = None if self._scores is None else self._scores.get(block)
        masks = self.method.mask_maker(self.blocks[block], scores)(level)
        units = set()
        for (module, name), mask in zip(self.method.targets(self.blocks[block]), masks):
            layer = self._names.get(id(module))
            if name != "weight" or layer not in self._flow.producers:
                continue
            dead = (mask.detach().reshape(mask.shape[0], -1) == 0).all(dim=1).cpu().tolist()
            ids = self._flow.producers[layer]
            units.update(self._roots.get(self._flow.find(ids[c]), -1) for c, gone in enumerate(dead) if gone)
        units.discard(-1)
        return np.array(sorted(units), dtype=np.int64)

    # ------------------------------------------------------------------ costs

    def alive(self, plan: Mapping[str, float]) -> np.ndarray:
        """Bool per unit (and a last, always-true entry for channels never removed)."""
        alive = np.ones(self._unit_count + 1, dtype=bool)
        for block, level in plan.items():
            if block in self.blocks and level > 0:
                alive[self.removed_units(block, level)] = False
        return alive

    def of(self, plan: Mapping[str, float]) -> Cost:
        return self._cost(self.alive(plan))

    def tally(self, plan: Mapping[str, float]) -> "Tally":
        return _ChannelTally(self, plan)

    def _entry_cost(self, k: int, alive: np.ndarray) -> Tuple[float, float, float]:
        """(params, MACs, seconds) of layer ``k`` (a conv / Linear, then the per-channel layers) with ``alive`` units."""
        if k >= len(self._layers):
            units, per_channel = self._per_channel[k - len(self._layers)]
            return float(per_channel * int(alive[units].sum())), 0.0, 0.0
        layer = self._layers[k]
        kept_out = alive[layer.out_units]
        per_group_out = kept_out.reshape(layer.groups, -1).sum(axis=1)
        per_group_in = alive[layer.in_units].reshape(layer.groups, -1).sum(axis=1)
        pairs = float(per_group_out @ per_group_in)
        seconds = 0.0
        if self.latency is not None:
            seconds = self.latency.layer_seconds(self._layer_names[k], float(per_group_in.sum()), float(per_group_out.sum()))
        return layer.params_per_pair * pairs + layer.bias * int(kept_out.sum()), layer.macs_per_pair * pairs, seconds

    def _entries(self) -> range:
        return range(len(self._layers) + len(self._per_channel))

    def _readers(self) -> List[List[int]]:
        """For each unit, the layers whose cost it changes (computed once)."""
        if self._unit_readers is None:
            readers: List[set] = [set() for _ in range(self._unit_count + 1)]
            for k in self._entries():
                if k < len(self._layers):
                    units = np.concatenate([self._layers[k].out_units, self._layers[k].in_units])
                else:
                    units = self._per_channel[k - len(self._layers)][0]
                for unit in np.unique(units[units >= 0]).tolist():
                    readers[unit].add(k)
            self._unit_readers = [sorted(r) for r in readers]
        return self._unit_readers

    def _cost(self, alive: np.ndarray) -> Cost:
        return self._total([self._entry_cost(k, alive) for k in self._entries()])

    def _total(self, entries: Sequence[Tuple[float, float, float]]) -> Cost:
        """The model's cost from every layer's ``(params, MACs, seconds)`` (summed afresh: no running sum drifts)."""
        seconds = None if self.latency is None else float(sum(e[2] for e in entries))
        return Cost(int(round(self._fixed_params + sum(e[0] for e in entries))), int(round(sum(e[1] for e in entries))),
                    seconds)


class Tally:
    """A plan's cost kept up to date as its levels change one at a time (cheaper than :meth:`PlanCosts.of` each time)."""

    def __init__(self, costs: PlanCosts, plan: Mapping[str, float]) -> None:
        self.costs, self.plan = costs, dict(plan)
        self.cost = costs.of(self.plan)

    def trial(self, block: str, level: float) -> Cost:
        """The cost with ``block`` at ``level`` instead (the tally is not changed)."""
        return self.costs.of(dict(self.plan, **{block: level}))

    def set(self, block: str, level: float) -> None:
        self.cost = self.trial(block, level)
        self.plan[block] = level


class _ChannelTally(Tally):
    """Only the layers that read the units a change adds or gives back are counted again."""

    def __init__(self, costs: "ChannelCosts", plan: Mapping[str, float]) -> None:
        self.costs, self.plan = costs, dict(plan)
        self.alive = costs.alive(self.plan)
        self.entries = [costs._entry_cost(k, self.alive) for k in costs._entries()]
        self.cost = costs._total(self.entries)

    def _changed(self, block: str, level: float) -> Tuple[np.ndarray, List[int], List[Tuple[float, float, float]]]:
        costs = self.costs
        alive = self.alive.copy()
        before = costs.removed_units(block, self.plan.get(block, 0.0))
        alive[before] = True
        alive[costs.removed_units(block, level)] = False
        flipped = np.nonzero(alive != self.alive)[0].tolist()
        readers = costs._readers()
        touched = sorted({k for unit in flipped for k in readers[unit]})
        return alive, touched, [costs._entry_cost(k, alive) for k in touched]

    def trial(self, block: str, level: float) -> Cost:
        _, touched, new = self._changed(block, level)
        params = self.cost.params + sum(n[0] - self.entries[k][0] for k, n in zip(touched, new))
        macs = self.cost.macs + sum(n[1] - self.entries[k][1] for k, n in zip(touched, new))
        seconds = None if self.cost.seconds is None else \
            self.cost.seconds + sum(n[2] - self.entries[k][2] for k, n in zip(touched, new))
        return Cost(int(round(params)), int(round(macs)), seconds)

    def set(self, block: str, level: float) -> None:
        alive, touched, new = self._changed(block, level)
        for k, entry in zip(touched, new):
            self.entries[k] = entry
        self.alive = alive
        self.plan[block] = level
        self.cost = self.costs._total(self.entries)


def scanned_weights(model: Optional[nn.Module], result: Any) -> Dict[str, int]:
    """Weights per scanned layer of ``result`` (a channel group: its layers' weights); 1 each without a model."""
    if model is None:
        return {layer: 1 for layer in result.layers}
    pruning = get_method(result.method)
    try:
        blocks = pruning.blocks(model, result.layers)
    except (KeyError, ValueError):
        blocks = {}
    weights = {}
    for layer in result.layers:
        members = pruning.block_layers(blocks[layer]) if layer in blocks else [layer]
        weights[layer] = sum(int(channel_weight(model.get_submodule(name)).numel()) for name in members)
    return weights


def measured_costs(model: nn.Module, input_size: Sequence[int]) -> Cost:
    """Params and dense MACs per sample of ``model`` as it is (for a compacted model: what it costs)."""
    return Cost(_parameter_count(model), sum(dense for dense, _ in count_macs(model, input_size).values()))


def nonzero_costs(model: nn.Module, input_size: Sequence[int]) -> Cost:
    """Params and MACs of ``model`` counting only its non-zero weights (a fine-grained plan's sparse-hardware cost)."""
    zeros = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and isinstance(module, (nn.Conv2d, nn.Linear)):
            zeros += int((weight == 0).sum())
    return Cost(_parameter_count(model) - zeros, sum(nonzero for _, nonzero in count_macs(model, input_size).values()))

