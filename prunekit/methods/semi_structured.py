"""2:4 semi-structured pruning: two of every four consecutive weights along the input dimension are zero.

This is the pattern NVIDIA's sparse tensor cores run (Ampere and later), and the one
``torch.sparse.to_sparse_semi_structured`` accepts: a Linear weight ``[out, in]`` whose every
row holds, in each run of four consecutive inputs, at most two non-zeros. In each run the two
weights of smallest magnitude are zeroed (ties broken by position, earlier first), so a layer
is exactly half zeros. A layer is either pruned this way or left dense: the method's only
level is 0.5 (:attr:`SemiStructuredMethod.levels`), and a scan measures, layer by layer, what
making it 2:4 costs; the plan fit then picks the layers that can take it.

Where it buys speed: only on GPUs with sparse tensor cores, after converting the weights
(:func:`prunekit.export.to_semi_structured`, CUDA only), for fp16/bf16 (and int8) matmuls large
enough to be compute bound. On this CPU, and on a GPU without the conversion, a 2:4 model runs
at the dense model's speed: its zeros are stored and multiplied like any weight.

Example:
    >>> import torch
    >>> from torch import nn
    >>> linear = nn.Linear(8, 2)
    >>> _ = SemiStructured24.apply(linear, "weight")
    >>> is_semi_structured(linear.weight)
    True
    >>> int((linear.weight == 0).sum())
    8
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from prunekit.layers import ConvBlock
from prunekit.methods.fine_grained import FineGrainedMethod
from prunekit.methods.registry import register_method

__all__ = ["GROUP", "KEPT", "SemiStructured24", "SemiStructuredMethod", "is_semi_structured", "semi_structured_mask"]

#: Consecutive weights along the input dimension that form one run.
GROUP = 4
#: Weights of each run that stay non-zero.
KEPT = 2


def _check_shape(shape: torch.Size, where: str = "the weight") -> None:
    if len(shape) != 2:
        raise ValueError(f"{where} has shape {tuple(shape)}; 2:4 sparsity is for Linear weights [out, in]")
    if shape[1] % GROUP:
        raise ValueError(f"{where} has {shape[1]} inputs, not a multiple of {GROUP}: 2:4 sparsity needs runs of "
                         f"{GROUP} consecutive inputs; leave this layer out of the plan")


def semi_structured_mask(weight: Tensor, scores: Optional[Tensor] = None) -> Tensor:
    """The 2:4 mask of a Linear ``weight`` ``[out, in]``: 1 at the two largest of every four inputs, 0 elsewhere.

    ``scores`` (the weight's shape) rank the entries instead of their magnitudes. Ties keep
    the later entry, so the earlier ones are zeroed first (as fine-grained pruning breaks them).

    Example:
        >>> semi_structured_mask(torch.tensor([[0.1, -0.5, 0.3, 0.0, 1.0, 1.0, 1.0, 1.0]])).tolist()
        [[0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0]]
    """
    _check_shape(weight.shape)
    return _mask_of_ranks((weight if scores is None else scores).detach().abs(), weight.dtype)


def _mask_of_ranks(rank: Tensor, dtype: torch.dtype) -> Tensor:
    """1 at the two highest ranks of every run of four along the last dim (ties: the later entries kept)."""
    runs = rank.reshape(rank.shape[0], -1, GROUP)
    order = torch.argsort(runs, dim=-1, stable=True)  # smallest first; ties: earlier first
    mask = torch.ones(runs.shape, dtype=dtype, device=rank.device)
    mask.scatter_(-1, order[..., : GROUP - KEPT], 0)
    return mask.reshape(rank.shape)


def is_semi_structured(weight: Tensor) -> bool:
    """Does ``weight`` ``[out, in]`` hold at most two non-zeros in every run of four consecutive inputs?

    Example:
        >>> is_semi_structured(torch.tensor([[1.0, 0.0, 2.0, 0.0]])), is_semi_structured(torch.ones(1, 4))
        (True, False)
    """
    if weight.dim() != 2 or weight.shape[1] % GROUP:
        return False
    return bool(((weight.detach() != 0).reshape(weight.shape[0], -1, GROUP).sum(-1) <= KEPT).all())


class SemiStructured24(prune.BasePruningMethod):
    """Zero the two smallest of every four consecutive weights along the input dimension (a 2:4 pattern).

    Applied to a weight already pruned, the runs are chosen among the weights still
    unpruned, so the result keeps torch's rule that a mask only ever gains zeros; applied
    twice it changes nothing.

    Example:
        >>> linear = nn.Linear(4, 3)
        >>> _ = SemiStructured24.apply(linear, "weight")
        >>> (linear.weight_mask.sum(dim=1) == 2).all().item()
        True
    """

    # the pattern is over whole runs: torch's container must hand it the whole tensor (and its mask so far),
    # not only the entries still unpruned as it does for "unstructured" methods
    PRUNING_TYPE = "global"

    def compute_mask(self, t: Tensor, default_mask: Tensor) -> Tensor:
        _check_shape(t.shape)
        # weights already pruned rank lowest (-1, below any magnitude): they are the first zeros of their run
        rank = torch.where(default_mask == 0, torch.full_like(t, -1.0), t.detach().abs())
        return default_mask * _mask_of_ranks(rank, default_mask.dtype)

    @classmethod
    def apply(cls, module: nn.Module, name: str, importance_scores: Optional[Tensor] = None  # type: ignore[override]
              ) -> "SemiStructured24":
        """Prune ``module.<name>`` in place with a forward pre-hook, like torch's own methods."""
        return super().apply(module, name, importance_scores=importance_scores)


@register_method
class SemiStructuredMethod(FineGrainedMethod):
    """``"2:4"``: two of every four consecutive weights of each Linear layer zeroed (sparse tensor cores); data-free.

    A layer is pruned to exactly half zeros or left dense: the only level is 0.5. Its speed
    comes only on GPUs with sparse tensor cores, after :func:`prunekit.export.to_semi_structured`.
    What it masks and how sparsity is counted are fine-grained pruning's (one weight tensor, its zeros).

    Example:
        >>> from prunekit.layers import conv_block
        >>> block = conv_block(nn.Sequential(nn.Linear(8, 4)), "0")
        >>> [mask.mean().item() for mask in SemiStructuredMethod().mask_maker(block, None)(0.5)]
        [0.5]
    """

    name = "2:4"
    layer_types = (nn.Linear,)
    unit = "weights"
    levels: Tuple[float, ...] = (KEPT / GROUP,)

    def max_sparsity(self, block: ConvBlock) -> float:
        return KEPT / GROUP

    def _checked(self, block: ConvBlock, layer: str, sparsity: float) -> None:
        if sparsity not in (0.0, KEPT / GROUP):
            raise ValueError(f"layer {layer!r}: sparsity {sparsity:g} is not a 2:4 level; a 2:4 layer is half "
                             "zeros (0.5) or dense (0)")
        _check_shape(block.conv.weight.shape, f"layer {layer!r}")

    def apply(self, block: ConvBlock, layer: str, sparsity: float, scores: Optional[Tensor]) -> None:
        self._checked(block, layer, sparsity)
        if sparsity:
            SemiStructured24.apply(block.conv, "weight")

    def mask_maker(self, block: ConvBlock, scores: Optional[Tensor]) -> Callable[[float], List[Tensor]]:
        weight = block.conv.weight
        name = block.conv_name

        def masks(sparsity: float) -> List[Tensor]:
            self._checked(block, name, sparsity)
            if not sparsity:
                return [torch.ones_like(weight)]
            return [semi_structured_mask(weight)]

        return masks
