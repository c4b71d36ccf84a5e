"""Cutting a traced model at a layer: the values that cross the cut, and running the model from there.

The scanner prunes one conv at a time, so everything computed before that conv
is the dense model's and can be computed once. ``torch.fx`` makes this hold for
any traceable model, not just chains: the traced graph is a list of nodes in
execution order, and a *cut* before a conv's node is the set of values made
before it and used at or after it (for a chain: the conv's input; for HED:
the conv's input plus the side outputs already computed and the input image
whose size the last resize reads).

:func:`trace` and :func:`live_values` are pure functions of the model's graph;
:class:`GraphRunner` runs node ranges with ``torch.fx.Interpreter``.

Example:
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    >>> traced = trace(model)
    >>> [node.name for node in live_values(traced, traced.position("2"))]
    ['_1']
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.modules import module as _module

from prunekit.dependency.trace import TracingError, trace_graph
from prunekit.measure.error import tensors_in

__all__ = ["GraphRunner", "Traced", "UntraceableError", "live_values", "trace"]


class UntraceableError(RuntimeError):
    """The model cannot be split into a prefix and suffixes (the message says why)."""


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks or module._forward_pre_hooks or getattr(module, "_forward_hooks_with_kwargs", None)
    )


@dataclass
class Traced:
    """A model's traced graph: nodes in execution order and where each leaf module is called."""

    graph_module: fx.GraphModule
    nodes: List[fx.Node]
    calls: Dict[str, List[int]]  # leaf module name -> positions of its call nodes
    positions: Dict[fx.Node, int]

    def position(self, module_name: str) -> int:
        """Position of the one call of ``module_name``.

        Raises:
            KeyError: the module is never called as a leaf, or is called more than once (shared).
        """
        calls = self.calls.get(module_name, [])
        if len(calls) != 1:
            what = "never called as a leaf module" if not calls else f"called {len(calls)} times (shared)"
            raise KeyError(f"module {module_name!r} is {what} in the traced graph")
        return calls[0]


def trace(model: nn.Module) -> Traced:
    """Trace ``model`` with ``torch.fx``, convs kept as leaves.

    Raises:
        UntraceableError: the model cannot be traced (data-dependent control flow, ...),
            or hooks on a container or global hooks would be skipped by running nodes.
    """
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        raise UntraceableError("global forward hooks are registered; running graph pieces would skip them")
    try:
        graph, root = trace_graph(model)
    except TracingError as err:
        raise UntraceableError(f"torch.fx cannot trace it ({err})") from None
    graph_module = fx.GraphModule(root, graph)
    nodes = list(graph.nodes)
    calls: Dict[str, List[int]] = {}
    for index, node in enumerate(nodes):
        if node.op == "call_module":
            calls.setdefault(str(node.target), []).append(index)
    leaves = set(calls)
    for name, module in model.named_modules():
        if name and name not in leaves and _has_hooks(module):
            raise UntraceableError(f"module {name!r} has forward hooks but is inlined by the trace")
    if _has_hooks(model):
        raise UntraceableError("the model itself has forward hooks")
    return Traced(graph_module, nodes, calls, {node: i for i, node in enumerate(nodes)})


def live_values(traced: Traced, position: int) -> List[fx.Node]:
    """The nodes made before ``position`` whose value is used at or after it: what crosses the cut."""
    return [
        node
        for node in traced.nodes[:position]
        if any(traced.positions[user] >= position for user in node.users)
    ]


def _tensor_bytes(value: Any) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors_in(value))


#: A weight used fewer times than this per forward (a linear layer's rows, a conv's output positions)
#: is bound by its reads rather than its arithmetic, on CPUs and GPUs alike.
FEW_USES = 64


