"""Recover what pruning costs without labels: distil the dense teacher into the pruned student.

The student learns to reproduce the teacher's outputs (or the outputs of named
layers) on unlabelled input batches. Pruned weights stay exactly zero: through
torch's reparametrization when the student has one (the mask multiplies every
forward), and by re-applying the zero pattern after each optimiser step for a
finalized student. Held-out batches are scored as training goes and the student
is left at its best point, never worse than it started.

Example:
    >>> teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)).eval()
    >>> student = prunekit.finalize(prunekit.apply_plan(prunekit.copy_model(teacher), {"0": 0.5}))
    >>> history = recover(student, teacher, [torch.rand(2, 3, 8, 8)] * 3, steps=4, progress=False)
    >>> history.best_distortion <= history.distortion[0]
    True
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

import prunekit  # noqa: F401  (the docstring example uses it)
from prunekit._rollback import eval_mode
from prunekit.io.files import PathLike
from prunekit.defaults import DEFAULT_LR
from prunekit.layers import captured_outputs
from prunekit.plans import apply_plan, copy_model
from prunekit.plotting import new_figure, save_png
from prunekit.progress import progress_bar
from prunekit.training.schedules import GradualPruner
from prunekit.sensitivity.metrics import relative_distance

__all__ = ["DEFAULT_LR", "GRADUAL_SHARE", "RecoveryHistory", "plot_recovery", "prune_and_recover", "recover"]



@dataclass
class RecoveryHistory:
    """What :func:`recover` did: held-out distortion at each evaluated step, and the step kept.

    ``steps_done`` of ``steps_planned`` optimiser steps ran (fewer when interrupted);
    ``rest_pruned_at_once``: a gradual schedule was interrupted before it reached the plan, and
    :func:`prune_and_recover` applied the rest at once.
    """

    steps: List[int] = field(default_factory=list)
    train_loss: List[float] = field(default_factory=list)
    distortion: List[float] = field(default_factory=list)
    best_step: int = 0
    best_distortion: float = float("inf")
    interrupted: bool = False
    pruned_distortion: float = float("nan")
    steps_done: int = 0
    steps_planned: int = 0
    rest_pruned_at_once: bool = False

    def to_dict(self) -> Dict[str, Any]:
        return {"steps": self.steps, "train_loss": self.train_loss, "held_out_distortion": self.distortion,
                "best_step": self.best_step, "best_distortion": self.best_distortion,
                "interrupted": self.interrupted, "pruned_distortion": self.pruned_distortion,
                "steps_done": self.steps_done, "steps_planned": self.steps_planned}

    def plot(self, path: PathLike, title: Optional[str] = None) -> Any:
        """Write the held-out distortion against the step as a PNG (see :func:`plot_recovery`)."""
        return plot_recovery({"recover": self}, path, title=title)


def plot_recovery(
    histories: Mapping[str, RecoveryHistory], path: PathLike, title: Optional[str] = None,
    references: Optional[Mapping[str, float]] = None,
) -> Any:
    """Held-out distortion against the step for each run in ``histories`` (the kept step circled), as a PNG.

    Args:
        histories: label -> :class:`RecoveryHistory`.
        path: the PNG to write (atomically).
        references: label -> a distortion drawn as a dashed line (e.g. ``{"one-shot": 0.50}``).

    Returns:
        The matplotlib Figure.

    Example:
        >>> history = RecoveryHistory([0, 10, 20], [float("nan"), 0.3, 0.2], [0.5, 0.4, 0.45], 10, 0.4)
        >>> figure = plot_recovery({"recover": history}, "recovery.png", references={"one-shot": 0.5})
        >>> open("recovery.png", "rb").read(4)[1:]
        b'PNG'
    """
    if not histories:
        raise ValueError("histories is empty; pass at least one {label: RecoveryHistory}")
    figure = new_figure(6.4, 4.0)
    ax = figure.subplots()
    for label, history in histories.items():
        line = ax.plot(history.steps, history.distortion, marker="o", markersize=2.5, label=label)[0]
        if history.best_step in history.steps:
            ax.plot([history.best_step], [history.best_distortion], marker="o", markersize=9, fillstyle="none",
                    color=line.get_color(), linestyle="none")
    for label, value in (references or {}).items():
        ax.axhline(value, linestyle="--", color="gray", linewidth=1)
        ax.annotate(label, (0, value), textcoords="offset points", xytext=(4, 3), fontsize=8, color="gray")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out distortion vs the dense model")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Recovery by distillation (circle: the state kept)", fontsize=10)
    save_png(figure, path)
    return figure


def _outputs(model: nn.Module, x: Tensor, layers: Optional[Sequence[str]]) -> List[Tensor]:
    if layers is None:
        out = model(x)
        return [out] if isinstance(out, Tensor) else [t for t in out if isinstance(t, Tensor)]
    with captured_outputs(model, layers) as captured:
        model(x)
    return [captured[name] for name in layers]


def _distortion(student: nn.Module, teacher: nn.Module, batches: Sequence[Tensor], layers: Optional[Sequence[str]]) -> float:
    """Mean over outputs of ``||student - teacher|| / ||teacher||`` on ``batches`` (float64 sums)."""
    errors: Optional[Tensor] = None
    norms: Optional[Tensor] = None
    with torch.no_grad():
        for x in batches:
            s, t = _outputs(student, x, layers), _outputs(teacher, x, layers)
            e = torch.stack([(a.double() - b.double()).pow(2).sum() for a, b in zip(s, t)])
            n = torch.stack([b.double().pow(2).sum() for b in t])
            errors = e if errors is None else errors + e
            norms = n if norms is None else norms + n
    assert errors is not None and norms is not None
    distances = [relative_distance(e, n) for e, n in zip(errors.tolist(), norms.tolist())]
    return sum(distances) / len(distances)


def _zero_masks(student: nn.Module) -> List[tuple]:
    """For plain (finalized) conv/linear weights: (parameter, where it is zero), to keep those zeros."""
    masks = []
    for module in student.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and "weight" in module._parameters:
            weight = module._parameters["weight"]
            if weight is not None and bool((weight == 0).any()):
                masks.append((weight, weight.detach() != 0))
    return masks


def _load_best(student: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load a kept state, first giving the student the pruning reparametrizations the state has.

    The one-shot state (the plan applied at once) carries ``weight_orig``/``weight_mask``; a
    gradual student interrupted before its pruner's first step has plain weights still.
    """
    from torch.nn.utils import prune

    for key in state:
        if not key.endswith("_orig"):
            continue
        module_name, _, name = key[: -len("_orig")].rpartition(".")
        module = student.get_submodule(module_name)
        if name + "_orig" not in module._parameters and name in module._parameters:
            prune.identity(module, name)  # a mask of ones, which the state's mask then replaces
    student.load_state_dict(state)


