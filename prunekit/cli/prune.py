"""``prunekit prune``: apply a plan (with the context its scan recorded), optionally recover, save the model."""

from __future__ import annotations

import contextlib
import os
import shlex
from pathlib import Path
from typing import Any, Iterator, List, Optional

import click

from prunekit.cli.errors import emit_json, library_errors, one_line
from prunekit.cli.checkpoints import architecture
from prunekit.cli.inputs import evaluation_data, recovery_batches
from prunekit.cli.options import (
    DEFAULT_IMAGE_SIZE,
    DIGITS_SIZE,
    data_options,
    configured_method,
    examples,
    json_option,
    method_options,
    model_options,
    parse_device,
    recovery_options,
    run_options,
    threads_option,
)
from prunekit.cli.paths import check_output_file, refuse_inputs
from prunekit.cli.plan_file import PlanFile, check_recorded_model, read_plan_file
from prunekit.cli.session import status
from prunekit.input_size import in_channels
from prunekit.defaults import DEFAULT_MODEL
from prunekit.methods.registry import method_names

__all__ = ["prune_command"]



class _Context:
    """Each setting from its flag, else from the plan file, else a default; notes where a flag overrides the plan."""

    def __init__(self, plan: PlanFile) -> None:
        self.plan = plan
        self.notes: List[str] = []
        self.from_plan: List[str] = []

    def pick(self, option: str, key: str, flag: Any, default: Any) -> Any:
        recorded = self.plan.context(key)
        if flag is not None:
            if recorded is not None and not _same(flag, recorded):
                self.notes.append(f"{option} {flag} overrides the plan's {recorded}")
            return flag
        if recorded is not None:
            self.from_plan.append(option)
            return recorded
        return default


@contextlib.contextmanager
def _blamed_on_plan(context: _Context) -> Iterator[None]:
    """An error about a value the plan gave (not a flag the user typed) says so, and how to override it."""
    try:
        yield
    except (ValueError, OSError) as err:
        message = one_line(err)
        option = next((o for o in context.from_plan if message.startswith(f"{o} ")), None)
        if option is None:
            raise
        raise type(err)(
            f"{option} (as --plan {context.plan.path} records it){message[len(option):]}; "
            f"pass {option} to override the plan's value"
        ) from None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str) and Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def _report(model: Any, pruning: Any, report: Any, history: Any, out: str, arch: Optional[str], size: str, layers: int,
            gradual: bool, as_json: bool, quiet: bool) -> None:
    """The sparsity report, the recovery, and what to run next (or one JSON document); exit 130 if interrupted."""
    # A checkpoint that names a factory imports code when loaded: the reader opts in, as this run did.
    trust = " --trust-checkpoint" if arch is None or ":" in arch else ""
    hints = [f"inspect it: prunekit report {shlex.quote(out)} --input-size {size}{trust}"]
    problem = None
    if pruning.unit == "channels":
        from prunekit.compact import compaction_problem

        problem = compaction_problem(model)  # said now, not discovered by compact later
        if problem is None:
            hints.append(f"remove the pruned channels for real: prunekit compact {shlex.quote(out)} --input-size {size}{trust}")
    if as_json:
        emit_json({"out": out, "arch": arch, "method": pruning.name, "report": report.to_dict(),
                   "recovery": history.to_dict() if history is not None else None, "next": hints,
                   "compact_problem": problem})
        return
    if not quiet:
        click.echo(str(report))
    if history is not None:
        _print_recovery(history, gradual)
    pickled = "; a pickled module like its source: read it back with --trust-checkpoint" if arch is None else ""
    status(quiet, f"wrote {out} ({pruning.name} pruning, {layers} layers{pickled})")
    if problem is not None:
        click.echo(f"note: compact cannot shrink this model: {problem}", err=True)
    for hint in hints:
        status(quiet, hint)
    if history is not None and history.interrupted:
        raise click.exceptions.Exit(130)


def _load(context: _Context, model_spec: str, weights: Optional[str], trust_checkpoint: bool, quiet: bool,
          seed: Optional[int] = None, image_size: Optional[int] = None) -> Any:
    from prunekit.models.zoo import load_model

    typed = "--model" not in context.from_plan
    try:
        return load_model(model_spec, weights, trust_checkpoint=trust_checkpoint, progress=not quiet,
                          factory_folder=os.getcwd() if typed else None, seed=seed, image_size=image_size)
    except FileNotFoundError as err:
        recorded = [o for o in ("--model", "--weights") if o in context.from_plan]
        if recorded:
            raise FileNotFoundError(
                f"{err}; --plan {context.plan.path} recorded {' and '.join(recorded)} at scan time: pass "
                f"{' / '.join(recorded)} to point at the file"
            ) from None
        raise


