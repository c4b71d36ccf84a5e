"""Physical channel removal: turn masked (or all-zero) conv channels into a smaller, faster model.

A mask makes a channel output zeros; the conv still computes them. ``compact``
builds a new model in which those channels are gone: the conv has fewer
output channels, the following BatchNorm fewer features, the next conv fewer
input channels and the first Linear after a flatten fewer input features; channels
coupled through residual additions, grouped convs and gates go together
(:mod:`prunekit.dependency.groups`).
The result is made of plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.Linear``
layers under the same names, so its speed-up is real and its ``state_dict``
keys stay recognisable.

A removed channel is not always zero downstream: after a BatchNorm that is not
masked it is the constant ``beta - gamma * mean / sqrt(var + eps)`` (then passed
through the activation). That constant is folded into the next layer's bias;
where the next conv pads with zeros the border sees fewer taps, so that conv
becomes a :class:`BorderBiasConv2d` carrying the exact per-position bias.

Equivalence holds in eval mode (BatchNorm with running statistics, dropout off),
the mode in which a pruned model is evaluated and deployed.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import Parameter

from prunekit._rollback import eval_mode
from prunekit.compact.graph import CompactionPlan, UnsupportedGraphError, plan_compaction
from prunekit.compact.report import CompactionReport, LayerCost, compaction_report, layer_costs
from prunekit.dependency import ChannelGroup, ChannelUnit, channel_groups, handler_of
from prunekit.dependency.border_bias import BorderBiasConv2d
from prunekit.measure.error import relative_error, tensors_in
from prunekit.reparametrization import copy_model, finalize

__all__ = [
    "BorderBiasConv2d",
    "ChannelGroup",
    "ChannelUnit",
    "CompactionPlan",
    "CompactionReport",
    "LayerCost",
    "UnsupportedGraphError",
    "channel_groups",
    "check_tolerance",
    "compact",
    "compact_chain",
    "compaction_problem",
    "compaction_report",
    "layer_costs",
    "plan_compaction",
]

# The self-check guards against a wrong rebuild, never against rounding: the relative error a
# correct rebuild stays under, per dtype (about 10x torch.testing's default rtol, and no less
# than the 1e-4 float32 always had). Removing channels reorders sums, which costs a few ulps
# per layer: far more in fp16/bf16 than in float32.
_CHECK_TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1.6e-1}


def check_tolerance(dtype: torch.dtype) -> float:
    """Relative L2 error above which ``compact``'s self-check calls the rebuild wrong, for ``dtype``.

    Example:
        >>> check_tolerance(torch.float32), check_tolerance(torch.float16)
        (0.0001, 0.01)
    """
    return _CHECK_TOLERANCES.get(dtype, 1e-4)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _rebuild(model: nn.Module, plan: CompactionPlan) -> None:
    """Swap in each layer's smaller copy, built by its handler (:mod:`prunekit.dependency.handlers`)."""
    modules = dict(model.named_modules())
    convs_and_linears = dict.fromkeys(list(plan.keep_out) + list(plan.keep_in))
    for name in convs_and_linears:
        module = modules[name]
        new = handler_of(module).resize(module, plan.keep_in.get(name), plan.keep_out.get(name), plan.folds.get(name))
        _set_module(model, name, new)
    for name, keep in plan.keep_channels.items():
        module = modules[name]
        _set_module(model, name, handler_of(module).resize(module, keep, keep, plan.folds.get(name)))
    for target, (keep, dim) in plan.keep_scales.items():
        owner_name, _, attribute = target.rpartition(".")
        owner = model.get_submodule(owner_name)
        old = getattr(owner, attribute)
        kept = old.detach().index_select(dim, keep.to(old.device)).clone()
        if isinstance(old, Parameter):
            setattr(owner, attribute, Parameter(kept, requires_grad=old.requires_grad))
        else:
            owner._buffers[attribute] = kept


def _eval_output(model: nn.Module, example_input: Any) -> Any:
    with torch.no_grad(), eval_mode(model):
        if isinstance(example_input, tuple):
            return model(*example_input)
        return model(example_input)


