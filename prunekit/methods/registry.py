"""Pruning methods by name: the one registry the CLI, plans, scans and schedules read.

The names are known without importing torch (the CLI's choices), and each method's
class is imported when it is first asked for.

Example:
    >>> METHODS
    ('fine-grained', 'channel', 'filter-norm')
    >>> get_method("channel").needs_statistics
    True
"""

from __future__ import annotations

import importlib
from typing import Any, Dict

__all__ = ["METHODS", "get_method"]

_CLASSES = {
    "fine-grained": "prunekit.methods.fine_grained:FineGrainedMethod",
    "channel": "prunekit.methods.channel:ChannelMethod",
    "filter-norm": "prunekit.methods.filter_norm:FilterNormMethod",
}

#: Every method's name, in the order the CLI lists them.
METHODS = tuple(_CLASSES)

_INSTANCES: Dict[str, Any] = {}


def get_method(method: Any) -> Any:
    """The :class:`~prunekit.methods.base.PruningMethod` named ``method`` (a method object is returned as is).

    Raises:
        ValueError: an unknown name, naming the known ones.
    """
    from prunekit.methods.base import PruningMethod

    if isinstance(method, PruningMethod):
        return method
    if not isinstance(method, str) or method not in _CLASSES:
        raise ValueError(f"method={method!r} is unknown; choose one of {', '.join(METHODS)}")
    if method not in _INSTANCES:
        module_name, _, class_name = _CLASSES[method].partition(":")
        _INSTANCES[method] = getattr(importlib.import_module(module_name), class_name)()
    return _INSTANCES[method]
