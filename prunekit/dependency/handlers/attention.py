"""``nn.MultiheadAttention`` (self-attention): whole heads are removed; the heads' count is updated.

A head is one unit: its query, key and value rows of ``in_proj_weight`` (and ``in_proj_bias``), and its
columns of ``out_proj``. A head whose value rows are all zero outputs its value bias wherever it attends
(attention weights sum to 1), so it is removed and ``out_proj`` takes that constant into its bias; its query
and key rows go with it. The attention is a layer whose "output channels" are these ``3 * embed_dim`` rows,
one unit per head (``prunekit report MODEL --groups`` shows ``12/12 units removable`` for a ViT block).
The compacted module is a :class:`~prunekit.dependency.pruned_attention.PrunedMultiheadAttention`, which keeps
``embed_dim`` while it has fewer heads. Its input features are followed like an ``nn.Linear``'s; its output
(the embedding dim, through ``out_proj``) is fixed for now.

Followed: self-attention (query, key and value one tensor, passed by position) of a module with one
``in_proj_weight``, no ``bias_k``/``bias_v`` and no ``add_zero_attn``; masks and ``need_weights`` as given.

Example:
    >>> from torch import nn
    >>> from prunekit.dependency.registry import handler_of
    >>> type(handler_of(nn.MultiheadAttention(8, 2))).__name__
    'AttentionHandler'
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.fx as fx
from torch import Tensor, nn

from prunekit.dependency.flow import LAST, PAIR, Consumer, FlowTracer, Tracked, describe_node, tensor_args
from prunekit.dependency.pruned_attention import PrunedMultiheadAttention
from prunekit.dependency.registry import Handler, register_handler
from prunekit.dependency.resize import copy_training, folded_bias

__all__ = ["AttentionHandler", "resize_attention"]


def _head_dim(module: nn.Module) -> int:
    return int(getattr(module, "head_dim", module.embed_dim // module.num_heads))


def _unsupported_reason(node: fx.Node, module: nn.Module) -> Optional[str]:
    if not getattr(module, "_qkv_same_embed_dim", True) or getattr(module, "in_proj_weight", None) is None:
        return "has separate query, key and value weights (kdim/vdim); prunekit follows one in_proj_weight"
    if getattr(module, "bias_k", None) is not None or getattr(module, "add_zero_attn", False):
        return "adds bias_k/bias_v or a zero attention; prunekit follows plain attention only"
    if len(node.args) < 3 or {"query", "key", "value"} & set(node.kwargs):
        return "is not given query, key and value by position"
    query, key, value = node.args[:3]
    if not (isinstance(query, fx.Node) and query is key is value):
        return "attends to another tensor than its query (prunekit follows self-attention only)"
    return None


class AttentionHandler(Handler):
    """``nn.MultiheadAttention`` and the :class:`PrunedMultiheadAttention` ``compact`` makes of it."""

    resizable = True

    def trace(self, tracer: FlowTracer, node: fx.Node, module: Optional[nn.Module]) -> None:
        flow = tracer.flow
        out_ids = flow.new_ids(module.embed_dim)
        where = describe_node(node, tracer.modules)
        why = _unsupported_reason(node, module)
        tracked = tracer.tracked(node.args[0]) if node.args else None
        masks = [s for s in tensor_args(node)[3:] if tracer.tracked(s) is not None]
        if why is None and masks:
            why = "is given a mask computed from the channels prunekit follows"
        if why is None and tracked is not None and (tracked.layout != LAST or len(tracked.ids) != module.embed_dim):
            why = f"reads {len(tracked.ids)} channels, not its embed_dim {module.embed_dim}, on the last dim"
        if why is not None:
            tracer.unsupported(node, why)
            flow.fix(out_ids, f"{where} {why}")
            return
        if tracked is None:
            tracked = Tracked(tracer.input_ids(module.embed_dim, "features of the model's input"), LAST)
        head_dim = _head_dim(module)
        inner = module.num_heads * head_dim
        rows = flow.new_ids(3 * inner)
        for head in range(module.num_heads):
            members = [rows[part * inner + head * head_dim + d] for part in range(3) for d in range(head_dim)]
            for other in members[1:]:
                flow.union(members[0], other, f"{where} (one head: its query, key and value rows)")
        flow.producers[node.target] = rows
        flow.consumers[node.target] = Consumer(node.target, tracked.ids, LAST, node)
        flow.fix(out_ids, f"{where} writes the embedding dim through out_proj (prunekit removes its heads, "
                          "not yet the embedding dim)")
        flow.values[node] = Tracked(out_ids, PAIR)

    def channels(self, module: nn.Module) -> Tuple[int, int]:
        return module.embed_dim, module.in_proj_weight.shape[0]

    def dead_channels(self, module: nn.Module) -> Tuple[Tensor, Tensor]:
        weight = module.in_proj_weight.detach()
        dead = (weight == 0).all(dim=1)
        bias = module.in_proj_bias
        constant = bias.detach().double().clone() if bias is not None else torch.zeros(
            weight.shape[0], dtype=torch.float64, device=weight.device)
        return dead, constant

    def fold(
        self, name: str, module: nn.Module, consumer: Consumer, keep: Tensor, removed: Tensor, constant: Tensor
    ) -> Tuple[Tensor, Optional[Tensor]]:
        weight = module.in_proj_weight.detach()
        return keep.to(weight.device), weight.index_select(1, removed.to(weight.device)).double() @ constant

    def resize(
        self, module: nn.Module, keep_in: Optional[Tensor], keep_out: Optional[Tensor], fold: Optional[Tensor]
    ) -> nn.Module:
        return resize_attention(module, keep_in, keep_out, fold)


def resize_attention(
    attention: nn.Module, keep_in: Optional[Tensor], keep_rows: Optional[Tensor], fold: Optional[Tensor] = None
) -> PrunedMultiheadAttention:
    """A :class:`PrunedMultiheadAttention` of ``attention`` with the input features ``keep_in`` and the heads whose
    ``in_proj_weight`` rows are in ``keep_rows`` (``None``: all); ``fold`` [3 * inner] float64 is added to
    ``in_proj_bias`` (removed inputs' constants). A removed head's value bias is folded into ``out_proj``'s bias.

    Raises:
        ValueError: ``keep_rows`` keeps part of a head.
    """
    weight, bias = attention.in_proj_weight.detach(), attention.in_proj_bias
    bias = bias.detach() if bias is not None else None
    device, head_dim = weight.device, _head_dim(attention)
    inner = weight.shape[0] // 3
    if fold is not None and bool(fold.abs().sum() > 0):
        bias = folded_bias(bias, fold, weight.shape[0], device)
    rows = torch.arange(weight.shape[0], device=device) if keep_rows is None else keep_rows.to(device)
    heads = torch.unique(rows[rows < inner] // head_dim)
    wanted = torch.cat([part * inner + (heads.view(-1, 1) * head_dim + torch.arange(head_dim, device=device)).flatten()
                        for part in range(3)])
    if wanted.numel() != rows.numel() or not bool((torch.sort(rows).values == wanted.sort().values).all()):
        raise ValueError(f"the kept rows of {type(attention).__name__} are not whole heads (query, key and value rows "
                         f"of each kept head, {head_dim} each)")
    out_proj = attention.out_proj
    out_weight = out_proj.weight.detach()
    out_bias = out_proj.bias.detach() if out_proj.bias is not None else None
    value_columns = (heads.view(-1, 1) * head_dim + torch.arange(head_dim, device=device)).flatten()
    gone = torch.ones(inner, dtype=torch.bool, device=device)
    gone[value_columns] = False
    if bias is not None and bool(gone.any()):
        value_bias = bias.double()[2 * inner:][gone]  # what each removed head outputs, wherever it attends
        out_bias = folded_bias(out_bias, out_weight.double()[:, gone] @ value_bias, out_weight.shape[0], device)
    columns = torch.arange(weight.shape[1], device=device) if keep_in is None else keep_in.to(device)
    new = PrunedMultiheadAttention(
        int(columns.numel()), int(heads.numel()), head_dim, bias=bias is not None,
        dropout=float(getattr(attention, "dropout", 0.0)), batch_first=bool(getattr(attention, "batch_first", False)),
        device=device, dtype=weight.dtype,
    )
    with torch.no_grad():
        new.in_proj_weight.copy_(weight.index_select(0, wanted).index_select(1, columns))
        if bias is not None:
            new.in_proj_bias.copy_(bias.index_select(0, wanted).to(weight.dtype))
        new.out_proj.weight.copy_(out_weight.index_select(1, value_columns))
        if out_bias is not None:
            new.out_proj.bias.copy_(out_bias.to(out_weight.dtype))
    copy_training(new.out_proj, out_proj)
    return copy_training(new, attention)


_ATTENTION = AttentionHandler()
for _op in (nn.MultiheadAttention, PrunedMultiheadAttention):
    register_handler(_op, _ATTENTION)
