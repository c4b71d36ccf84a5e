"""Pruning methods by name: the one registry the CLI, plans, scans and schedules read; open to users.

A method is a :class:`~prunekit.methods.base.PruningMethod` subclass registered under its
``name``: the built-in ones here, one per file in :mod:`prunekit.methods`; a user's with
:func:`register_method` (in-process) or, for the command line, an installed package's entry point
in the group ``prunekit.methods`` (``name = "package.module:Class"``). The names, and each method's
one-line help, are known without importing torch (the CLI's choices): the help is read from the
class's docstring in its source file, and the class is imported when it is first asked for.

Example:
    >>> METHODS
    ('channel', 'filter-norm', 'fine-grained', '2:4', 'taylor')
    >>> get_method("channel").needs_statistics
    True
    >>> get_method("channel", criterion="l0").options
    {'criterion': 'l0'}
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, Tuple, TypeVar, Union

__all__ = ["ENTRY_POINT_GROUP", "METHODS", "get_method", "method_help", "method_names", "prepared_method",
           "register_method", "unregister_method"]


@functools.lru_cache(maxsize=None)
def _built_in() -> Mapping[str, str]:
    """name -> ``module:Class`` for every ``@register_method`` class in this package's files, read without importing."""
    found = {}
    for path in sorted(Path(__file__).parent.glob("*.py")):
        for node in _classes(path):
            if any(_is_register(d) for d in node.decorator_list):
                name = _class_name_attribute(node)
                if name is not None:
                    found[name] = f"{__package__}.{path.stem}:{node.name}"
    return MappingProxyType(found)


def _classes(path: Union[str, Path]) -> List[ast.ClassDef]:
    """The top-level class definitions of a source file (parsed, not imported)."""
    return [node for node in ast.parse(Path(path).read_text(encoding="utf-8")).body if isinstance(node, ast.ClassDef)]


def _is_register(decorator: ast.expr) -> bool:
    return (isinstance(decorator, ast.Name) and decorator.id == "register_method") or (
        isinstance(decorator, ast.Attribute) and decorator.attr == "register_method")


def _class_name_attribute(node: ast.ClassDef) -> Optional[str]:
    for statement in node.body:
        targets = (statement.targets if isinstance(statement, ast.Assign) else
                   [statement.target] if isinstance(statement, ast.AnnAssign) else [])
        value = getattr(statement, "value", None)
        if any(isinstance(t, ast.Name) and t.id == "name" for t in targets) and isinstance(value, ast.Constant):
            return str(value.value)
    return None


#: The built-in methods' names, one per ``@register_method`` class of this package, by file name
#: (:func:`method_names` adds the users').
METHODS = tuple(_built_in())

#: The entry-point group an installed package registers its methods under, for the command line.
ENTRY_POINT_GROUP = "prunekit.methods"

_REGISTERED: Dict[str, type] = {}  # registered in this process: name -> class
_DEFAULTS: Dict[str, Any] = {}  # name -> the instance with default options

Method = TypeVar("Method", bound=type)


@functools.lru_cache(maxsize=None)
def _entry_points() -> Mapping[str, str]:
    """name -> ``module:Class`` of the installed packages' methods (read once: the CLI asks several times per call)."""
    from importlib.metadata import entry_points

    return MappingProxyType({point.name: point.value for point in entry_points(group=ENTRY_POINT_GROUP)})


def method_names() -> Tuple[str, ...]:
    """Every method's name: the built-in ones, then installed packages' entry points, then those registered here."""
    names = list(_built_in())
    for name in list(_entry_points()) + list(_REGISTERED):
        if name not in names:
            names.append(name)
    return tuple(names)


def register_method(cls: Method) -> Method:
    """Class decorator: make ``cls`` (a :class:`~prunekit.methods.base.PruningMethod` subclass) known by its ``name``.

    From then on :func:`get_method`, plans, scans, schedules and the CLI's ``--method`` know it.

    Example:
        >>> from prunekit.methods.filter_norm import FilterNormMethod
        >>> @register_method
        ... class Half(FilterNormMethod):
        ...     '''Filters by their L1 norm, like filter-norm (an example).'''
        ...     name = "example-half"
        >>> get_method("example-half").unit
        'channels'
        >>> unregister_method("example-half")

    Raises:
        TypeError: ``cls`` is not a PruningMethod subclass.
        ValueError: it has no name, or another class has that name.
    """
    from prunekit.methods.base import PruningMethod

    if not (isinstance(cls, type) and issubclass(cls, PruningMethod)):
        raise TypeError(f"register_method decorates a PruningMethod subclass, got {cls!r}")
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not name or name != name.strip() or "," in name:
        raise ValueError(f"{cls.__name__}.name={name!r}: give the class a name (e.g. name = 'my-method'), "
                         "no commas or surrounding spaces")
    owner = _owner(name)
    if owner is not None and owner != _home(cls):
        raise ValueError(f"method name {name!r} is taken (by {owner}); give {cls.__name__} another name")
    _REGISTERED[name] = cls
    _DEFAULTS.pop(name, None)
    return cls


