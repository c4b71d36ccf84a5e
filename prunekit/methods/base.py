"""What a pruning method is to prunekit: one object that every part asks (plans, scans, schedules, the CLI).

A method prunes a conv layer's block (the conv, and the BatchNorm after it) to a
FINAL sparsity. It says which tensors it masks (:meth:`PruningMethod.targets`), how
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
    """

    name: str = ""
    unit: str = "weights"
    needs_statistics: bool = False

    @abc.abstractmethod
    def targets(self, block: ConvBlock) -> List[Target]:
        """The tensors of ``block`` this method masks."""

    @abc.abstractmethod
    def current_sparsity(self, block: ConvBlock) -> float:
        """How sparse ``block`` is now, in this method's unit (zero weights, or dead output channels)."""

    def scores(
        self, model: nn.Module, layers: Iterable[str], stats: Optional[Mapping[str, Any]], criterion: str
    ) -> Optional[Dict[str, Tensor]]:
        """Each layer's per-channel scores (lowest pruned first), or None for a method that needs none."""
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

    def block(self, model: nn.Module, layer: str) -> ConvBlock:
        """The block this method prunes for ``layer``."""
        return conv_block(model, layer)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, unit={self.unit!r})"
