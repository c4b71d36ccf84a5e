"""``prunekit scan``: measure each conv layer's sensitivity, fit a plan, write scan.json/csv/png and plan.json."""

from __future__ import annotations

import math
import os
import re
import shlex
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import click

from prunekit import __version__
from prunekit.cli.errors import emit_json, library_errors
from prunekit.cli.inputs import evaluation_data
from prunekit.cli.options import (
    configured_method,
    data_options,
    examples,
    json_option,
    method_options,
    model_options,
    parse_device,
    parse_layers,
    parse_sparsities,
    recovery_options,
    run_options,
    threads_option,
)
from prunekit.cli.paths import check_output_folder
from prunekit.cli.session import DEFAULT_TIMEOUT, process_group, status
from prunekit.cli.stages import check_stage_options, run_stages
from prunekit.sensitivity.folder import ScanFolder, recorded_path
from prunekit.sensitivity.result import SensitivityResult

__all__ = ["scan_command"]

DEFAULT_OUT = "prunekit-scan"


def _apply_hint(plan_path: Path, model_spec: str, trust_checkpoint: bool) -> str:
    """The prune command for this plan; the model is typed in it when loading it runs code (the user's word)."""
    from prunekit.models.zoo import is_factory_spec

    model = f" --model {shlex.quote(model_spec)}" if trust_checkpoint or is_factory_spec(model_spec) else ""
    trust = " --trust-checkpoint" if trust_checkpoint else ""
    return f"prunekit prune --plan {shlex.quote(str(plan_path))}{model} --out pruned.pt{trust}"


@click.command(
    "scan",
    short_help="Measure per-layer pruning sensitivity and suggest a plan.",
    epilog=examples(
        "prunekit scan",
        "prunekit scan --model vgg11 --data ./images --image-size 64 --layers features.0,features.3",
        "prunekit scan --model vgg19 --weights vgg19.pth --sparsities 0.5,0.7,0.9 --out vgg19-scan",
        "prunekit scan --model resnet18 --method channel --image-size 96 --target-macs 0.5",
        "prunekit scan --model digits-resnet --method channel --target-macs 0.33 --steps 3 --recover-steps 100",
    ),
)
@model_options()
@data_options()
@click.option(
    "--metric",
    type=click.Choice(["distortion", "accuracy"]),
    default=None,
    help="accuracy (needs labels) or distortion (relative L2 change of the output vs. the dense "
    "model). Default: accuracy with labelled data (the built-in digits), else distortion.",
)
@method_options()
@click.option("--sparsities", default="0.4:0.9:0.1", show_default=True, metavar="START:STOP:STEP|LIST",
              help="Levels in [0, 1), increasing: start:stop:step (stop included) or a comma list.")
@click.option("--layers", default=None, metavar="NAME,...", help="Layers to scan (default: every conv, and every nn.Linear for fine-grained; channel methods scan each channel group once).")
@click.option("--max-drop", type=float, default=None,
              help="Tolerance for the suggested plan: the largest acceptable score loss vs. the dense "
              "model (default: 0.01 for accuracy, 0.05 for distortion).")
@click.option("--relative", is_flag=True, help="--max-drop is a fraction of the dense score.")
@click.option("--target-macs", type=float, default=None, metavar="FRACTION",
              help="Budget: the plan keeps at most this fraction of the dense model's MACs per sample (0.5: "
              "half), spent where the scan says pruning hurts least; counted on the model `compact` builds "
              "(a fine-grained plan: its non-zero weights, which only sparse hardware skips). With "
              "--max-drop too, a plan beyond the tolerance is refused.")
@click.option("--target-params", type=float, default=None, metavar="FRACTION",
              help="Budget: the plan keeps at most this fraction of the dense model's parameters "
              "(counted like --target-macs; both may be given).")
@click.option("--target-speedup", type=float, default=None, metavar="X",
              help="Budget: the compacted model runs at least X times faster than the dense one (e.g. 2), "
              "timed on this machine at --timing-batch and --image-size with --threads (each layer timed alone at the "
              "widths plans give it, cached in ~/.cache/prunekit or $PRUNEKIT_CACHE_DIR; the plan's compacted copy "
              "is then timed beside the dense model and the target corrected by what it measured). Channel methods only.")
@click.option("--target-latency", default=None, metavar="TIME",
              help="Budget: at most this time per forward of --timing-batch inputs on this machine, with a unit: "
              "20ms or 0.02s (timed like --target-speedup).")
@click.option("--timing-batch", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="How many inputs each timed forward of --target-speedup/--target-latency takes: 1 for the "
              "latency of one request, more for a server's batch.")