class GraphRunner(torch.fx.Interpreter):
    """Runs ranges of a traced graph's nodes from a saved cut (``Interpreter.run_node`` does each node).

    A *state* is ``{node: value}`` for the values live at a cut. Values that a
    node after the cut may write in place are copied before the suffix runs,
    so one state serves many suffixes.
    """

    def __init__(self, traced: Traced) -> None:
        super().__init__(traced.graph_module, garbage_collect_values=True)
        self.traced = traced
        # Per cut position, computed once: the live nodes, and those a non-conv node may write.
        self._live: Dict[int, List[fx.Node]] = {}
        self._written: Dict[int, frozenset] = {}
        self._traffic: Dict[Any, Optional[List[Tuple[int, int]]]] = {}

    def suffix_traffic(self, inputs: Tensor) -> Optional[List[Tuple[int, int]]]:
        """Per position: the bytes of the weights that the modules from there on use fewer than
        :data:`FEW_USES` times each, and the bytes of the values those nodes compute, for a batch shaped
        like ``inputs``; None where the shapes cannot be propagated.

        A weight used few times (a classifier's for a few images) costs its reads more than its
        arithmetic: running several versions of the input at once reads it once for all. The shapes
        come from running the graph on fake tensors (nothing is computed; memoised per shape).
        """
        key = (tuple(inputs.shape), inputs.dtype)
        if key not in self._traffic:
            self._traffic[key] = self._measure_traffic(inputs)
        return self._traffic[key]

    def _measure_traffic(self, inputs: Tensor) -> Optional[List[Tuple[int, int]]]:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.passes.fake_tensor_prop import FakeTensorProp

        from prunekit.sensitivity.distributed import unbind_group_defaults

        unbind_group_defaults()  # fake tensors import torch._dynamo: a caller's process group must not stay bound

        logger = logging.getLogger("torch._subclasses.fake_tensor")
        quiet = logger.disabled
        logger.disabled = True  # a model fake tensors cannot run is not an error here: it is run one level at a time
        try:
            mode = FakeTensorMode(allow_non_fake_inputs=True)
            with torch.no_grad():
                FakeTensorProp(self.traced.graph_module, mode).propagate(mode.from_tensor(inputs))
            values = {node: node.meta.pop("val", None) for node in self.traced.nodes}
        except Exception:  # noqa: BLE001 - any failure only means: do not stack
            return None
        finally:
            logger.disabled = quiet
        totals: List[Tuple[int, int]] = []
        weights = activations = 0
        for node in reversed(self.traced.nodes):
            if node.op == "call_module" and isinstance(values[node], Tensor):
                parameters = list(self.traced.graph_module.get_submodule(str(node.target)).parameters())
                if parameters:
                    largest = max(parameters, key=lambda parameter: parameter.numel())
                    # Each of the weight's output features is used once per other element of the output.
                    uses = values[node].numel() // max(1, largest.shape[0] if largest.dim() else 1)
                    if uses < FEW_USES:
                        weights += sum(_tensor_bytes(parameter) for parameter in parameters)
            if node.op not in ("placeholder", "output"):
                activations += _tensor_bytes(values[node])
            totals.append((weights, activations))
        return totals[::-1]

    def live(self, position: int) -> List[fx.Node]:
        """:func:`live_values` at ``position``, memoised (the scan asks per batch and layer)."""
        if position not in self._live:
            self._live[position] = live_values(self.traced, position)
        return self._live[position]

    def _may_be_written(self, position: int) -> frozenset:
        if position not in self._written:
            self._written[position] = frozenset(
                node for node in self.live(position)
                if any(not _is_conv_call(self.traced, user) for user in node.users
                       if self.traced.positions[user] >= position)
            )
        return self._written[position]

    def start(self, *inputs: Any) -> Dict[fx.Node, Any]:
        """The state at position 0: the model's inputs bound to its placeholders."""
        self.args_iter = iter(inputs)
        state: Dict[fx.Node, Any] = {}
        self.env = state
        for node in self.traced.nodes:
            if node.op != "placeholder":
                break
            state[node] = self.run_node(node)
        return state

    def fork(self, state: Mapping[fx.Node, Any], position: int) -> Dict[fx.Node, Any]:
        """``state`` (at ``position``) with copies of the values a later node may write in place, so it stays as kept."""
        written = self._may_be_written(position)
        return {node: value.clone() if node in written and isinstance(value, Tensor) else value
                for node, value in state.items()}

    def advance(self, state: Mapping[fx.Node, Any], start: int, stop: int) -> Dict[fx.Node, Any]:
        """The state at ``stop`` from the state at ``start`` (runs nodes ``start .. stop - 1``)."""
        self.env = dict(state)
        for node in self.traced.nodes[start:stop]:
            if node.op in ("placeholder", "output"):
                continue
            self.env[node] = self.run_node(node)
        return {node: self.env[node] for node in self.live(stop)}

    def finish(
        self, state: Mapping[fx.Node, Any], start: int, capture: Mapping[str, int], copy_inputs: bool = True,
        states: Optional[Tuple[Sequence[int], Callable[[int, Dict[fx.Node, Any]], None]]] = None,
    ) -> Tuple[Any, Dict[str, Tensor]]:
        """Run from ``start`` to the end; returns the model output and copies of the captured module outputs.

        Args:
            capture: module name -> position of its call node (at or after ``start``).
            copy_inputs: copy the state values a node other than a conv consumes (it might write them).
            states: ``(positions, keep)``: on the way, ``keep(position, state)`` gets the state at each
                of ``positions`` after ``start`` (its values that a later node may write are copies).
        """
        self.env = self.fork(state, start) if copy_inputs else dict(state)
        captured: Dict[str, Tensor] = {}
        return self._run_to_end(start, start, capture, captured, states), captured

    def _run_to_end(
        self, first: int, start: int, capture: Mapping[str, int], captured: Dict[str, Tensor],
        states: Optional[Tuple[Sequence[int], Callable[[int, Dict[fx.Node, Any]], None]]] = None,
    ) -> Any:
        """Run nodes ``first ..`` on ``self.env`` (cut at ``start``); fill ``captured``; return the model output."""
        wanted = {position: name for name, position in capture.items()}
        positions, keep = states if states is not None else ((), None)
        keep_at = {position for position in positions if position > first}
        for node in self.traced.nodes[first:]:
            position = self.traced.positions[node]
            if keep is not None and position in keep_at:
                keep(position, self.fork({live: self.env[live] for live in self.live(position)}, position))
            value = self.run_node(node)
            if node.op == "output":
                return value
            self.env[node] = value
            name = wanted.get(position)
            if name is not None:
                # A copy, since a later in-place op (ReLU(inplace=True)) may overwrite it.
                captured[name] = value.detach().clone()
            for dead in self.user_to_last_uses.get(node, ()):
                if dead in self.env and self.traced.positions[dead] >= start:
                    del self.env[dead]
        return None

    def finish_stacked(
        self, state: Mapping[fx.Node, Any], start: int, capture: Mapping[str, int], levels: List[Any], batch: int,
    ) -> Optional[List[Tuple[Any, Dict[str, Tensor]]]]:
        """:meth:`finish` for several versions of the module called at ``start``, the rest run once on them stacked.

        ``levels`` are context managers that each put one version of that module's parameters in
        place. Its node runs once per level; its outputs are concatenated along the batch, the
        other values crossing the cut repeated alike (tensors whose first dimension is ``batch``),
        and the rest of the graph runs once: each later weight is read once for every level.
        Returns one ``(output, captured)`` per level, or None when the outputs do not split back
        (something after the cut mixed the batch): the caller then runs the levels one by one.
        """
        base = self.fork(state, start)
        cut = self.traced.nodes[start]
        outputs = []
        for level in levels:
            self.env = dict(base)
            with level:
                outputs.append(self.run_node(cut))
        count = len(levels)

        def stacked(value: Any) -> Any:
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch:
                return value.repeat(count, *([1] * (value.dim() - 1)))
            return value

        env: Dict[fx.Node, Any] = {node: stacked(value) for node, value in base.items() if node is not cut}
        env[cut] = torch.cat(outputs)
        self.env = env
        captured: Dict[str, Tensor] = {name: env[cut].detach().clone() for name, at in capture.items() if at == start}
        output = self._run_to_end(start + 1, start, capture, captured)
        parts = _split(output, count, batch)
        pieces = {name: _split(value, count, batch) for name, value in captured.items()}
        if parts is None or any(piece is None for piece in pieces.values()):
            return None
        return [(parts[i], {name: piece[i] for name, piece in pieces.items()}) for i in range(count)]  # type: ignore[index]

    @staticmethod
    def state_bytes(state: Mapping[fx.Node, Any]) -> int:
        """Bytes of the tensors a state holds."""
        return sum(_tensor_bytes(value) for value in state.values())