def _check_equal(reference: Any, compacted: Any) -> None:
    for expected, actual in zip(tensors_in(reference), tensors_in(compacted)):
        if expected.shape != actual.shape or not expected.is_floating_point():
            continue  # output channels removed on purpose (prune_output_channels=True)
        error = relative_error(actual, expected)
        tolerance = check_tolerance(expected.dtype)
        if not error <= tolerance:
            raise RuntimeError(
                f"compact built a model whose output differs from the original's on example_input "
                f"(relative error {error:.3g}, allowed {tolerance:g} in {expected.dtype}); this is a prunekit bug, please report it with the "
                "model definition. The input model is unchanged"
            )


def compact(
    model: nn.Module,
    example_input: Optional[Any] = None,
    *,
    prune_output_channels: bool = False,
) -> nn.Module:
    """Return a smaller copy of ``model`` with its dead conv output channels physically removed.

    A channel is dead when the conv's effective weights for it are all zero: it
    was masked (by :class:`prunekit.ChannelActivation`, ``prune.ln_structured``,
    ...) or pruned to zero. Its output then no longer depends on the input (it is
    the channel's bias, 0 when masked), so removing it and folding that constant,
    carried through the following BatchNorm and activation, into the next layer
    keeps the outputs equal in eval mode. Removed with it: its slice of the
    BatchNorm (and of a per-channel PReLU), the matching input channels of the next
    conv, and the matching input features of the first Linear after a flatten.

    The input model is not modified. The copy has its pruning reparametrizations
    removed (as :func:`prunekit.finalize` does) before it is resized.

    Coupled channels go together (see :func:`prunekit.channel_groups`): the convs that add
    into one residual stream, a depthwise or grouped conv and the conv feeding it (grouped
    convs lose whole groups), a squeeze-and-excitation gate and the channels it scales.
    A channel is removed when it is dead in every member of its unit; concatenations keep
    each producer's offsets, ``nn.Linear`` layers lose hidden units and the features of
    removed channels after a flatten, and ``nn.ConvTranspose2d`` (``groups=1``) loses input
    channels whose constants are 0 and its own dead output channels. Channels run channels-last
    through ``permute`` (ConvNeXt's blocks); a LayerNorm over the channels (``nn.LayerNorm``,
    torchvision's ``LayerNorm2d``) loses a removed channel once its weight and bias are masked
    there too (``ChannelGroup.norms``), and becomes a
    :class:`~prunekit.dependency.partial_layer_norm.PartialLayerNorm` that still counts the removed
    constants in its statistics; a per-channel parameter (a layer scale) keeps its kept values.
    Anything ``torch.fx`` can trace is accepted; channels
    that meet an operation prunekit does not follow (a reshape that mixes channels, a
    channel shuffle, a split at fixed sizes, attention) stay, and dead ones there are
    refused naming the node. To compact an encoder and a decoder together (AdaIN style
    transfer), use :func:`compact_chain`.

    Args:
        model: the (masked or finalized) model.
        example_input: optional input (or tuple of inputs); when given, the compacted
            model's output is checked against the original's on it.
        prune_output_channels: the channels of a conv that reaches the model's output
            are kept by default, so the output shape does not change; ``True`` removes
            them too (the output then has only the kept channels).

    Returns:
        A new model, in the input model's training mode, whose resized layers are plain
        ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.PReLU`` / ``nn.Linear`` (a
        :class:`BorderBiasConv2d` where a non-zero constant meets zero padding).

    Raises:
        UnsupportedGraphError (a ValueError): dead channels that cannot be removed exactly:
            dead in some members of their group only (a residual stream masked in one
            branch), or meeting an operation prunekit does not follow (a reshape, a module
            called twice); the message names the layers and the node.

    Example:
        >>> from torch.nn.utils import prune
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> _ = prune.ln_structured(model[0], "weight", amount=0.5, n=2, dim=0)
        >>> _ = prune.custom_from_mask(model[0], "bias", model[0].weight_mask[:, 0, 0, 0])
        >>> compact(model)[2].in_channels
        4
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compact expects an nn.Module, got {type(model).__name__}")
    compacted = copy_model(model)
    finalize(compacted)
    plan = plan_compaction(compacted, prune_output_channels=prune_output_channels)
    reference = _eval_output(compacted, example_input) if example_input is not None else None
    if plan.batchnorm_constants and any(module.training for module in model.modules()):
        warnings.warn(
            f"removed channels leave the BatchNorms {', '.join(repr(n) for n in plan.batchnorm_constants)} "
            "as non-zero constants, folded from its running statistics: the compacted "
            "model matches the input model in eval mode only (in training mode a BatchNorm uses batch "
            "statistics). Call model.eval() before compact to silence this, or mask the BatchNorm too "
            "(prunekit.channel_activation(..., batchnorm=bn)) so the constants are 0",
            UserWarning,
            stacklevel=2,
        )
    if not plan.empty:
        _rebuild(compacted, plan)
    if example_input is not None:
        _check_equal(reference, _eval_output(compacted, example_input))
    return compacted


def compaction_problem(model: nn.Module, *, prune_output_channels: bool = False) -> Optional[str]:
    """Why :func:`compact` would not shrink ``model``, or None when it would (nothing is built or changed).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> compaction_problem(model)
        'no channel is dead (all-zero weights): compact has nothing to remove'
    """
    copy = copy_model(model)
    finalize(copy)
    try:
        plan = plan_compaction(copy, prune_output_channels=prune_output_channels)
    except UnsupportedGraphError as err:
        return str(err)
    if plan.empty:
        if plan.pinned:
            return (f"the dead channels of {', '.join(map(repr, plan.pinned))} reach the model output and are kept "
                    "(prune_output_channels=True removes them): compact has nothing to remove")
        return "no channel is dead (all-zero weights): compact has nothing to remove"
    return None


def compact_chain(
    *models: nn.Module,
    example_input: Optional[Tensor] = None,
    prune_output_channels: bool = False,
) -> Tuple[nn.Module, ...]:
    """Compact models that run one after the other, removing channels across their boundaries.

    ``compact_chain(encoder, decoder)`` compacts ``nn.Sequential(encoder, decoder)``
    and returns the two compacted parts: the encoder's last conv loses its dead
    output channels and the decoder's first conv the matching input channels.

    AdaIN style transfer puts ``adain(content, style)`` between the two. The
    compacted pair stays exact there because AdaIN works channel by channel and
    maps a constant channel to itself: a dead encoder channel is the same
    constant ``c`` in the content and the style features (same encoder), so its
    normalised content is 0 and AdaIN outputs the style mean, ``c`` again — the
    value folded into the decoder. Any per-channel operation with that property
    can sit between the parts; one that mixes channels cannot.

    Args:
        models: the parts, in order; each takes and returns one tensor.
        example_input: optional input of the first part, to check the chained output.
        prune_output_channels: see :func:`compact` (applies to the last part's output).

    Returns:
        The compacted parts, in order. The input models are not modified.

    Example:
        >>> from torch.nn.utils import prune
        >>> encoder = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
        >>> decoder = nn.Sequential(nn.Conv2d(8, 3, 3))
        >>> _ = prune.ln_structured(encoder[0], "weight", amount=0.5, n=2, dim=0)
        >>> _ = prune.custom_from_mask(encoder[0], "bias", encoder[0].weight_mask[:, 0, 0, 0])
        >>> [m[0].weight.shape[0 if i == 0 else 1] for i, m in enumerate(compact_chain(encoder, decoder))]
        [4, 4]
    """
    if len(models) < 2:
        raise ValueError(f"compact_chain needs at least two models, got {len(models)}; use compact for one")
    for index, part in enumerate(models):
        if not isinstance(part, nn.Module):
            raise TypeError(f"part {index} of the chain is a {type(part).__name__}, not an nn.Module")
    chain = nn.Sequential(*models)
    compacted = compact(chain, example_input, prune_output_channels=prune_output_channels)
    return tuple(compacted)
