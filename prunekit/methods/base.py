"""What a pruning method is to prunekit: one object that every part asks (plans, scans, schedules, the CLI).

A method prunes a *block* to a FINAL sparsity: a conv layer's block (the conv, and the
BatchNorm after it) for fine-grained pruning, a channel group (coupled convs, see
:mod:`prunekit.methods.groups`) for the channel methods. :meth:`PruningMethod.blocks` maps
the layers a plan or a scan names to the blocks, under the names plans and results use. It says which tensors it masks (:meth:`PruningMethod.targets`), how
sparse a block is now (:meth:`~PruningMethod.current_sparsity`), where its channel
scores come from (:meth:`~PruningMethod.scores`: activation statistics, the
weights, or none), and it gives the masks two ways that agree by construction:
through torch's reparametrization (:meth:`~PruningMethod.apply`, what
:func:`prunekit.apply_plan` and :class:`prunekit.GradualPruner` call) and as plain
masks of a dense block at any level (:meth:`~PruningMethod.mask_maker`, what a scan
calls for every point without touching the model).

A method owns its data: :meth:`PruningMethod.prepare` gathers what its scores read
(activation statistics, gradients, or nothing) into a prepared copy, and that copy is what a
plan, a scan, a plan fit, a schedule and recovery are given. Its options (a channel
criterion) are set when it is made (:meth:`PruningMethod.configured`).

Methods are looked up by name in :mod:`prunekit.methods.registry`; a new one is a subclass
decorated with :func:`~prunekit.methods.registry.register_method`.

Example:
    >>> from prunekit.methods.registry import get_method
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    >>> prepared = get_method("channel").prepare(model, [torch.randn(2, 3, 8, 8)])
    >>> sorted(prepared.data), get_method("channel").data is None
    (['0'], True)
"""

from __future__ import annotations

import abc
import copy
from collections import OrderedDict
from typing import Any, Callable, ClassVar, Dict, Iterable, List, Mapping, Optional, Tuple

import torch  # noqa: F401  (the docstring example uses it)
from torch import Tensor, nn

from prunekit.layers import ConvBlock, conv_block, resolve_layers

__all__ = ["PruningMethod", "Target"]

#: A tensor a method masks: ``(module, parameter name)``.
Target = Tuple[nn.Module, str]


