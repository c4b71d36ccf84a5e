"""One handler per op type: how channels pass through it, what a removed channel becomes there, how to resize it.

The channel flow (:mod:`prunekit.dependency.flow`), the constants ``compact`` folds and the
rebuild of smaller layers all ask the op's handler; none of them lists layer types. A handler
is found by the op a graph node calls: an ``nn.Module`` class (its subclasses too, nearest
class first), a function (``torch.cat``, ``operator.add``), the dotted name of either
(``"torchvision.ops.stochastic_depth.stochastic_depth"``, ``"torchvision.models.convnext.LayerNorm2d"``,
so that its package need not be imported), or a tensor method's name (``"view"``). An op without a handler is not followed: the channels that meet it are fixed,
with the node's name as the reason.

A new op is one handler registered once::

    class LayerScaleHandler(Handler):
        def trace(self, tracer, node, module):
            tracer.pass_through(node)

    register_handler(LayerScale, LayerScaleHandler())

Example:
    >>> from torch import nn
    >>> type(handler_of(nn.BatchNorm2d(4))).__name__
    'BatchNormHandler'
    >>> handler_for_method("view") is handler_for_method("reshape")
    True
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Protocol, Tuple, Union

import torch
import torch.fx as fx
from torch import Tensor, nn

if TYPE_CHECKING:  # annotations only: the flow imports this module
    from prunekit.dependency.flow import Consumer, FlowTracer

__all__ = [
    "ConstantContext",
    "Handler",
    "LayerHandler",
    "handler_for",
    "handler_for_method",
    "handler_of",
    "has_module_handler",
    "register_handler",
    "unregister_handler",
]


Op = Union[type, Callable[..., Any], str]


class ConstantContext(Protocol):
    """What a handler reads while ``compact`` carries the removed channels' constants through the graph."""

    dead_constants: Dict[str, Tensor]
    batchnorms: list
    norm_inputs: Dict[str, Tensor]  # per LayerNorm: the constants its removed channels bring (compact keeps them)

    def incoming(self, node: fx.Node) -> Tensor:
        """The constants of the removed channels in ``node``'s first argument (0 where none), float64."""

    def at(self, value: Any, length: int) -> Tensor:
        """The constants of ``value`` (a node), by channel position; zeros where nothing removed flows."""

    def mask(self, ids: Tuple[int, ...]) -> Tensor:
        """Bool per channel id: is it removed?"""

    def evaluate(self, node: fx.Node, module: Optional[nn.Module]) -> Tensor:
        """Run an element-wise op on its operands' constants."""


