"""First-order Taylor importance of output channels (Molchanov et al., "Importance Estimation for Neural
Network Pruning", CVPR 2019): how much the loss moves, to first order, when a channel is silenced.

A channel's output is silenced by zeroing the parameters that make it: the affine pair of
the BatchNorm that follows the conv (``gamma``, ``beta``), or else the conv's own weight and
bias. The output is linear in that pair, so scaling it by ``t`` changes the loss at ``t = 1``
by exactly ``sum(grad * param)`` over the pair, which equals ``sum(activation * grad of the
activation)`` over the channel (gradient x weight and gradient x activation agree). Per batch
that contribution is squared, and the squares are summed over the batches: a channel whose
removal barely moves the loss on any batch scores lowest.

The loss: with labelled batches ``(inputs, labels)`` and class logits ``[N, C]``, the
cross-entropy against the labels; without labels, the output's own first-order change
(self-distilled): ``sum(output * r)`` with a fresh standard normal ``r`` per batch (seeded),
whose squared gradient is on average the squared norm of the change of the output, what
:class:`~prunekit.sensitivity.OutputDistortion` measures.

Example:
    >>> from prunekit.methods.registry import get_method
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    >>> scores = taylor_importance(model, [torch.randn(2, 3, 8, 8)])
    >>> scores["0"].shape
    torch.Size([4])
    >>> method = get_method("taylor").prepare(model, [torch.randn(2, 3, 8, 8)])
    >>> from prunekit.plans import apply_plan
    >>> int((apply_plan(model, {"0": 0.5}, method=method)[0].weight.flatten(1) == 0).all(1).sum())
    2
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from prunekit.layers import CHANNEL_LAYER_TYPES, channel_tensor_names, conv_block, resolve_layers
from prunekit.methods.channel import ChannelMethod
from prunekit.methods.registry import register_method
from prunekit.progress import progress_bar

__all__ = ["TaylorMethod", "taylor_importance"]


def _gate(model: nn.Module, layer: str) -> List[Tuple[nn.Module, str]]:
    """The parameters whose zeroing silences ``layer``'s output channels: its BatchNorm's affine pair, else its own."""
    block = conv_block(model, layer)
    if block.batchnorm is not None and block.batchnorm.affine:
        return [(block.batchnorm, "weight"), (block.batchnorm, "bias")]
    return [(block.conv, name) for name in channel_tensor_names(block.conv)]


def _split(batch: Any) -> Tuple[Tensor, Optional[Tensor]]:
    if isinstance(batch, (tuple, list)):
        if not batch or not isinstance(batch[0], Tensor):
            raise TypeError("a batch is a tensor or an (inputs, labels) pair of tensors")
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        return batch[0], labels
    if not isinstance(batch, Tensor):
        raise TypeError(f"a batch is a tensor or an (inputs, labels) pair, got {type(batch).__name__}")
    return batch, None


def _tensors(output: Any) -> List[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for value in output.values() for t in _tensors(value)]
    if isinstance(output, (tuple, list)):
        return [t for value in output for t in _tensors(value)]
    return []


def _loss(output: Any, labels: Optional[Tensor], generator: torch.Generator) -> Tensor:
    """Cross-entropy against ``labels`` (class logits), else the output projected on a random direction."""
    if labels is not None:
        if not (isinstance(output, Tensor) and output.dim() == 2 and labels.dim() == 1
                and not labels.is_floating_point() and labels.shape[0] == output.shape[0]):
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(
                f"labelled batches need class logits [N, C] and integer labels [N]; the model gives {shape} "
                "for labels of shape " + str(tuple(labels.shape)) + ": pass the inputs alone (the loss is then "
                "the output's own change)"
            )
        return nn.functional.cross_entropy(output.float(), labels.to(output.device))
    tensors = [t for t in _tensors(output) if t.is_floating_point()]
    if not tensors:
        raise ValueError(f"the model's output ({type(output).__name__}) holds no floating-point tensor to score")
    total = torch.zeros((), dtype=torch.float32, device=tensors[0].device)
    for tensor in tensors:
        direction = torch.randn(tensor.shape, generator=generator, dtype=torch.float32).to(tensor.device)
        total = total + (tensor.float() * direction).sum()
    return total


@contextlib.contextmanager
def _gradients_on(parameters: Sequence[Tensor]) -> Iterator[None]:
    """Let autograd reach ``parameters`` (their ``requires_grad`` restored after; their ``.grad`` never touched)."""
    before = [p.requires_grad for p in parameters]
    try:
        for p in parameters:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(parameters, before):
            p.requires_grad_(flag)


def taylor_importance(
    model: nn.Module, batches: Iterable[Any], layers: Optional[Iterable[str]] = None, seed: int = 0,
    progress: bool = False,
) -> Dict[str, Tensor]:
    """Each conv's per-channel first-order Taylor importance (float32 ``[C]``, lowest pruned first), on ``batches``.

    ``batches``: tensors, or ``(inputs, labels)`` pairs (see the module docstring for the loss);
    ``layers``: conv or ``nn.Linear`` names (default: every conv). The model runs in eval mode; its parameters,
    their ``.grad``, ``requires_grad`` and the train/eval flags are left as they were.

    Raises:
        ValueError: no batch, or labels that do not fit the output.
    """
    convs = list(resolve_layers(model, None if layers is None else list(layers), CHANNEL_LAYER_TYPES,
                                default_types=(nn.Conv2d,)))
    gates = {layer: _gate(model, layer) for layer in convs}
    parameters = list(dict.fromkeys(getattr(m, n) for pairs in gates.values() for m, n in pairs))
    device = next(iter(model.parameters())).device
    totals = {layer: torch.zeros(getattr(*gates[layer][0]).shape[0], dtype=torch.float64) for layer in convs}
    generator = torch.Generator().manual_seed(seed)
    flags = {module: module.training for module in model.modules()}
    data = list(batches)
    if not data:
        raise ValueError("batches is empty: pass at least one batch of inputs (or (inputs, labels) pairs)")
    try:
        model.eval()
        with torch.enable_grad(), _gradients_on(parameters), progress_bar(len(data), "Taylor importance",
                                                                           progress) as tick:
            for batch in data:
                inputs, labels = _split(batch)
                loss = _loss(model(inputs.to(device)), labels, generator)
                grads = dict(zip(parameters, torch.autograd.grad(loss, parameters, allow_unused=True)))
                for layer, pairs in gates.items():
                    change = torch.zeros_like(totals[layer])
                    for module, name in pairs:
                        value, grad = getattr(module, name), grads[getattr(module, name)]
                        if grad is not None:
                            product = grad.detach().float() * value.detach().float()
                            change += product.flatten(1).sum(1).double().cpu() if product.dim() > 1 else product.double().cpu()
                    totals[layer] += change.pow(2)
                tick()
    finally:
        for module, flag in flags.items():
            module.train(flag)
    return {layer: values.float() for layer, values in totals.items()}


@register_method
class TaylorMethod(ChannelMethod):
    """``"taylor"``: whole output channels whose first-order Taylor importance (gradient x weight) is lowest.

    Molchanov et al. 2019: a channel scores the squared first-order change of the loss when it is
    silenced, summed over a few batches (:func:`taylor_importance`), labelled (cross-entropy) or not
    (the output's own change). Channel groups, masks and sparsities are the ``"channel"`` method's;
    only the scores differ. :meth:`prepare` computes them with one backward pass per batch.

    Example:
        >>> from prunekit.methods.registry import get_method
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        >>> sorted(get_method("taylor").prepare(model, [torch.randn(2, 3, 8, 8)]).data)
        ['0']
    """

    name = "taylor"
    needs_statistics = False
    needs_data = True
    data_kind = "first-order Taylor importance (gradient x weight)"
    default_options: Dict[str, Any] = {}

    def prepare(
        self, model: nn.Module, batches: Iterable[Any], layers: Optional[Iterable[str]] = None, progress: bool = False
    ) -> "TaylorMethod":
        """A copy owning the importance of every conv of the groups of ``layers`` (default: every conv), on ``batches``."""
        importance = taylor_importance(model, batches, self.data_layers(model, layers), progress=progress)
        return self.with_data(importance)  # type: ignore[return-value]

    def member_scores(self, model: nn.Module, blocks: Mapping[str, Any]) -> Dict[str, Tensor]:
        if self.data is None:
            raise ValueError("method='taylor' needs gradients: pass method=get_method('taylor').prepare(model, batches)")
        missing = [layer for layer in self.statistics_layers(blocks) if layer not in self.data]
        if missing:
            raise KeyError(f"the Taylor importance lacks layer {missing[0]!r}: prepare the method with layers "
                           f"including it (get_method('taylor').prepare(model, batches, layers=[...]))")
        return {layer: self.data[layer] for layer in self.statistics_layers(blocks)}
