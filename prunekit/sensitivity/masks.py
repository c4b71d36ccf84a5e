"""Masked copies of a block's tensors at any level, made by the method's own mask maker.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from prunekit.methods.registry import get_method
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3))
    >>> method = get_method("fine-grained")
    >>> blocks = method.blocks(model, ["0"])
    >>> masked = Masker(blocks, method, None).masked("0", method.targets(blocks["0"]), 0.5)
    >>> float((masked[0] == 0).float().mean())
    0.5
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from prunekit.methods.base import PruningMethod, Target

__all__ = ["Masker"]


class Masker:
    """Masked copies of a layer's tensors at any level, from the method's own :meth:`~PruningMethod.mask_maker`.

    The masks are the method's, so a plan read off a scan behaves as scanned by
    construction. A mask maker does the work every level of a layer shares (a
    fine-grained one sorts the layer's magnitudes once). A scan keeps one layer's
    maker at a time (``keep_bytes=0``); a plan fit, whose trials prune the same
    layers again and again, keeps makers for several layers, the least recently
    used dropped first once their estimated size (8 bytes per weight: a sorted
    index) passes ``keep_bytes``.
    """

    def __init__(
        self, blocks: Mapping[str, Any], pruning: PruningMethod, scores: Optional[Mapping[str, Tensor]],
        keep_bytes: int = 0,
    ) -> None:
        self.blocks, self.pruning, self.scores = dict(blocks), pruning, scores or {}
        self.keep_bytes = keep_bytes
        self._makers: Dict[str, Tuple[int, Callable[[float], List[Tensor]]]] = {}  # oldest use first

    def masked(self, layer: str, targets: Sequence[Target], sparsity: float) -> List[Tensor]:
        maker = self._maker(layer, targets)
        with torch.no_grad():
            masks = maker(sparsity)
            # The same product the pruning forward pre-hook computes (weight_orig * weight_mask).
            return [module._parameters[name].detach() * mask.to(dtype=module._parameters[name].dtype)
                    for (module, name), mask in zip(targets, masks)]

    def _maker(self, layer: str, targets: Sequence[Target]) -> Callable[[float], List[Tensor]]:
        if layer in self._makers:
            self._makers[layer] = self._makers.pop(layer)  # most recently used last
            return self._makers[layer][1]
        size = 8 * sum(module._parameters[name].numel() for module, name in targets)
        # Free what will not be kept before the next layer's work (one layer at a time: all of it).
        while self._makers and sum(kept for kept, _ in self._makers.values()) + size > self.keep_bytes:
            del self._makers[next(iter(self._makers))]
        maker = self.pruning.mask_maker(self.blocks[layer], self.scores.get(layer))
        self._makers[layer] = (size, maker)
        return maker

    def update(self, blocks: Mapping[str, Any], scores: Optional[Mapping[str, Tensor]]) -> None:
        """Mask more blocks of the same model, weights and statistics (makers already made stay valid)."""
        self.blocks.update(blocks)
        self.scores = scores or {}

    def release(self) -> None:
        self._makers.clear()