def _check_layers(model: Any, plan: PlanFile, model_spec: str, types: Any) -> None:
    from prunekit.layers import resolve_layers

    try:
        resolve_layers(model, list(plan.plan), types)
    except (KeyError, ValueError) as err:
        made_for = plan.context("model")
        if made_for is not None and not _same(made_for, model_spec):
            raise ValueError(
                f"--plan {plan.path} was made for model {made_for}, and its layers do not fit --model {model_spec} "
                f"({_message(err)}); drop --model to use the plan's model, or pass a plan scanned on {model_spec}"
            ) from None
        raise ValueError(f"--plan {plan.path} does not fit --model {model_spec}: {_message(err)}") from None


def _architecture_or_pickle(model_spec: str, trust_checkpoint: bool, out: str) -> Optional[str]:
    """The spec the saved checkpoint rebuilds from; None for a trusted pickled model (saved pickled, too)."""
    try:
        return architecture(model_spec)
    except ValueError:
        if not trust_checkpoint:
            raise
        if str(out).lower().endswith(".pksparse"):
            raise ValueError(
                f"--model {model_spec} is a pickled model, which records no architecture for a .pksparse file; "
                "write --out as a .pt file (a pickled module), or scan a --model given as a name or factory"
            ) from None
        return None


def _input_size_hint(model: Any, image_size: Optional[int]) -> str:
    """``CxHxW`` of the inputs the model was scanned on, for the printed report/compact commands."""
    channels = in_channels(model)
    side = image_size or (DIGITS_SIZE if channels == 1 else DEFAULT_IMAGE_SIZE)
    return f"{channels}x{side}x{side}"


def _message(err: BaseException) -> str:
    return str(err.args[0] if isinstance(err, KeyError) and err.args else err)


@click.command(
    "prune",
    short_help="Apply a sparsity plan (and recover) and save the pruned model.",
    epilog=examples(
        "prunekit prune --plan prunekit-scan/plan.json --out pruned.pt",
        "prunekit prune --plan prunekit-scan/plan.json --out pruned.pksparse   # size follows the sparsity",
        "prunekit prune --plan hed-scan/plan.json --recover-steps 200 --recover-data ./photos --out hed.pksparse",
        "prunekit prune --model vgg11 --weights vgg11.pth --plan plan.json --out vgg11-pruned.pt",
    ),
)
@model_options(from_plan=True)
@click.option("--plan", "plan_path", required=True, metavar="PLAN.json",
              help="A plan.json from prunekit scan (it records model, weights and data), or a JSON mapping "
              "{layer: sparsity}.")
@method_options(from_plan=True)
@data_options(from_plan=True)
@recovery_options("After pruning", "--data, i.e. the plan's data")
@click.option("--recover-plot", default=None, metavar="PATH.png",
              help="Also draw the held-out distortion against the recovery step (the state kept circled).")
@click.option("--gradual", is_flag=True,
              help="Prune gradually during recovery (AGP cubic schedule over the first 3/4 of the steps) "
              "instead of all at once before it.")
@click.option("--out", required=True, metavar="PATH",
              help="Where to write the pruned checkpoint: .pt (torch) or .pksparse (prunekit's sparse format, "
              "whose size follows the sparsity).")
@run_options(seed_from_plan=True)
@threads_option
@json_option("the sparsity report")
@library_errors
def prune_command(
    model_spec: Optional[str], weights: Optional[str], trust_checkpoint: bool, plan_path: str, method: Optional[str],
    criterion: Optional[str], data: Optional[str], image_size: Optional[int], batch_size: Optional[int],
    recover_steps: int, recover_data: Optional[str], held_out: Optional[str], recover_lr: float,
    recover_batch_size: int, recover_plot: Optional[str], gradual: bool, out: str, device: str, seed: Optional[int],
    quiet: bool, as_json: bool,
) -> None:
    """Apply a per-layer sparsity plan and save the finalized model.

    With a plan.json from `prunekit scan`, the model, weights, data, image
    size, batch size and seed the scan used are taken from the file (a flag
    overrides one, and a note says so); --trust-checkpoint is never taken from
    a file. The pruned zeros are made permanent (no _orig/_mask left) and the
    model is saved as a prunekit checkpoint that `prunekit report` and
    prunekit.models.zoo.load_model read safely (.pksparse: the sparse format).
    --method channel measures activation statistics on --data first.
    --recover-steps N then wins back quality by label-free distillation.

    """
    plan = read_plan_file(plan_path)
    context = _Context(plan)
    model_spec = context.pick("--model", "model", model_spec, DEFAULT_MODEL)
    if "--model" in context.from_plan:
        check_recorded_model(plan, model_spec, trust_checkpoint)
    weights = context.pick("--weights", "weights", weights, None)
    data = context.pick("--data", "data", data, "builtin")
    image_size = context.pick("--image-size", "image_size", image_size, None)
    batch_size = context.pick("--batch-size", "batch_size", batch_size, None)
    seed = context.pick("--seed", "seed", seed, 0)
    method = method or plan.meta.get("method") or "fine-grained"
    if method not in method_names():
        raise ValueError(f"--plan {plan_path} names method {method!r}; pass --method {' or '.join(method_names())}")
    pruning = configured_method(method, criterion or plan.meta.get("criterion"), given=criterion is not None)
    if (gradual or recover_plot) and recover_steps == 0:
        flag = "--gradual" if gradual else "--recover-plot"
        raise ValueError(f"{flag} needs recovery steps: pass --recover-steps N (e.g. 200)")
    check_output_file("--out", out, "pruned.pt")
    if recover_plot is not None:
        check_output_file("--recover-plot", recover_plot, "recovery.png")
    refuse_inputs([("--out", out), ("--recover-plot", recover_plot)],
                  [("--plan file", plan_path), ("--model file", model_spec), ("--weights file", weights)])
    target = parse_device(device)
    for note in context.notes:
        status(quiet, f"note: {note}")
    if context.from_plan:
        status(quiet, f"from {plan_path}: {', '.join(context.from_plan)}")
    with _blamed_on_plan(context):
        # The seed draws random weights (a factory without --weights) as the scan had them.
        model = _load(context, model_spec, weights, trust_checkpoint, quiet, seed=seed, image_size=image_size).to(target)
        arch = _architecture_or_pickle(model_spec, trust_checkpoint, out)
        _check_layers(model, plan, model_spec, pruning.layer_types)
        pruning = _prepared(model, pruning, plan, data, image_size, batch_size, seed, quiet)
        history = None
        if recover_steps:
            history = _recover(model, plan.plan, pruning, recover_data or data, held_out, image_size,
                               recover_batch_size, recover_steps, recover_lr, gradual, seed, quiet)
        else:
            from prunekit.plans import apply_plan

            apply_plan(model, plan.plan, method=pruning)
        report = _save(model, out, arch)
        if history is not None and recover_plot is not None:
            from prunekit.training.recover import plot_recovery

            references = {"pruned at once": history.pruned_distortion}
            plot_recovery({"gradual + recover" if gradual else "recover": history}, recover_plot, references=references)
            status(quiet, f"wrote {recover_plot}")
    _report(model, pruning, report, history, out, arch, _input_size_hint(model, image_size), len(plan.plan),
            gradual, as_json, quiet)


