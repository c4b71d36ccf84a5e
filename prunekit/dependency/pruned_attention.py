"""The attention ``compact`` builds where heads were removed: fewer heads than the embedding dim holds.

``nn.MultiheadAttention`` ties its heads to its embedding dim (``embed_dim == num_heads * head_dim``), so
an attention that lost heads but still reads and writes the model's full residual stream is not one.
:class:`PrunedMultiheadAttention` is: its projections map ``embed_dim`` features to ``num_heads * head_dim``
and back, and its forward takes ``nn.MultiheadAttention``'s arguments and returns what it returns, so the
model's own forward (torchvision's ViT: ``self.self_attention(x, x, x, need_weights=False)``) runs unchanged.
The attention handler (:mod:`prunekit.dependency.handlers.attention`) builds it.

Example:
    >>> import torch
    >>> attention = PrunedMultiheadAttention(16, num_heads=2, head_dim=4, batch_first=True)
    >>> x = torch.randn(3, 5, 16)
    >>> out, weights = attention(x, x, x, need_weights=False)
    >>> out.shape, weights
    (torch.Size([3, 5, 16]), None)
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PrunedMultiheadAttention"]


class PrunedMultiheadAttention(nn.Module):
    """Multi-head attention over ``embed_dim`` features with ``num_heads`` heads of ``head_dim`` each.

    Args:
        embed_dim: the features it reads (query, key and value alike) and writes.
        num_heads, head_dim: its heads; ``num_heads * head_dim`` need not be ``embed_dim``.
        bias: biases on the projections.
        dropout: dropout on the attention weights (training mode only).
        batch_first: inputs are [batch, sequence, features] (else [sequence, batch, features]).

    Attributes (as ``nn.MultiheadAttention`` names them): ``in_proj_weight`` [3 * num_heads * head_dim,
    embed_dim] (the query, key and value rows, in that order, each head's rows together), ``in_proj_bias``,
    ``out_proj`` (an ``nn.Linear`` from ``num_heads * head_dim`` to ``embed_dim``).

    The forward takes ``(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False)`` with ``nn.MultiheadAttention``'s meaning (a boolean mask is
    True where attention is not allowed) and returns ``(output, weights)``, ``weights`` None unless asked for.
    Without weights it runs ``torch.nn.functional.scaled_dot_product_attention``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        *,
        bias: bool = True,
        dropout: float = 0.0,
        batch_first: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for label, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("head_dim", head_dim)):
            if int(value) < 1:
                raise ValueError(f"{label} is {value}; an attention needs at least 1")
        self.embed_dim, self.num_heads, self.head_dim = int(embed_dim), int(num_heads), int(head_dim)
        if not 0.0 <= float(dropout) <= 1.0:
            raise ValueError(f"dropout is {dropout}; give a probability between 0 and 1")
        self.dropout = float(dropout)
        self.batch_first = bool(batch_first)
        factory = {"device": device, "dtype": dtype}
        inner = self.num_heads * self.head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, self.embed_dim, **factory))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner, **factory)) if bias else None
        self.out_proj = nn.Linear(inner, self.embed_dim, bias=bias, **factory)
        if self.in_proj_weight.device.type != "meta":
            nn.init.xavier_uniform_(self.in_proj_weight)

    @property
    def inner_dim(self) -> int:
        """``num_heads * head_dim``: the width of each of the query, key and value projections."""
        return self.num_heads * self.head_dim

    def _heads(self, x: Tensor, part: int) -> Tensor:
        """[B, L, embed] -> the projection ``part`` (0 query, 1 key, 2 value) as [B, heads, L, head_dim]."""
        rows = slice(part * self.inner_dim, (part + 1) * self.inner_dim)
        bias = self.in_proj_bias[rows] if self.in_proj_bias is not None else None
        projected = F.linear(x, self.in_proj_weight[rows], bias)
        return projected.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def _mask(self, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], batch: int, target: int,
              source: int, dtype: torch.dtype) -> Optional[Tensor]:
        """One additive float mask broadcastable to [B, heads, L, S] (None: attend everywhere)."""
        merged = None
        for mask, shape in ((attn_mask, None), (key_padding_mask, (batch, 1, 1, source))):
            if mask is None:
                continue
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
            else:
                mask = mask.to(dtype)
            if shape is None:  # attn_mask: [L, S] or [B * heads, L, S]
                mask = mask.view(1, 1, target, source) if mask.dim() == 2 else mask.view(batch, self.num_heads,
                                                                                         target, source)
            else:
                mask = mask.view(shape)
            merged = mask if merged is None else merged + mask
        return merged

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
        if not self.batch_first or unbatched:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, target, source = query.shape[0], query.shape[1], key.shape[1]
        q, k, v = self._heads(query, 0), self._heads(key, 1), self._heads(value, 2)
        mask = self._mask(attn_mask, key_padding_mask, batch, target, source, q.dtype)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(dim=-1)
            out = F.dropout(weights, dropout, training=self.training) @ v if dropout else weights @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        if not self.batch_first or unbatched:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
            weights = weights.squeeze(0) if weights is not None else None
        return out, weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"batch_first={self.batch_first}")
