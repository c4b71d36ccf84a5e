"""The one torch.fx tracer of prunekit: convs kept as single calls, for the scanner's cuts and compaction.

Every ``nn.Conv2d``, subclasses included (compaction's ``BorderBiasConv2d``), is a leaf:
a graph node is then one whole conv, the unit both a scan cuts at and ``compact`` resizes.
So is a module whose class has a handler (:func:`prunekit.dependency.register_handler`).

A model is traced once: the graph is kept (beside the model, not in it) while the model's
structure stays the same (the same module objects, training flags and registered handlers), so
the scanner's cuts, the channel flow and the channel groups all read one trace.

Example:
    >>> import torch
    >>> graph, root = trace_graph(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))
    >>> [node.op for node in graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
"""

from __future__ import annotations

import weakref
from typing import Any, Tuple

from torch import fx, nn

from prunekit.dependency import registry
from prunekit.dependency.registry import has_module_handler
from prunekit.messages import one_line

__all__ = ["ConvLeafTracer", "TracingError", "structure_key", "trace_graph"]

_GRAPHS: "weakref.WeakKeyDictionary[nn.Module, Tuple[Any, fx.Graph]]" = weakref.WeakKeyDictionary()


class TracingError(RuntimeError):
    """torch.fx could not trace the model; the message carries fx's reason (on one line)."""


class ConvLeafTracer(fx.Tracer):
    """torch.fx's tracer, with every ``Conv2d`` (subclasses included) and every module with a handler kept as one call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, nn.Conv2d) or has_module_handler(m) or super().is_leaf_module(m, module_qualified_name)


def structure_key(model: nn.Module) -> Tuple[Any, ...]:
    """What ``model``'s trace depends on: its modules (the objects, their classes, a forward set on
    an instance, their training flags) and the registered handlers. Weights are not part of it.
    """
    modules = tuple(
        (name, id(module), type(module), id(module.__dict__.get("forward")), module.training)
        for name, module in model.named_modules()
    )
    return registry.version(), modules


def trace_graph(model: nn.Module) -> Tuple[fx.Graph, nn.Module]:
    """``model``'s fx graph and the root its ``call_module`` targets refer to.

    The graph is shared by every caller while :func:`structure_key` stays the same: read it,
    do not change it.

    Raises:
        TracingError: data-dependent control flow and the like; callers add their own advice.
    """
    key = structure_key(model)
    kept = _GRAPHS.get(model)
    if kept is not None and kept[0] == key:
        return kept[1], model
    tracer = ConvLeafTracer()
    try:
        graph = tracer.trace(model)
    except Exception as err:  # fx raises TraceError, TypeError, NotImplementedError, ...
        raise TracingError(f"{type(err).__name__}: {one_line(str(err))[:200]}") from None
    if tracer.root is model:
        _GRAPHS[model] = (key, graph)
    return graph, tracer.root