def unregister_method(name: str) -> None:
    """Forget the method :func:`register_method` registered as ``name`` in this process (e.g. after a test).

    Raises:
        ValueError: ``name`` was not registered in this process (built-in and installed methods stay).
    """
    if name not in _REGISTERED:
        raise ValueError(f"method {name!r} was not registered in this process; nothing to unregister")
    del _REGISTERED[name]
    _DEFAULTS.pop(name, None)


def _home(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _owner(name: str) -> Optional[str]:
    """``module:Class`` of the method registered as ``name``, or None."""
    if name in _REGISTERED:
        return _home(_REGISTERED[name])
    return _built_in().get(name) or _entry_points().get(name)


def _where(name: str) -> Union[type, str]:
    """The class registered as ``name``, or ``module:Class`` where it has not been imported."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    owner = _owner(name)
    if owner is None:
        raise ValueError(f"method={name!r} is unknown; choose one of {', '.join(method_names())}")
    return owner


def method_class(name: str) -> type:
    """The class registered as ``name`` (imported now if need be)."""
    from prunekit.methods.base import PruningMethod

    where = _where(name)
    if isinstance(where, type):
        return where
    module_name, _, class_name = where.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, PruningMethod)) or getattr(cls, "name", None) != name:
        raise ValueError(f"method {name!r} points at {where!r}, which is not a PruningMethod named {name!r}; "
                         "fix the package's prunekit.methods entry point")
    return cls


def get_method(method: Any, **options: Any) -> Any:
    """The :class:`~prunekit.methods.base.PruningMethod` named ``method``, with ``options`` (a method object as is).

    Raises:
        ValueError: an unknown name, naming the known ones; an option the method does not take.
    """
    from prunekit.methods.base import PruningMethod

    if isinstance(method, PruningMethod):
        return method.configured(**options) if options else method
    if not isinstance(method, str):
        raise ValueError(f"method={method!r} is unknown; choose one of {', '.join(method_names())}")
    if options:
        return get_method(method).configured(**options)
    if method not in _DEFAULTS:
        _DEFAULTS[method] = method_class(method)()
    return _DEFAULTS[method]


def prepared_method(method: Any, stats: Optional[Any] = None, criterion: Optional[str] = None) -> Any:
    """``method`` (a name or a method object) with a ``criterion`` and the ``stats`` it scores channels by.

    The one place the ``stats=``/``criterion=`` arguments of :func:`prunekit.apply_plan`, the scan and
    the schedules become what a method owns; with neither, ``method`` as :func:`get_method` gives it.

    Raises:
        ValueError: a criterion for a method that takes none.
    """
    pruning = get_method(method)
    if criterion is not None and criterion != pruning.options.get("criterion"):
        if "criterion" not in pruning.options:
            raise ValueError(f"criterion={criterion!r}: method {pruning.name!r} takes no criterion; leave it out")
        pruning = pruning.configured(criterion=criterion)
    if stats is not None:
        pruning = pruning.with_data(stats)
    return pruning


def method_help(name: str) -> str:
    """The first paragraph of the method's class docstring, read without importing it where it is not yet imported.

    Example:
        >>> method_help("filter-norm")
        '"filter-norm": whole output channels with the smallest filter L1 norms; data-free.'
    """
    where = _where(name)
    if isinstance(where, type):
        return _first_paragraph(inspect.getdoc(where) or "")
    module_name, _, class_name = where.partition(":")
    module = sys.modules.get(module_name)
    if module is not None:
        return _first_paragraph(inspect.getdoc(getattr(module, class_name, None)) or "")
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return ""
    node = next((node for node in _classes(spec.origin) if node.name == class_name), None)
    return _first_paragraph(ast.get_docstring(node) or "") if node is not None else ""


def _first_paragraph(text: str) -> str:
    """The first paragraph on one line, its reST roles and literals as plain text."""
    paragraph = " ".join(text.strip().split("\n\n")[0].split())
    return re.sub(r"(:\w+:)?`+~?([^`]+?)`+", r"\2", paragraph)


def help_text() -> str:
    """``--method``'s help: each method's name and its docstring's first paragraph."""
    def summary(name: str) -> str:
        text = method_help(name)
        return text[len(f'"{name}": '):] if text.startswith(f'"{name}": ') else text

    return "; ".join(f"{name}: {summary(name).rstrip('.')}" for name in method_names())
