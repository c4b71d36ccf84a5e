"""``prunekit scan --steps N``: reach the budget in N stages of scan, fit, prune, compact and recovery.

What :func:`prunekit.planning.stages.prune_in_stages` does, from the command line: the stages go
to ``--out`` (``stage-K/`` with each stage's scan and compacted model, ``stages.json``), the final
compacted model to ``--out``/``pruned.pt`` (a compacted checkpoint: it loads without pickled code),
and ``--resume`` continues an interrupted run.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Tuple

import click

from prunekit.cli.errors import emit_json
from prunekit.cli.session import status

__all__ = ["check_stage_options", "run_stages"]


def check_stage_options(steps: int, budget: Any, pruning: Any, joint: bool, confidence: Optional[float],
                        layers: Optional[Sequence[str]], recovery: Mapping[str, Any]) -> None:
    """Refuse what ``--steps`` cannot do, before any work; without ``--steps`` (1), the recovery flags.

    ``recovery``: the recovery options (``steps``, ``data``, ``held_out``, ``lr``, ``batch_size``).
    """
    if steps == 1:
        flags = [flag for flag, key in (("--recover-steps", "steps"), ("--recover-data", "data"),
                                        ("--held-out", "held_out")) if recovery[key]]
        if flags:
            raise ValueError(f"{flags[0]} recovers between the stages of --steps N; pass --steps 2 or more, or prune "
                             "the scan's plan with prunekit prune --plan DIR/plan.json --recover-steps N")
        return
    if layers is not None:
        raise ValueError("--layers: the stages of --steps scan every layer of the model as it is after each stage; "
                         "drop --layers")
    if budget is None:
        raise ValueError(f"--steps {steps} prunes towards a budget in stages: pass --target-macs, --target-params, "
                         "--target-speedup or --target-latency (e.g. --target-macs 0.33)")
    if pruning.unit != "channels":
        raise ValueError(f"--steps compacts the model between stages, and --method {pruning.name} leaves its zeros in "
                         "place: pass a channel method (--method channel, filter-norm or taylor)")
    if not joint:
        raise ValueError("--per-layer: each stage fits its budget with every layer pruned together; drop --per-layer")
    if confidence is not None:
        raise ValueError("--confidence settles single scans; with --steps every stage scans exactly: drop --confidence")


def run_stages(
    ctx: click.Context, model: Any, model_spec: str, trust_checkpoint: bool, scored: Tuple[Any, bool, str, str],
    pruning: Any, levels: Any, max_drop: Optional[float], budget: Any, steps: int, out_dir: Path, resume: bool,
    force: bool, options: Mapping[str, Any], recovery: Mapping[str, Any], image_size: Optional[int], seed: int,
    quiet: bool, as_json: bool,
) -> None:
    """Run the stages, write ``pruned.pt`` and print the stages' table (or one JSON document)."""
    from prunekit.cli.checkpoints import architecture
    from prunekit.io.compacted import save_compacted
    from prunekit.planning.stages import STAGES_FORMAT, StagesInterrupted, prune_in_stages
    from prunekit.sensitivity.distributed import rank_and_world

    batches, labelled, metric, description = scored
    if rank_and_world()[1] > 1:
        raise ValueError("--steps runs on one process: start it without torchrun")
    record = out_dir / "stages.json"
    if record.is_file() and not resume and not force:
        raise ValueError(f"--out {out_dir} holds the stages of an earlier run ({record}); pass --resume to continue "
                         "it, --force to start over there, or another --out")
    arch = architecture(model_spec) if not trust_checkpoint else None
    recover, trained_on = None, ""
    if recovery["steps"]:
        from prunekit.cli.inputs import recovery_batches
        from prunekit.training.recover import recover as distil

        train, held, trained_on = recovery_batches(model, recovery["data"] or options["data"], recovery["held_out"],
                                                    image_size, recovery["batch_size"], recovery["steps"], seed)
        status(quiet, f"recovery data: {trained_on}")

        def distillation(student: Any, teacher: Any) -> Any:
            return distil(student, teacher, train, recovery["steps"], lr=recovery["lr"], held_out=held,
                          progress=not quiet)

        recover = distillation
    else:
        status(quiet, "note: no --recover-steps: the stages prune without recovering in between")
    try:
        run = prune_in_stages(model, batches, budget, steps, method=pruning, recover=recover, folder=out_dir,
                              resume=resume, labelled=labelled, metric=metric, sparsities=levels, max_drop=max_drop,
                              arch=arch, options={**options, "recovery": dict(recovery)},
                              progress=not quiet, on_status=lambda message: status(quiet, message))
    except StagesInterrupted as interrupted:
        click.echo(f"\ninterrupted in stage {interrupted.stage} ({interrupted.during}): the stages done and this "
                   f"stage's scan points are in {out_dir}; run the same command with --resume to continue", err=True)
        ctx.exit(130)
    final = out_dir / "pruned.pt"
    save_compacted(run.model.cpu(), final, arch)
    files = {"stages": str(record), "model": str(final)}
    hint = (f"prunekit compact {shlex.quote(str(final))}" if arch is not None else None)
    if as_json:
        emit_json({"format": STAGES_FORMAT, **run.to_dict(), "data": description, "recovery_data": trained_on or None,
                   "files": files, "next": hint})
        return
    click.echo(run.table())
    recovered = f"; recovered on {trained_on}" if trained_on else ""
    click.echo(f"scored on {description}{recovered}")
    status(quiet, f"\nwrote {final} (the compacted model of the last stage) and {record}")
    if hint is not None:
        status(quiet, f"time it and export it: {hint}")