@click.option("--exact-widths", is_flag=True,
              help="With --target-speedup/--target-latency: keep each group's channels as fitted. By default the "
              "fitted plan's groups are tried rounded up to the widest of the next multiples of 4/8/16/32 that "
              "this machine runs as fast (its layers timed at each width; within 3 %), and the rounded plan is "
              "kept when it still meets the target and scores at least as well.")
@click.option("--steps", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="With a budget: reach it in N stages. Each stage scans the model as it is (after the first, only "
              "the groups the stage before pruned), fits an equal share of what is left of the budget, prunes, "
              "compacts and recovers (--recover-steps); --out gets stage-K/ folders, stages.json and pruned.pt, "
              "the final compacted model. A channel method only; --resume continues after the last stage done.")
@recovery_options("After each stage of --steps N", "--data")
@click.option("--confidence", type=float, default=None, metavar="P",
              help="Settle points early (e.g. 0.99): a point stops once a P-confidence interval on its "
              "full-data score lies wholly on one side of --max-drop (batches shuffled once with --seed; "
              "the table marks such points ~). Default: every point uses every batch.")
@click.option("--stack-levels", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              is_flag=False, flag_value="on",
              help="Run a layer's levels through the rest of the model together, stacked along the batch, "
              "so each later weight is read once for all levels (scores equal to float rounding instead of "
              "bitwise). auto: where the later weights used few times per forward outweigh the activations "
              "(small batches, large heads); off: never, every score bitwise that of a full forward.")
@click.option("--joint/--per-layer", "joint", default=True, show_default=True,
              help="--joint: grow the plan while the score with ALL its layers pruned stays within "
              "--max-drop (a few extra evaluations); --per-layer: each layer's own level, whose "
              "losses add up when applied together.")
@click.option("--out", default=DEFAULT_OUT, show_default=True, metavar="DIR",
              help="Folder for scan.json, scan.csv, sensitivity.png and plan.json.")
@click.option("--resume", is_flag=True,
              help="Continue the interrupted scan (or plan fit) in --out (same options required).")
@click.option("--timeout", type=click.FloatRange(min=1), default=DEFAULT_TIMEOUT, show_default=True,
              metavar="SECONDS",
              help="Under torchrun: how long a rank waits for the others before failing (a killed or stopped rank).")
@click.option("--force", is_flag=True,
              help="Replace the results of another scan (other model, weights, data, method or levels) in --out.")
