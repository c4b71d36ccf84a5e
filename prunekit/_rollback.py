"""Undo every change a failed call made to a set of modules, so no model is left half-pruned."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Iterable, Iterator, List, Tuple

import torch
from torch import nn
from torch.nn.utils import prune

__all__ = ["eval_mode", "restore_training", "rollback_on_error", "training_flags"]


def training_flags(*models: nn.Module) -> List[Tuple[nn.Module, bool]]:
    """Every module's train/eval flag, for :func:`restore_training`."""
    return [(module, module.training) for model in models for module in model.modules()]


def restore_training(flags: Iterable[Tuple[nn.Module, bool]]) -> None:
    """Put back the flags :func:`training_flags` saved (each module its own, not ``model.train(flag)``)."""
    for module, training in flags:
        module.training = training


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with every module of ``model`` in eval mode; each module's own flag comes back after.

    Example:
        >>> model = nn.Sequential(nn.BatchNorm1d(2)).train()
        >>> with eval_mode(model):
        ...     model.training
        False
        >>> model.training
        True
    """
    flags = training_flags(model)
    try:
        model.eval()
        yield model
    finally:
        restore_training(flags)


def _snapshot(module: nn.Module) -> Tuple:
    # torch's pruning only touches these four places; a PruningContainer is
    # mutated in place, so its method tuple is saved too.
    tensors = {k: v for k, v in module.__dict__.items() if isinstance(v, torch.Tensor)}
    containers = [
        (hook, hook._pruning_methods)
        for hook in module._forward_pre_hooks.values()
        if isinstance(hook, prune.PruningContainer)
    ]
    return (
        OrderedDict(module._parameters),
        OrderedDict(module._buffers),
        OrderedDict(module._forward_pre_hooks),
        tensors,
        containers,
    )


def _restore(module: nn.Module, saved: Tuple) -> None:
    params, buffers, hooks, tensors, containers = saved
    for key in [k for k, v in module.__dict__.items() if isinstance(v, torch.Tensor)]:
        if key not in tensors:
            del module.__dict__[key]
    module.__dict__.update(tensors)
    module._parameters.clear()
    module._parameters.update(params)
    module._buffers.clear()
    module._buffers.update(buffers)
    module._forward_pre_hooks.clear()
    module._forward_pre_hooks.update(hooks)
    for container, methods in containers:
        container._pruning_methods = methods


@contextlib.contextmanager
def rollback_on_error(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Restore parameters, buffers and pruning hooks of ``modules`` if the block raises.

    Mask values are not copied: pruning replaces tensors rather than writing
    into them, so keeping references is enough to restore the old state.
    """
    unique: List[nn.Module] = []
    for module in modules:
        if not any(module is seen for seen in unique):
            unique.append(module)
    saved = [(module, _snapshot(module)) for module in unique]
    try:
        yield
    except BaseException:
        for module, state in saved:
            _restore(module, state)
        raise