def _prepared(model: Any, pruning: Any, plan: PlanFile, data: str, image_size: Optional[int],
              batch_size: Optional[int], seed: int, quiet: bool) -> Any:
    """The method, prepared on the plan's data where it needs data (activation statistics, gradients)."""
    if not pruning.needs_data:
        return pruning
    batches, _, description, _, _ = evaluation_data(model, data, image_size, batch_size, None, seed)
    status(quiet, f"measuring {pruning.data_kind or 'what ' + pruning.name + ' scores by'} on {description} ...")
    return pruning.prepare(model, batches, layers=list(plan.plan), progress=not quiet)


def _save(model: Any, out: str, arch: Optional[str]) -> Any:
    """Make the pruning permanent, save the model (a prunekit checkpoint, or pickled like its source); its report."""
    from prunekit.io.files import save_torch
    from prunekit.plans import finalize
    from prunekit.measure.sparsity import sparsity_report
    from prunekit.models.zoo import save_checkpoint

    finalize(model)
    if arch is None:
        save_torch(model.cpu(), out)  # a pickled module, like its source
    else:
        save_checkpoint(model.cpu(), out, arch)
    return sparsity_report(model)


def _recover(
    model: Any, plan: dict, pruning: Any, data: str, held_out: Optional[str],
    image_size: Optional[int], batch_size: Optional[int], steps: int, lr: float, gradual: bool, seed: int, quiet: bool,
) -> Any:
    from prunekit.training.recover import prune_and_recover

    train, held, description = recovery_batches(model, data, held_out, image_size, batch_size, steps, seed)
    status(quiet, f"recovery data: {description}")

    def say_how_long(step_seconds: float, total_seconds: float) -> None:
        if total_seconds >= 60:
            status(quiet, f"recovery: the first step took {step_seconds:.1f} s: about {_duration(total_seconds)} for "
                          f"{steps} steps (Ctrl-C keeps the best state so far; a smaller --image-size is faster)")

    history = prune_and_recover(model, plan, train, steps, method=pruning, gradual=gradual, lr=lr, held_out=held,
                                progress=not quiet, on_estimate=say_how_long)
    if history.rest_pruned_at_once:
        status(quiet, "interrupted before the schedule reached the plan: the rest was pruned at once")
    return history


def _duration(seconds: float) -> str:
    """``95`` -> ``'2 min'``, ``7000`` -> ``'1 h 57 min'``."""
    minutes = int(round(seconds / 60))
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{max(minutes, 1)} min"


def _print_recovery(history: Any, gradual: bool) -> None:
    if not history.distortion:
        click.echo("recovery: interrupted before its first evaluation: the model is saved pruned at once, unrecovered")
        return
    stop = (f"; interrupted after {history.steps_done} of {history.steps_planned} steps: the best weights so far "
            "are kept") if history.interrupted else ""
    start = f"{history.pruned_distortion:.4f} right after pruning at once, "
    click.echo(
        f"recovery: held-out distortion (vs the dense model) {start}{history.best_distortion:.4f} at step "
        f"{history.best_step} of {history.steps_done} (kept){stop}"
    )