@run_options()
@threads_option
@json_option("the scan, the plan and the files written")
@click.pass_context
@library_errors
def scan_command(
    ctx: click.Context, model_spec: str, weights: Optional[str], trust_checkpoint: bool, data: str,
    image_size: Optional[int], batch_size: Optional[int], metric: Optional[str], method: str, criterion: Optional[str],
    sparsities: str, layers: Optional[str], max_drop: Optional[float], relative: bool, target_macs: Optional[float],
    target_params: Optional[float], target_speedup: Optional[float], target_latency: Optional[str], timing_batch: int,
    exact_widths: bool, steps: int, recover_steps: int, recover_data: Optional[str], held_out: Optional[str], recover_lr: float,
    recover_batch_size: int, confidence: Optional[float], stack_levels: str, joint: bool, out: str, resume: bool, timeout: float, force: bool, device: str, seed: int,
    quiet: bool, as_json: bool,
) -> None:
    """Measure how sensitive each conv layer is to pruning, and suggest a plan.

    Each conv layer is pruned alone at each sparsity, the model is scored, and
    the layer restored. Results go to --out (scan.json is saved after every
    point, so an interrupted scan continues with --resume). The suggested plan
    gives each layer the highest sparsity whose score, and every lower level's,
    stays within --max-drop of the dense model; with --joint (the default) the
    plan is then trimmed until the model with every layer pruned at once stays
    within --max-drop too (its trials are saved in fit.json: Ctrl-C there also
    resumes). With a budget (--target-macs, --target-params, --target-speedup,
    --target-latency) the plan is the one that meets it with the smallest loss
    the scan predicts, scored with every layer pruned and counted (and, for a
    time budget, timed) on the compacted model. plan.json records the model, weights and data, so that
    `prunekit prune --plan DIR/plan.json` reuses them.

    With no options: the built-in digits-vgg model (trained weights shipped
    with prunekit) scanned by test accuracy, offline, in seconds.

    """
    levels, names, out_dir = _checked_arguments(sparsities, layers, max_drop, confidence, out, data)
    budget = _checked_budget(target_macs, target_params, joint, target_speedup, target_latency, timing_batch, exact_widths)
    from prunekit.models.zoo import load_model
    from prunekit.sensitivity.distributed import is_main_process
    from prunekit.planning.pipeline import ScanInterrupted, run_scan

    pruning = configured_method(method, criterion)
    levels = _method_levels(ctx, pruning, levels)
    recovery = dict(steps=recover_steps, data=recover_data, held_out=held_out, lr=recover_lr, batch_size=recover_batch_size)
    _check_method(budget, pruning, method)
    check_stage_options(steps, budget, pruning, joint, confidence, names, recovery)
    target = ctx.with_resource(process_group(parse_device(device), timeout))
    folder, previous = _scan_folder(out_dir, resume and steps == 1, force or steps > 1, {
        "model": model_spec, "weights": weights, "data": data, "method": method, "sparsities": list(levels)})

    model = load_model(model_spec, weights, trust_checkpoint=trust_checkpoint, progress=not quiet,
                       factory_folder=os.getcwd(), seed=seed, image_size=image_size).to(target)
    convs = pruning.layers_of(model, names)
    batches, labelled, description, size, batch_size = evaluation_data(model, data, image_size, batch_size, metric, seed)
    metric_name = metric or ("accuracy" if labelled else "distortion")
    options = {
        "model": model_spec, "weights": weights, "data": data, "image_size": size, "batch_size": batch_size,
        "metric": metric_name, "method": method, "criterion": pruning.options.get("criterion"),
        "sparsities": list(levels), "layers": list(convs), "seed": seed, "confidence": confidence,
    }
    if steps > 1:  # --steps N: scan, fit, prune, compact and recover N times (prunekit.cli.stages)
        return run_stages(ctx, model, model_spec, trust_checkpoint, (batches, labelled, metric_name, description), pruning,
                          levels, max_drop, budget, steps, out_dir, resume, force, options, recovery, image_size, seed,
                          quiet, as_json)
    try:
        run = run_scan(
            model, batches, labelled=labelled, metric=metric_name, method=pruning,
            layers=None if names is None else list(convs), sparsities=levels, max_drop=max_drop, relative=relative,
            budget=budget, confidence=confidence, seed=seed, stack_levels={"auto": "auto", "on": True, "off": False}[stack_levels],
            joint=joint, folder=folder, resume_from=previous, resume_fit=resume, options=options,
            meta={"prunekit": __version__}, data_description=description, progress=not quiet,
            on_status=lambda message: status(quiet, message),
        )
    except ScanInterrupted as interrupted:
        if is_main_process():
            click.echo(_INTERRUPTED[interrupted.stage].format(scan=folder.scan_file, fit=folder.fit_file), err=True)
        ctx.exit(130)
    if not is_main_process():
        return  # rank 0 alone writes and prints
    context = {"model": recorded_path(model_spec, "file"), "weights": recorded_path(weights, "file"),
               "data": recorded_path(data, "folder"), "image_size": size, "batch_size": batch_size, "seed": seed}
    files = run.write(folder, context, warn=lambda message: click.echo(f"warning: {message}", err=True))
    # A plan that prunes nothing is not worth applying: the table's last lines say what to change instead.
    hint = _apply_hint(folder.plan_file, model_spec, trust_checkpoint) if any(run.plan.values()) else None
    _report(run, files, hint, as_json, quiet)


def _method_levels(ctx: click.Context, pruning: Any, levels: Tuple[float, ...]) -> Tuple[float, ...]:
    """The levels to scan: a fixed-pattern method's own (2:4: 0.5) unless --sparsities was typed; checked against it."""
    if pruning.levels is not None and ctx.get_parameter_source("sparsities") == click.core.ParameterSource.DEFAULT:
        levels = tuple(pruning.levels)
    pruning.check_levels(levels)
    return levels


def _checked_arguments(sparsities: str, layers: Optional[str], max_drop: Optional[float], confidence: Optional[float],
                       out: str, data: str) -> Tuple[Tuple[float, ...], Optional[List[str]], Path]:
    """The checks that need no torch, first: a bad argument answers in a tenth of a second."""
    levels = parse_sparsities(sparsities)
    names = parse_layers(layers)
    if max_drop is not None and (not math.isfinite(max_drop) or max_drop < 0):
        raise ValueError(f"--max-drop {max_drop}: pass a number >= 0 (e.g. 0.01 = one accuracy point)")
    if confidence is not None and not 0.5 <= confidence < 1:
        raise ValueError(f"--confidence {confidence}: pass a probability in [0.5, 1), e.g. 0.99")
    out_dir = check_output_folder("--out", out)
    if data.strip().lower() not in ("builtin", "photos"):
        folder, results = Path(data).resolve(), out_dir.resolve()
        if results == folder or folder in results.parents:
            raise ValueError(
                f"--out {out} is inside --data {data}: the next scan would read its sensitivity.png as an "
                "image; write the results elsewhere"
            )
    return levels, names, out_dir