class Handler:
    """How one kind of op treats channels. Override what the op does; the defaults say "not followed".

    Attributes:
        resizable: the op holds per-channel parameters (a conv, a BatchNorm): it is followed only
            when the module is called once and carries no hooks.
    """

    resizable: bool = False

    def trace(self, tracer: "FlowTracer", node: fx.Node, module: Optional[nn.Module]) -> None:
        """Give ``node``'s value its channels (``tracer.flow.values[node]``), join or fix them."""
        tracer.unsupported(node)

    def constant(self, constants: ConstantContext, node: fx.Node, module: Optional[nn.Module]) -> Tensor:
        """What the removed channels hold after ``node``, given what they held before (float64, per channel)."""
        return constants.evaluate(node, module)

    # --- layers that make and read channels (convs, Linear) ----------------------------
    def channels(self, module: nn.Module) -> Tuple[int, int]:
        """(input channels or features, output channels or features) of a layer."""
        raise TypeError(f"{type(module).__name__} has no channel counts prunekit reads")

    def dead_channels(self, module: nn.Module) -> Tuple[Tensor, Tensor]:
        """Bool [out]: channels whose weights are all zero; and the constant each emits (its bias; float64)."""
        weight = module.weight.detach()
        dead = (weight.flatten(1) == 0).all(dim=1)
        return dead, bias_constant(module, weight.shape[0], weight.device)

    def fold(
        self, name: str, module: nn.Module, consumer: "Consumer", keep: Tensor, removed: Tensor, constant: Tensor
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """The kept inputs of a layer reading removed channels, and their constants' contribution to fold into its bias."""
        raise TypeError(f"{type(module).__name__} '{name}' cannot lose input channels")

    def resize(
        self, module: nn.Module, keep_in: Optional[Tensor], keep_out: Optional[Tensor], fold: Optional[Tensor]
    ) -> nn.Module:
        """A smaller copy of ``module`` (``None``: keep all); per-channel layers get ``keep_in is keep_out``."""
        raise TypeError(f"prunekit cannot resize a {type(module).__name__}")


class LayerHandler(Handler):
    """A layer that makes channels (a conv, a Linear): a removed channel emits its dead constant."""

    resizable = True

    def constant(self, constants: ConstantContext, node: fx.Node, module: Optional[nn.Module]) -> Tensor:
        return constants.dead_constants[node.target].cpu()


def bias_constant(module: nn.Module, count: int, device: Any) -> Tensor:
    """What an all-zero channel emits: its bias (0 without one), float64."""
    if module.bias is None:
        return torch.zeros(count, dtype=torch.float64, device=device)
    return module.bias.detach().double().clone()


_MODULES: Dict[type, Handler] = {}
_FUNCTIONS: Dict[Callable[..., Any], Handler] = {}
_DOTTED_NAMES: Dict[str, Handler] = {}  # functions and module classes, by module.qualname
_METHODS: Dict[str, Handler] = {}
_LOADED = False
_VERSION = 0  # changes with every registration: traces and groups depend on the handlers


def _load_builtins() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        import prunekit.dependency.handlers  # noqa: F401  (each module registers its handlers)


def _table(op: Op) -> Tuple[Dict[Any, Handler], Any]:
    if isinstance(op, type):
        if not issubclass(op, nn.Module):
            raise TypeError(f"a handler is registered for an nn.Module class, a function or a method name, not the class {op.__name__}")
        return _MODULES, op
    if isinstance(op, str):
        parts = op.split(".")
        if not all(part.isidentifier() for part in parts):
            raise ValueError(
                f"{op!r} is neither a tensor method's name nor a function's or module class's dotted name; give one, "
                "such as 'view' or 'torchvision.ops.stochastic_depth.stochastic_depth'"
            )
        return (_DOTTED_NAMES, op) if len(parts) > 1 else (_METHODS, op)
    if callable(op):
        return _FUNCTIONS, op
    raise TypeError(f"cannot register a handler for {op!r}: give an nn.Module class, a function or a method name")


def _op_name(op: Op) -> str:
    return getattr(op, "__qualname__", None) or getattr(op, "__name__", None) or str(op)


def register_handler(op: Op, handler: Handler, *, replace: bool = False) -> Handler:
    """Make ``handler`` the rule for ``op``; returns it.

    Args:
        op: an ``nn.Module`` class (its subclasses follow it unless they have their own), a
            function a graph node calls, the dotted name of either (``module.function``,
            ``module.Class``), or a tensor method's name. A module of the class
            itself is traced as one call (its forward is not traced into), so that its
            handler sees it whole.
        handler: a :class:`Handler` instance.
        replace: take over an op that already has a handler (prunekit's own included).

    Raises:
        ValueError: ``op`` has a handler already and ``replace`` is False.

    Example:
        >>> from torch import nn
        >>> class Scale(nn.Module):
        ...     def forward(self, x):
        ...         return 2 * x
        >>> class ScaleHandler(Handler):
        ...     def trace(self, tracer, node, module):
        ...         tracer.pass_through(node)
        >>> _ = register_handler(Scale, ScaleHandler())
        >>> unregister_handler(Scale)
    """
    global _VERSION
    _load_builtins()
    if not isinstance(handler, Handler):
        raise TypeError(f"a handler must be a prunekit.dependency.Handler instance, got {type(handler).__name__}")
    table, key = _table(op)
    existing = table.get(key)
    if existing is not None and existing is not handler and not replace:
        raise ValueError(
            f"{_op_name(op)} already has a handler ({type(existing).__name__}); pass replace=True to take it over"
        )
    table[key] = handler
    _VERSION += 1
    return handler


def unregister_handler(op: Op) -> None:
    """Remove ``op``'s handler (channels that meet it are then fixed).

    Raises:
        KeyError: ``op`` has no handler.
    """
    global _VERSION
    _load_builtins()
    table, key = _table(op)
    if key not in table:
        raise KeyError(f"{_op_name(op)} has no handler")
    del table[key]
    _VERSION += 1


def version() -> int:
    """A number that changes whenever a handler is registered or removed."""
    _load_builtins()
    return _VERSION


def _dotted(op: Any) -> str:
    return f"{getattr(op, '__module__', '')}.{getattr(op, '__qualname__', '')}"


def _class_handler(cls: type) -> Optional[Handler]:
    return _MODULES.get(cls) or _DOTTED_NAMES.get(_dotted(cls))


def handler_of(module: nn.Module) -> Optional[Handler]:
    """The handler of a module: its class's, else its nearest base class's (None: not followed)."""
    _load_builtins()
    for cls in type(module).__mro__:
        handler = _class_handler(cls)
        if handler is not None:
            return handler
    return None


def has_module_handler(module: nn.Module) -> bool:
    """Was a handler registered for ``module``'s own class? The tracer keeps such modules whole.

    Subclasses are not kept whole for their base's handler: a subclass may compute something
    else, and is traced into unless it is a leaf anyway (``torch.nn``'s own modules).
    """
    _load_builtins()
    return _class_handler(type(module)) is not None


def handler_for_method(name: str) -> Optional[Handler]:
    """The handler of the tensor method ``name`` (None: not followed)."""
    _load_builtins()
    return _METHODS.get(name)


def handler_for(node: fx.Node, modules: Dict[str, nn.Module]) -> Optional[Handler]:
    """The handler of what a graph node calls (None: not followed)."""
    if node.op == "call_module":
        return handler_of(modules[node.target])
    if node.op == "call_method":
        return handler_for_method(node.target)
    if node.op == "call_function":
        _load_builtins()
        try:
            handler = _FUNCTIONS.get(node.target)
        except TypeError:  # an unhashable callable
            return None
        return handler or _DOTTED_NAMES.get(_dotted(node.target))
    return None
