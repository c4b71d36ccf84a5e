"""Channel dependencies: which channels of a model stand or fall together, and what each op does to them.

One home for what pruning by channels needs to know about a graph:

- :mod:`~prunekit.dependency.trace`: the one ``torch.fx`` tracer (convs kept whole);
- :mod:`~prunekit.dependency.flow`: the channel flow, a union-find of channel units;
- :mod:`~prunekit.dependency.groups`: the channel groups and units methods prune by;
- :mod:`~prunekit.dependency.registry`: one handler per op type (:func:`register_handler`),
  saying how channels pass through it, what a removed channel's constant becomes there and how
  to resize it; the built-in rules are :mod:`~prunekit.dependency.handlers`, a file per kind of op.

``compact``, the channel methods' groups and the scans all read it.

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 2, 1))
    >>> [g.members for g in channel_groups(model)]
    [('0', '2'), ('3',)]
"""

from prunekit.dependency.flow import ChannelFlow, UnsupportedGraphError, trace_channel_flow
from prunekit.dependency.groups import ChannelGroup, ChannelUnit, channel_groups, group_of, unit_masks
from prunekit.dependency.registry import Handler, handler_for, handler_of, register_handler, unregister_handler
from prunekit.dependency.trace import TracingError, trace_graph

__all__ = [
    "ChannelFlow",
    "ChannelGroup",
    "ChannelUnit",
    "Handler",
    "TracingError",
    "UnsupportedGraphError",
    "channel_groups",
    "group_of",
    "handler_for",
    "handler_of",
    "register_handler",
    "trace_channel_flow",
    "trace_graph",
    "unit_masks",
    "unregister_handler",
]