def _scan_folder(out_dir: Path, resume: bool, force: bool, typed: Dict[str, Any]) -> Tuple[ScanFolder, Any]:
    """The results folder, and with ``resume`` its partial scan (read before any work: a missing one fails fast);
    without ``force``, another scan's results there are refused (the stages of --steps keep their own scans)."""
    folder = ScanFolder(out_dir)
    if not resume and not force:
        folder.refuse_other_scan(typed)
    return folder, folder.partial_scan() if resume else None


def _check_method(budget: Any, pruning: Any, method: str) -> None:
    if budget is not None and budget.timed and pruning.unit != "channels":
        raise ValueError(f"--method {method} leaves its zeros in place and runs as fast as the dense model here: "
                         "--target-speedup/--target-latency need a channel method (e.g. --method channel)")


def _checked_budget(target_macs: Optional[float], target_params: Optional[float], joint: bool,
                    target_speedup: Optional[float] = None, target_latency: Optional[str] = None,
                    timing_batch: int = 1, exact_widths: bool = False) -> Any:
    """The budget the options name (None: none), checked before torch loads."""
    for flag, value, what in (("--target-macs", target_macs, "MACs"), ("--target-params", target_params, "parameters")):
        if value is not None and not (math.isfinite(value) and 0 < value <= 1):
            raise ValueError(f"{flag} {value:g}: pass the fraction of the dense model's {what} to keep, in (0, 1] "
                             "(e.g. 0.5 for half)")
    if target_speedup is not None and not (math.isfinite(target_speedup) and target_speedup > 1):
        raise ValueError(f"--target-speedup {target_speedup:g}: pass how many times faster than the dense model, "
                         "above 1 (e.g. 2 for twice as fast)")
    latency = None if target_latency is None else parse_latency(target_latency)
    if timing_batch != 1 and target_speedup is None and latency is None:
        raise ValueError(f"--timing-batch {timing_batch} sets what --target-speedup/--target-latency are timed at; "
                         "pass one of them, or drop --timing-batch")
    if exact_widths and target_speedup is None and latency is None:
        raise ValueError("--exact-widths keeps the widths a --target-speedup/--target-latency plan would round up; "
                         "pass one of them, or drop --exact-widths")
    if target_macs is None and target_params is None and target_speedup is None and latency is None:
        return None
    if not joint:
        raise ValueError("--per-layer cannot meet a budget (--target-macs/--target-params/--target-speedup/"
                         "--target-latency): the budget plan is scored with every layer pruned together; drop --per-layer")
    from prunekit.planning.budget import Budget

    return Budget(macs=target_macs, params=target_params, speedup=target_speedup, latency=latency, batch=timing_batch,
                  round_widths=not exact_widths)


_TIME_UNITS = {"ms": 1e-3, "s": 1.0, "us": 1e-6}


