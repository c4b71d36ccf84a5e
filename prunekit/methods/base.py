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

Methods are looked up by name in :mod:`prunekit.methods.registry`.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from torch import Tensor, nn

from prunekit.layers import ConvBlock, conv_block

__all__ = ["PruningMethod", "Target"]

#: A tensor a method masks: ``(module, parameter name)``.
Target = Tuple[nn.Module, str]


class PruningMethod(abc.ABC):
    """One pruning method, as :func:`prunekit.apply_plan`, the scanner and :class:`prunekit.GradualPruner` see it.

    Attributes:
        name: the name the registry and the CLI know it by (``"fine-grained"``).
        unit: what a sparsity counts (``"weights"`` or ``"channels"``).
        needs_statistics: whether :meth:`scores` reads activation statistics (measured on images).
        layer_types: the layer classes it prunes (``nn.Conv2d``; fine-grained pruning adds ``nn.Linear``).
    """

    name: str = ""
    unit: str = "weights"
    needs_statistics: bool = False
    #: The layers a plan or scan of this method may name (and a scan covers by default).
    layer_types: Tuple[type, ...] = (nn.Conv2d,)

    @abc.abstractmethod
    def targets(self, block: ConvBlock) -> List[Target]:
        """The tensors of ``block`` this method masks."""

    @abc.abstractmethod
    def current_sparsity(self, block: ConvBlock) -> float:
        """How sparse ``block`` is now, in this method's unit (zero weights, or dead output channels)."""

    def scores(
        self, model: nn.Module, blocks: Mapping[str, Any], stats: Optional[Mapping[str, Any]], criterion: str
    ) -> Optional[Dict[str, Tensor]]:
        """Each block's scores (lowest pruned first), or None for a method that needs none.

        ``blocks`` as from :meth:`blocks`; ``stats`` maps every conv of :meth:`statistics_layers` to its statistics.
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
        return f"{type(self).__name__}(name={self.name!r}, unit={self.unit!r})"
