"""Lazy re-exports for a package's ``__init__``: a public name's module is imported when the name is first used.

So that ``import prunekit`` (and the command line's ``-h`` and argument errors) do not
pay for torch until something needs it. A submodule that shares its name with a function
the package re-exports (``prunekit.compact``, ``prunekit.recover``) stays the function:
the import system's binding of the submodule onto the package is declined.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any, Dict, List, Mapping, Optional


class _LazyPackage(types.ModuleType):
    _exports: Dict[str, str]
    _moved: Dict[str, str]

    def __getattr__(self, name: str) -> Any:
        if name in ("_exports", "_moved"):
            raise AttributeError(name)
        target = self._exports.get(name)
        if target is None:
            home = self.__dict__.get("_moved", {}).get(name)
            if home is not None:  # ImportError: ``from package import name`` would hide an AttributeError's words
                raise ImportError(f"{self.__name__}.{name} moved to {home}.{name}: "
                                     f"import it from there (from {home} import {name})")
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        module_name, _, attr = target.partition(":")
        module = importlib.import_module(module_name)
        value = getattr(module, attr) if attr else module
        types.ModuleType.__setattr__(self, name, value)  # later lookups are plain attribute reads
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        target = self.__dict__.get("_exports", {}).get(name, "")
        if isinstance(value, types.ModuleType) and ":" in target and value.__name__ == target.partition(":")[0]:
            return  # importing prunekit.compact must not hide the function prunekit.compact
        types.ModuleType.__setattr__(self, name, value)

    def __dir__(self) -> List[str]:
        return sorted(set(super().__dir__()) | set(self._exports))


def lazy_exports(package_name: str, exports: Mapping[str, str], moved: Optional[Mapping[str, str]] = None) -> None:
    """Make ``package_name`` resolve each name of ``exports`` (``"module:attr"`` or ``"module"``) on first use.

    ``moved`` maps a name the package no longer holds to the package that does: reading it
    raises an ImportError that says where it went (an AttributeError would reach a user of
    ``from package import name`` as Python's "cannot import name", without the new home).

    Example:
        >>> import prunekit
        >>> prunekit.apply_plan.__module__
        'prunekit.plans'
    """
    package = sys.modules[package_name]
    package.__class__ = _LazyPackage
    types.ModuleType.__setattr__(package, "_exports", dict(exports))
    types.ModuleType.__setattr__(package, "_moved", dict(moved or {}))


class _LazyModule(types.ModuleType):
    """A stand-in that imports the real module on first attribute access (``sys.modules`` is left alone)."""

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self.__name__)
        return getattr(module, attr)


def lazy_module(name: str) -> Any:
    """A module object for ``name`` whose import waits until an attribute is read.

    For modules that need torch only inside the functions that run (the command line):
    ``torch = lazy_module("torch")`` at the top, ``torch.zeros(1)`` imports it.

    Example:
        >>> json = lazy_module("json")
        >>> json.dumps([1])
        '[1]'
    """
    return _LazyModule(name)