def recover(
    student: nn.Module,
    teacher: nn.Module,
    data: Iterable[Tensor],
    steps: int,
    *,
    lr: float = DEFAULT_LR,
    layers: Optional[Sequence[str]] = None,
    held_out: Optional[Sequence[Tensor]] = None,
    eval_every: int = 10,
    pruner: Optional[GradualPruner] = None,
    autocast: bool = False,
    progress: bool = True,
    on_estimate: Optional[Callable[[float, float], None]] = None,
) -> RecoveryHistory:
    """Train ``student`` to match ``teacher`` on ``data`` for ``steps`` Adam steps; keep its best held-out state.

    Args:
        student: the pruned model (trained in place; its zero pattern is kept exactly).
        teacher: the dense model; frozen and left unchanged.
        data: input batches (no labels), cycled.
        steps: optimiser steps.
        lr: Adam's learning rate.
        layers: module names whose outputs are matched (default: the model output).
        held_out: batches to score on (default: the last fifth of ``data``, at least one batch,
            when ``data`` has two or more; else ``data`` itself, which then proves nothing).
        eval_every: steps between held-out evaluations (the last step is always evaluated).
        pruner: a :class:`~prunekit.training.schedules.GradualPruner` on ``student``, stepped before each
            optimiser step; only states at the plan's final sparsity can be kept as best, and the
            plan applied at once (one-shot, step 0) is one of them, so the result is never worse
            than one-shot pruning on ``held_out``.
        autocast: run the forwards under ``torch.autocast`` of the student's device (fp32 losses).
        progress: a progress bar on stderr.
        on_estimate: called once, after the first optimiser step, with ``(seconds of that step,
            estimated seconds for the whole run)``, evaluations included (e.g. to say how long
            a CPU run will take before most of it is spent).

    Returns:
        A :class:`RecoveryHistory`. Both models run in eval mode (BatchNorm statistics frozen);
        their train/eval flags come back. Ctrl-C stops the training early: the student is left
        at its best state so far and ``history.interrupted`` is set.
    """
    batches = list(data)
    if not batches:
        raise ValueError("data is empty; pass at least one batch of inputs")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps!r} must be an int >= 0")
    if not (lr > 0):
        raise ValueError(f"lr={lr!r} must be > 0")
    if held_out is None:
        if len(batches) >= 2:
            cut = max(1, len(batches) // 5)
            batches, held_out = batches[:-cut], batches[-cut:]
        else:
            held_out = batches
    run = _Distillation(student, teacher, batches, list(held_out), layers, lr, pruner, autocast, eval_every, steps)
    teacher_flags = [(p, p.requires_grad) for p in teacher.parameters()]
    teacher_state = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
    try:
        for p, _ in teacher_flags:
            p.requires_grad_(False)
        with eval_mode(student), eval_mode(teacher):
            try:  # Ctrl-C anywhere here (even in the first evaluation) keeps the best state so far
                run.train(progress, on_estimate)
            except KeyboardInterrupt:
                run.history.interrupted = True  # the caller sees the flag
    finally:
        for p, flag in teacher_flags:
            p.requires_grad_(flag)
        if run.best_state is not None:
            _load_best(student, run.best_state)
        for key, value in teacher.state_dict().items():
            assert torch.equal(value, teacher_state[key]), "recover changed the teacher: a prunekit bug"
    return run.history


class _Distillation:
    """One :func:`recover` run: the optimiser, the zeros kept, the held-out evaluations and the best state."""

    def __init__(
        self, student: nn.Module, teacher: nn.Module, batches: List[Tensor], held: List[Tensor],
        layers: Optional[Sequence[str]], lr: float, pruner: Optional[GradualPruner], autocast: bool,
        eval_every: int, steps: int,
    ) -> None:
        self.student, self.teacher, self.batches, self.held, self.layers = student, teacher, batches, held, layers
        self.pruner, self.autocast, self.eval_every, self.steps = pruner, autocast, eval_every, steps
        self.device = next(student.parameters()).device
        self.optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
        self.zeros = _zero_masks(student)
        self.history = RecoveryHistory(steps_planned=steps)
        self.best_state: Optional[Dict[str, Tensor]] = None

    def evaluate(self, step: int, loss: float) -> None:
        """Score the student on the held-out batches; keep its state when it is the best so far (and eligible)."""
        value = _distortion(self.student, self.teacher, self.held, self.layers)
        self.history.steps.append(step)
        self.history.train_loss.append(loss)
        self.history.distortion.append(value)
        eligible = self.pruner is None or self.pruner.done  # only states at the plan's final sparsity
        if eligible and value < self.history.best_distortion:
            self.history.best_distortion, self.history.best_step = value, step
            self.best_state = copy.deepcopy(self.student.state_dict())

    def one_shot_candidate(self) -> None:
        """The plan applied at once is a candidate too: gradual + recover is never worse than one-shot."""
        pruner = self.pruner
        assert pruner is not None
        shot = copy.deepcopy(self.student)
        apply_plan(shot, pruner.plan, method=pruner.method)
        self.history.pruned_distortion = _distortion(shot, self.teacher, self.held, self.layers)
        self.history.best_distortion, self.history.best_step = self.history.pruned_distortion, 0
        self.best_state = copy.deepcopy(shot.state_dict())

    def step(self, step: int) -> None:
        """One Adam step of distillation on the next batch; the zeros are put back after it."""
        if self.pruner is not None:
            self.pruner.step()  # its masks keep their own zeros; `zeros` still holds the finalized ones
        x = self.batches[(step - 1) % len(self.batches)].to(self.device)
        with torch.no_grad():
            targets = _outputs(self.teacher, x, self.layers)
        with torch.autocast(self.device.type, enabled=self.autocast):
            outputs = _outputs(self.student, x, self.layers)
        loss = sum(((o.float() - t.float()).pow(2).mean() / t.float().pow(2).mean().clamp_min(1e-12))
                   for o, t in zip(outputs, targets))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            for weight, keep in self.zeros:
                weight.mul_(keep)
        if step % self.eval_every == 0 or step == self.steps:
            self.evaluate(step, float(loss.detach()))

    def train(self, progress: bool, on_estimate: Optional[Callable[[float, float], None]]) -> None:
        started = time.perf_counter()
        self.evaluate(0, float("nan"))
        evaluation_seconds = time.perf_counter() - started
        if self.pruner is None:
            self.history.pruned_distortion = self.history.distortion[0]
        else:
            self.one_shot_candidate()
        with progress_bar(self.steps, "recovering", progress) as tick:
            for step in range(1, self.steps + 1):
                started = time.perf_counter()
                self.step(step)
                self.history.steps_done = step
                if step == 1 and on_estimate is not None:
                    step_seconds = time.perf_counter() - started
                    evaluations = len(range(self.eval_every, self.steps + 1, self.eval_every))
                    evaluations += self.steps % self.eval_every != 0
                    on_estimate(step_seconds, step_seconds * self.steps + evaluation_seconds * evaluations)
                tick()


#: The share of the recovery steps over which ``gradual`` pruning reaches the plan (Zhu & Gupta's AGP, cubic).
GRADUAL_SHARE = 0.75


def prune_and_recover(
    model: nn.Module,
    plan: Mapping[str, float],
    data: Iterable[Tensor],
    steps: int,
    *,
    method: Any = "fine-grained",
    gradual: bool = False,
    lr: float = DEFAULT_LR,
    held_out: Optional[Sequence[Tensor]] = None,
    progress: bool = True,
    on_estimate: Optional[Callable[[float, float], None]] = None,
) -> RecoveryHistory:
    """Prune ``model`` to ``plan`` and win back what it costs by distilling its dense self into it (what ``prunekit
    prune --recover-steps`` runs).

    The dense model is copied as the teacher first. With ``gradual``, the plan is reached on a cubic
    schedule over the first :data:`GRADUAL_SHARE` of the steps (masks updated ten times), else it is
    applied at once before training. ``method``: a method name or a prepared method object (a
    channel plan's statistics travel with it). Ctrl-C stops the training early
    (``history.interrupted``); a schedule that had not reached the plan then has the rest applied at
    once, so ``model`` always ends pruned to ``plan``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)).eval()
        >>> history = prune_and_recover(model, {"0": 0.5}, [torch.rand(2, 3, 8, 8)] * 3, steps=4, gradual=True,
        ...                             progress=False)
        >>> float((model[0].weight == 0).float().mean()), history.best_distortion <= history.pruned_distortion
        (0.5, True)
    """
    teacher = copy_model(model).eval()
    pruner = None
    if gradual:
        end = max(1, int(steps * GRADUAL_SHARE))
        pruner = GradualPruner(model, plan, start_step=0, end_step=end, frequency=max(1, end // 10), method=method)
    else:
        apply_plan(model, plan, method=method)
    history = recover(model, teacher, data, steps, lr=lr, held_out=held_out, pruner=pruner, progress=progress,
                      on_estimate=on_estimate)
    if pruner is not None and not pruner.done:
        if not history.interrupted:
            raise RuntimeError("the gradual schedule did not reach the plan: a prunekit bug")
        apply_plan(model, plan, method=pruner.method)  # the rest of it, at once
        history.rest_pruned_at_once = True
    return history