def parse_latency(text: str) -> float:
    """Seconds from ``"20ms"``, ``"0.02s"`` or ``"500us"`` (a unit is required: a bare number is ambiguous).

    Example:
        >>> parse_latency("20ms"), parse_latency("0.5 s")
        (0.02, 0.5)
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s|us)\s*", text)
    if match is None:
        raise ValueError(f"--target-latency {text!r}: pass a time per forward with its unit, e.g. 20ms or 0.02s")
    seconds = float(match.group(1)) * _TIME_UNITS[match.group(2)]
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"--target-latency {text!r}: pass a time above 0, e.g. 20ms")
    return seconds


def _report(run: Any, files: Dict[str, str], hint: Optional[str], as_json: bool, quiet: bool) -> None:
    """The table, the plan and what to do next (or one JSON document)."""
    result, plan, problem, fitted, relative = run.result, run.plan, run.compaction_problem, run.fit, run.relative
    if as_json:
        emit_json({
            "scan": result.to_dict(), "plan": plan, "max_drop": run.max_drop, "relative": relative,
            "score_with_plan": run.score, "joint": run.joint, "per_layer_plan": run.per_layer_plan,
            "score_with_per_layer_plan": run.per_layer_score, "files": files, "next": hint,
            "compact_problem": problem, "fit": None if fitted is None else {
                "trials": len(fitted.trials), "steps": fitted.steps, "sparsity": fitted.sparsity, "left": fitted.left},
            "budget": run.costs(),
        })
        return
    click.echo(result.table(max_drop=run.max_drop, relative=relative, plan=plan))
    if run.budget is not None:
        _print_budget_plan(run)
    else:
        _print_plan(result, plan, run.per_layer_plan, run.score, run.per_layer_score, run.max_drop, relative, run.joint)
    if fitted is not None and run.budget is None:
        click.echo(f"the fit measured {len(fitted.trials)} plans of the {fitted.steps} steps it could take; "
                   f"the plan removes {fitted.sparsity:.1%} of the scanned layers' weights")
    status(quiet, f"\nwrote {', '.join(files.values())}")
    if problem is not None:
        click.echo(f"warning: compact will not shrink a model pruned by this plan: {problem}", err=True)
    if hint is not None:
        status(quiet, f"apply it: {hint}")


_INTERRUPTED = {
    "scan": "\ninterrupted: the points measured so far are in {scan}; run the same command with --resume to continue",
    "fit": "\ninterrupted while fitting the plan: the scan is complete in {scan} and the fit's trials so far are in "
           "{fit}; run the same command with --resume to continue",
}


def _print_budget_plan(run: Any) -> None:
    result, fit = run.result, run.fit
    shape = {"walk": "the walk along the scan's curves", "uniform": "one level for every layer",
             "walk + uniform": "the walk blended with one level for every layer"}[fit.shape]
    click.echo(f"\nplan fitted to the budget ({run.budget}): {shape}, the best of {fit.candidates} plans "
               "scored with every layer pruned")
    width = max((len(layer) for layer in run.plan), default=0)
    for layer, level in run.plan.items():
        click.echo(f"  {layer.ljust(width)}  {level:.4g}")
    dense, predicted, measured = fit.dense, fit.cost, fit.measured
    built = "the compacted model" if fit.dense_hardware else "its non-zero weights (only sparse hardware skips zeros)"
    rows = [("dense", dense), ("plan, counted", predicted)] + ([(f"plan, measured on {built}", measured)]
                                                            if measured is not None else [])
    for label, cost in rows:
        params, macs = cost.fraction_of(dense)
        click.echo(f"  {label}: {cost.macs / 1e6:.2f} M MACs ({macs:.3f}), {cost.params / 1e6:.3f} M params ({params:.3f})")
    if fit.speedup is not None:
        predicted = dense.seconds / predicted_seconds if (predicted_seconds := fit.cost.seconds) else float("nan")
        correction = f", after {fit.corrections} correction(s) of the target" if fit.corrections else ""
        click.echo(f"  time ({fit.timing}): dense {dense.seconds * 1e3:.2f} ms; the compacted plan runs {fit.speedup} "
                   f"faster (the latency model predicted {predicted:.2f}x{correction})")
    if fit.widths:
        click.echo(f"  widths: {fit.widths}")
    if fit.widened:
        shown = ", ".join(f"{group} {fitted}->{kept}" for group, (fitted, kept) in list(fit.widened.items())[:6])
        more = f" and {len(fit.widened) - 6} more" if len(fit.widened) > 6 else ""
        click.echo(f"  widths rounded up (--exact-widths keeps them as fitted): {shown}{more}")
    word = "drop" if result.higher_is_better else "rise"
    click.echo(f"{result.metric} with the whole plan applied at once: {run.score:.4f} (dense {result.baseline:.4f}; "
               f"{word} {fit.drop:.4g}, the scan's curves predicted {fit.predicted_drop:.4g})")


def _print_plan(
    result: SensitivityResult, plan: Dict[str, float], per_layer: Dict[str, float], combined: float,
    per_layer_score: float, tolerance: float, relative: bool, joint: bool,
) -> None:
    kind = "relative" if relative else "absolute"
    how = "all layers pruned together" if joint else "each layer alone"
    word = "drop" if result.higher_is_better else "rise"
    click.echo(f"\nsuggested plan (max {result.metric} {word} {tolerance:g}, {kind}, {how}):")
    width = max(len(layer) for layer in plan)
    for layer, level in plan.items():
        alone = f"   (alone: {per_layer[layer]:g})" if joint and per_layer[layer] != level else ""
        click.echo(f"  {layer.ljust(width)}  {level:g}{alone}")
    if not any(plan.values()):
        click.echo("no layer stays within the tolerance at the lowest level; raise --max-drop or scan lower sparsities")
        return
    click.echo(f"{result.metric} with the whole plan applied at once: {combined:.4f} (dense {result.baseline:.4f})")
    if joint:
        click.echo(f"(the per-layer plan, every layer at its own level, scores {per_layer_score:.4f} together)")
    else:
        worse = "low" if result.higher_is_better else "high"
        click.echo(f"layer losses add up: use --joint if that is too {worse}")
