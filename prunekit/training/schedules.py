"""Gradual pruning: raise each layer's sparsity step by step during training (AGP, Zhu & Gupta 2017).

Zhu & Gupta, "To prune, or not to prune" (2017): from the initial sparsity ``s_i``
to the final ``s_f`` over ``n`` pruning steps of ``frequency`` training steps from
``t0``,

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * frequency)) ** 3

for ``t = t0, t0 + frequency, ..., t0 + n * frequency`` (the cubic schedule); also
``"linear"`` and ``"one-shot"`` (the final sparsity at ``t0``). Each update goes
through :func:`prunekit.apply_plan`, whose plans are final sparsities, so the
model is an ordinary torch-pruned model at every step.

Example:
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))
    >>> pruner = GradualPruner(model, {"0": 0.8}, start_step=0, end_step=10, frequency=2)
    >>> for _ in range(10):
    ...     _ = pruner.step()
    >>> round(pruner.sparsity("0"), 2)
    0.8
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional

import torch  # noqa: F401  (the docstring examples use it)
from torch import nn

from prunekit.methods.base import PruningMethod
from prunekit.methods.registry import prepared_method
from prunekit.plans import apply_plan, check_plan

__all__ = ["SCHEDULES", "GradualPruner", "scheduled_sparsity"]

SCHEDULES = ("cubic", "linear", "one-shot")


def scheduled_sparsity(
    step: int, initial: float, final: float, start_step: int, end_step: int, frequency: int = 1, schedule: str = "cubic"
) -> float:
    """The sparsity the schedule prescribes after training step ``step``.

    Example:
        >>> round(scheduled_sparsity(5, 0.0, 0.8, 0, 10), 6)  # halfway on the cubic schedule
        0.7
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
    if step < start_step:
        return initial
    if schedule == "one-shot" or step >= end_step:
        return final
    # Updates happen every `frequency` steps: the schedule holds between them.
    done = (step - start_step) // frequency * frequency
    progress = done / (end_step - start_step)
    if schedule == "linear":
        return initial + (final - initial) * progress
    return final + (initial - final) * (1.0 - progress) ** 3


def _current_sparsity(model: nn.Module, layer: str, pruning: PruningMethod) -> float:
    return pruning.current_sparsity(pruning.block(model, layer))


class GradualPruner:
    """Prune ``model`` towards ``plan`` over training steps; call :meth:`step` once per training step.

    Args:
        model: the model being trained (pruned in place, through torch's reparametrization).
        plan: conv layer name -> final sparsity (as for :func:`prunekit.apply_plan`).
        start_step, end_step: the first step that prunes and the step that reaches the plan.
        frequency: training steps between two updates of the masks.
        schedule: ``"cubic"`` (AGP), ``"linear"`` or ``"one-shot"``.
        method, stats, criterion: as for :func:`prunekit.apply_plan` (a channel plan needs a prepared method,
            or ``stats``); :attr:`method` is then the method object, owning its data.

    Each layer starts from its current sparsity (the fraction of zero weights, or of
    dead channels for ``method="channel"``), measured at construction.
    """

    def __init__(
        self,
        model: nn.Module,
        plan: Mapping[str, float],
        start_step: int,
        end_step: int,
        frequency: int = 1,
        schedule: str = "cubic",
        method: Any = "fine-grained",
        stats: Optional[Mapping[str, Any]] = None,
        *,
        criterion: Optional[str] = None,
    ) -> None:
        for name, value in (("start_step", start_step), ("end_step", end_step), ("frequency", frequency)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}={value!r} must be an int")
        if start_step < 0 or end_step <= start_step:
            raise ValueError(f"need 0 <= start_step < end_step, got start_step={start_step}, end_step={end_step}")
        if frequency < 1:
            raise ValueError(f"frequency={frequency} must be >= 1 (training steps between mask updates)")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
        self.model = model
        self.method: PruningMethod = prepared_method(method, stats, criterion)
        if self.method.levels is not None:
            raise ValueError(f"method {self.method.name!r} prunes only to {self.method.levels} (a fixed pattern): a "
                             "schedule has no sparsities between; apply the plan at once (prunekit.apply_plan) "
                             "and recover (prunekit.recover)")
        self.plan = check_plan(model, plan, self.method.layer_types)
        self.start_step, self.end_step, self.frequency, self.schedule = start_step, end_step, frequency, schedule
        self.initial = {layer: _current_sparsity(model, layer, self.method) for layer in self.plan}
        for layer, final in self.plan.items():
            if final < self.initial[layer] - 1e-12:
                raise ValueError(
                    f"layer {layer!r} is already {self.initial[layer]:.1%} sparse, above its planned {final:.1%}; "
                    "a schedule only raises sparsity"
                )
        self.step_count = 0
        self.applied: Dict[str, float] = dict(self.initial)

    def targets(self, step: Optional[int] = None) -> Dict[str, float]:
        """Each layer's scheduled sparsity after ``step`` (default: the steps taken so far)."""
        step = self.step_count if step is None else step
        return {
            layer: scheduled_sparsity(step, self.initial[layer], final, self.start_step, self.end_step,
                                      self.frequency, self.schedule)
            for layer, final in self.plan.items()
        }

    def step(self) -> Dict[str, float]:
        """Advance one training step; prune where the schedule rose. Returns the layers' sparsities now."""
        self.step_count += 1
        raised = {layer: value for layer, value in self.targets().items() if value > self.applied[layer] + 1e-12}
        if raised:
            apply_plan(self.model, raised, method=self.method)
            self.applied.update(raised)
        return dict(self.applied)

    @property
    def done(self) -> bool:
        """True once the plan is reached."""
        return self.step_count >= self.end_step

    def sparsity(self, layer: str) -> float:
        """The measured sparsity of ``layer`` now (zero weights, or dead channels for channel plans)."""
        return _current_sparsity(self.model, layer, self.method)

    def state_dict(self) -> Dict[str, Any]:
        """What resuming needs besides the model's own state: step, initial and applied sparsities, settings."""
        return {
            "step": self.step_count, "initial": dict(self.initial), "applied": dict(self.applied),
            "plan": dict(self.plan), "start_step": self.start_step, "end_step": self.end_step,
            "frequency": self.frequency, "schedule": self.schedule, "method": self.method.name,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict` (the model's masks come from the model's own state_dict)."""
        for key in ("plan", "start_step", "end_step", "frequency", "schedule", "method"):
            mine = self.state_dict()[key]
            if state.get(key) != mine and not (key == "plan" and _same_plan(state.get(key), mine)):
                raise ValueError(f"the saved pruner has {key}={state.get(key)!r}, this one {mine!r}; build it alike")
        self.step_count = int(state["step"])
        self.initial = {k: float(v) for k, v in state["initial"].items()}
        self.applied = {k: float(v) for k, v in state["applied"].items()}


def _same_plan(a: Any, b: Mapping[str, float]) -> bool:
    return isinstance(a, Mapping) and a.keys() == b.keys() and all(math.isclose(a[k], b[k]) for k in b)