def _split(value: Any, count: int, batch: int) -> Optional[List[Any]]:
    """``value`` (a tensor, or a tuple, list or dict of them) cut back into ``count`` batches; None if it does not split."""
    if isinstance(value, Tensor):
        if value.dim() == 0 or value.shape[0] != count * batch:
            return None
        return list(value.split(batch))
    if isinstance(value, (tuple, list)):
        parts = [_split(item, count, batch) for item in value]
        if any(part is None for part in parts):
            return None
        return [type(value)(part[i] for part in parts) for i in range(count)]  # type: ignore[index]
    if isinstance(value, dict):
        split = {key: _split(item, count, batch) for key, item in value.items()}
        if any(part is None for part in split.values()):
            return None
        return [{key: part[i] for key, part in split.items()} for i in range(count)]  # type: ignore[index]
    return None


def _is_conv_call(traced: Traced, node: fx.Node) -> bool:
    if node.op != "call_module":
        return False
    module = traced.graph_module.get_submodule(str(node.target))
    # A conv never writes its input (subclasses that override forward are not trusted).
    return type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def capture_positions(traced: Traced, names: Iterable[str]) -> Dict[str, int]:
    """Module name -> position of its single call node, for the names a metric captures.

    Raises:
        KeyError: a name is not a leaf module called exactly once.
    """
    return {name: traced.position(name) for name in names}