class PruningMethod(abc.ABC):
    """One pruning method, as :func:`prunekit.apply_plan`, the scanner and :class:`prunekit.GradualPruner` see it.

    Attributes:
        name: the name the registry and the CLI know it by (``"fine-grained"``).
        unit: what a sparsity counts (``"weights"`` or ``"channels"``).
        needs_statistics: whether :meth:`scores` reads activation statistics (measured on images).
        needs_data: whether :meth:`scores` reads what :meth:`prepare` gathers (statistics, gradients).
        data_kind: what :meth:`prepare` measures, in words (``"channel statistics"``).
        layer_types: the layer classes it prunes (``nn.Conv2d``; fine-grained pruning adds ``nn.Linear``).
        default_options: the options :meth:`__init__` takes, with their defaults (``{"criterion": "l2"}``).
        data: what :meth:`prepare` gathered (None until then, and for a method that needs nothing).
    """

    name: str = ""
    unit: str = "weights"
    needs_statistics: bool = False
    needs_data: bool = False
    data_kind: str = ""
    default_options: ClassVar[Dict[str, Any]] = {}
    #: The layers a plan or scan of this method may name (and a scan covers by default).
    layer_types: Tuple[type, ...] = (nn.Conv2d,)
    #: The layers a scan covers, and a budget fills, when none are named (None: every layer of :attr:`layer_types`).
    default_layer_types: Optional[Tuple[type, ...]] = None
    #: The only sparsities the method prunes to (besides 0), when it has a fixed pattern (2:4: ``(0.5,)``);
    #: None: any level in [0, 1). Scans measure these levels, schedules cannot ramp between them.
    levels: Optional[Tuple[float, ...]] = None

    def check_levels(self, levels: Iterable[float]) -> None:
        """Raise ValueError, naming the levels and the fix, when the method does not prune to ``levels``."""
        if self.levels is None:
            return
        wrong = [level for level in levels if level and level not in self.levels]
        if wrong:
            allowed = ",".join(f"{level:g}" for level in self.levels)
            raise ValueError(f"method {self.name!r} prunes only to {allowed} (a fixed pattern), not to "
                             f"{', '.join(f'{level:g}' for level in wrong)}; scan --sparsities {allowed}")

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.default_options))
        if unknown:
            takes = ", ".join(self.default_options) or "none"
            raise ValueError(f"method {self.name!r} has no option {unknown[0]!r} (its options: {takes})")
        self._options = {**self.default_options, **options}
        self.check_options(self._options)
        self.data: Any = None

    @property
    def options(self) -> Dict[str, Any]:
        """The options this method was made with (a copy)."""
        return dict(self._options)

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Raise ValueError, naming the value and the fix, for a bad option."""

    def configured(self, **options: Any) -> "PruningMethod":
        """A copy with ``options`` changed (what :meth:`prepare` gathered is kept)."""
        method = type(self)(**{**self._options, **options})
        method.data = self.data
        return method

    def with_data(self, data: Any) -> "PruningMethod":
        """A copy that owns ``data`` (what :meth:`prepare` would gather, e.g. ``{conv: ChannelStats}``)."""
        method = copy.copy(self)
        method._options = dict(self._options)
        method.data = data
        return method

    def prepare(
        self, model: nn.Module, batches: Iterable[Any], layers: Optional[Iterable[str]] = None, progress: bool = False
    ) -> "PruningMethod":
        """A copy that owns what :meth:`scores` needs, gathered from ``model`` on ``batches`` for ``layers``.

        ``batches``: tensors, or ``(inputs, labels)`` pairs; ``layers``: the layers that will be
        pruned (default: every layer of :attr:`layer_types`). ``model`` is left as it was. A method
        that needs nothing returns itself.
        """
        return self

    def describe_data(self, source: str) -> Optional[str]:
        """What :meth:`prepare` measured on ``source`` (a description of the data), for plan files; None if nothing."""
        return f"{self.data_kind} measured on {source}" if self.needs_data else None

    def layers_of(self, model: nn.Module, layers: Optional[Iterable[str]] = None) -> "OrderedDict[str, nn.Module]":
        """The layers named in ``layers``, checked against :attr:`layer_types`; when None, every layer of
        :attr:`default_layer_types`.

        Raises:
            KeyError: a name is not a layer this method prunes (the message lists those it does).

        Example:
            >>> from prunekit.methods import get_method
            >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 4))
            >>> pruning = get_method("filter-norm")
            >>> list(pruning.layers_of(model)), list(pruning.layers_of(model, ["0", "3"]))
            (['0'], ['0', '3'])
        """
        return resolve_layers(model, layers, self.layer_types, self.default_layer_types)

    def data_layers(self, model: nn.Module, layers: Optional[Iterable[str]] = None) -> List[str]:
        """The layers :meth:`prepare` gathers data for: every member of the blocks of ``layers`` (default: every
        layer of :attr:`default_layer_types`, and the members of their blocks)."""
        if layers is None and self.default_layer_types is None:
            return list(resolve_layers(model, None, self.layer_types))
        return self.statistics_layers(self.blocks(model, self.layers_of(model, layers)))

    @abc.abstractmethod
    def targets(self, block: ConvBlock) -> List[Target]:
        """The tensors of ``block`` this method masks."""

    @abc.abstractmethod
    def current_sparsity(self, block: ConvBlock) -> float:
        """How sparse ``block`` is now, in this method's unit (zero weights, or dead output channels)."""

    def scores(self, model: nn.Module, blocks: Mapping[str, Any]) -> Optional[Dict[str, Tensor]]:
        """Each block's scores (lowest pruned first), or None for a method that needs none.

        ``blocks`` as from :meth:`blocks`; a method that :attr:`needs_data` reads :attr:`data`.
        """
        return None

    @abc.abstractmethod
    def apply(self, block: ConvBlock, layer: str, sparsity: float, scores: Optional[Tensor]) -> None:
        """Prune ``block`` to the FINAL ``sparsity`` through torch's reparametrization (only missing zeros are added).

        Raises:
            ValueError: the block is already sparser than ``sparsity`` (a plan cannot regrow weights).
        """

    @abc.abstractmethod
    def mask_maker(self, block: ConvBlock, scores: Optional[Tensor]) -> Callable[[float], List[Tensor]]:
        """For a dense ``block``: a function from a sparsity to the mask of each of :meth:`targets`.

        The masks are the ones :meth:`apply` gives the dense block at that sparsity, bit for bit
        (both go through the same selection); the function may reuse work across levels.
        """

    def max_sparsity(self, block: Any) -> float:
        """The highest sparsity :meth:`apply` can give ``block`` (below 1 where some channels must stay)."""
        return 1.0

    def block(self, model: nn.Module, layer: str) -> Any:
        """The block this method prunes for ``layer``."""
        return conv_block(model, layer)

    def blocks(self, model: nn.Module, layers: Iterable[str]) -> Dict[str, Any]:
        """The blocks for ``layers``, keyed by the names plans and scan results use (here: one per layer)."""
        return {layer: self.block(model, layer) for layer in layers}

    def block_layers(self, block: Any) -> List[str]:
        """The convs of ``block``, in forward order (a scan cuts the model before the first)."""
        return [block.conv_name]

    def statistics_layers(self, blocks: Mapping[str, Any]) -> List[str]:
        """The convs whose activation statistics :meth:`scores` reads (when :attr:`needs_statistics`)."""
        return [layer for block in blocks.values() for layer in self.block_layers(block)]

    def __repr__(self) -> str:
        options = "".join(f", {key}={value!r}" for key, value in self._options.items())
        prepared = ", prepared" if self.data is not None else ""
        return f"{type(self).__name__}(name={self.name!r}, unit={self.unit!r}{options}{prepared})"
