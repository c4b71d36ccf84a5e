"""The one torch.fx tracer of prunekit: convs kept as single calls, for the scanner's cuts and compaction.

Every ``nn.Conv2d``, subclasses included (compaction's ``BorderBiasConv2d``), is a leaf:
a graph node is then one whole conv, the unit both a scan cuts at and ``compact`` resizes.

Example:
    >>> import torch
    >>> graph, root = trace_graph(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))
    >>> [node.op for node in graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
"""

from __future__ import annotations

from typing import Tuple

from torch import fx, nn

__all__ = ["ConvLeafTracer", "TracingError", "trace_graph"]


class TracingError(RuntimeError):
    """torch.fx could not trace the model; the message carries fx's reason (on one line)."""


class ConvLeafTracer(fx.Tracer):
    """torch.fx's tracer, with every ``Conv2d`` (subclasses included) kept as one call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, nn.Conv2d) or super().is_leaf_module(m, module_qualified_name)


def trace_graph(model: nn.Module) -> Tuple[fx.Graph, nn.Module]:
    """``model``'s fx graph and the root its ``call_module`` targets refer to.

    Raises:
        TracingError: data-dependent control flow and the like; callers add their own advice.
    """
    tracer = ConvLeafTracer()
    try:
        graph = tracer.trace(model)
    except Exception as err:  # fx raises TraceError, TypeError, NotImplementedError, ...
        raise TracingError(f"{type(err).__name__}: {' '.join(str(err).split())[:200]}") from None
    return graph, tracer.root
