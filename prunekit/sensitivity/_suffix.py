"""Running a model from the middle: a sequential model seen as a flat chain of steps.

When the convs sit in ``nn.Sequential`` containers, the model's forward is the
composition of its leaf modules in order, so the output of the dense layers
before conv ``k`` can be computed once and only the steps from ``k`` on re-run
for each sparsity. This is only done where the forward is known for certain:
plain ``nn.Sequential`` containers (nested or not, without hooks of their own)
and torchvision's ``VGG`` (``features -> avgpool -> flatten -> classifier``).
Everything else is scanned with full forwards.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

__all__ = ["Chain", "Step", "sequential_chain"]


@dataclass(frozen=True)
class Step:
    """One link of the chain: a module (or torch.flatten) called on the previous step's output."""

    name: str
    run: Callable[[Tensor], Tensor]


@dataclass
class Chain:
    """The model as ``steps[0] -> steps[1] -> ...``; ``outputs`` maps module names to the step ending them."""

    steps: List[Step] = field(default_factory=list)
    outputs: Dict[str, int] = field(default_factory=dict)

    def step_of(self, module_name: str) -> Optional[int]:
        """Index of the step that runs ``module_name`` (the step itself or one containing it)."""
        for index, step in enumerate(self.steps):
            if step.name and (module_name == step.name or module_name.startswith(step.name + ".")):
                return index
        return None

    def run(
        self, x: Tensor, start: int, stop: Optional[int] = None, capture: Iterable[str] = ()
    ) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Run steps ``start`` .. ``stop - 1`` on ``x``; return the result and copies of captured outputs."""
        stop = len(self.steps) if stop is None else stop
        wanted: Dict[int, List[str]] = {}
        for name in capture:
            wanted.setdefault(self.outputs[name], []).append(name)
        captured: Dict[str, Tensor] = {}
        for index in range(start, stop):
            x = self.steps[index].run(x)
            for name in wanted.get(index, ()):
                # A copy, since a later in-place op (ReLU(inplace=True)) may overwrite it.
                captured[name] = x.detach().clone()
        return x, captured


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or getattr(module, "_forward_hooks_with_kwargs", None)
    )


def _is_plain_sequential(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Sequential)
        and type(module).forward is nn.Sequential.forward
        and not _has_hooks(module)
    )


def _flatten(module: nn.Module, name: str, chain: Chain) -> None:
    """Append ``module`` to ``chain``, unrolling plain Sequentials into their children."""
    if _is_plain_sequential(module):
        # Not named_children(): it skips a module object met before, and a
        # Sequential that reuses one (a shared ReLU) runs it at every position.
        for child_name, child in module._modules.items():
            _flatten(child, f"{name}.{child_name}" if name else child_name, chain)
        if len(chain.steps) and len(module):
            chain.outputs[name] = len(chain.steps) - 1
    else:
        chain.steps.append(Step(name, module))
        chain.outputs[name] = len(chain.steps) - 1


def _torchvision_vgg_class() -> Optional[type]:
    # A torchvision VGG instance implies torchvision is imported; importing it
    # here for other models would cost seconds for nothing.
    module = sys.modules.get("torchvision.models.vgg")
    return getattr(module, "VGG", None)


def sequential_chain(model: nn.Module) -> Optional[Chain]:
    """Decompose ``model`` into a chain of steps, or return None when its forward is not known for sure.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 3)))
        >>> [step.name for step in sequential_chain(model).steps]
        ['0', '1.0', '1.1']
    """
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return None  # they would fire on the steps but not on the containers a full forward enters
    chain = Chain()
    vgg = _torchvision_vgg_class()
    if _is_plain_sequential(model):
        _flatten(model, "", chain)
    elif (
        vgg is not None
        and isinstance(model, vgg)
        and type(model).forward is vgg.forward
        and not _has_hooks(model)
    ):
        _flatten(model.features, "features", chain)
        _flatten(model.avgpool, "avgpool", chain)
        chain.steps.append(Step("", functools.partial(torch.flatten, start_dim=1)))
        _flatten(model.classifier, "classifier", chain)
    else:
        return None
    if len(chain.steps) < 2:
        return None
    chain.outputs[""] = len(chain.steps) - 1
    return chain
