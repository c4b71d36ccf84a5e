"""``prunekit compact``: remove pruned channels for real, time both models, export the result."""

from __future__ import annotations

import shlex
from typing import Any, Dict, Optional, Tuple

import click

from prunekit.cli.errors import emit_json, library_errors
from prunekit.cli.checkpoints import architecture, compacted_architecture, load_checkpoint_argument
from prunekit.input_size import check_input_fits, in_channels
from prunekit.cli.options import (
    DEFAULT_IMAGE_SIZE,
    DIGITS_SIZE,
    checkpoint_options,
    examples,
    json_option,
    parse_input_size,
    threads_option,
)
from prunekit.cli.paths import check_output_file, refuse_inputs

__all__ = ["compact_command"]


@click.command(
    "compact",
    short_help="Remove masked/zero channels for real and measure the speed-up.",
    epilog=examples(
        "prunekit scan --method channel --out ch && prunekit prune --plan ch/plan.json --out ch.pt",
        "prunekit compact ch.pt",
        "prunekit compact vgg11-pruned.pt --input-size 3x224x224 --out vgg11-small.pt",
        "prunekit compact ch.pt --exported ch.pt2 --onnx ch.onnx",
    ),
)
@click.argument("checkpoint", metavar="CHECKPOINT")
@click.option("--input-size", default=None, metavar="CxHxW",
              help="One input's shape for the MACs and the timing (default: 1x16x16 for 1-channel "
              "models such as digits-vgg, else 3x224x224).")
@click.option("--repeats", type=click.IntRange(min=1), default=20, show_default=True,
              help="Interleaved timing rounds, after 3 warm-up rounds: the median and its spread are reported, "
              "and the speed-up with a 95 % bootstrap interval (\"within noise\" when it holds 1.0; "
              "\"not measurable here\" when it spans more than 1.5x: a busy machine).")
@click.option("--out", default=None, metavar="PATH",
              help="Also save the compacted model: a compacted checkpoint (its architecture, layer shapes and "
              "weights; every command loads it without running code from the file), or, for a CHECKPOINT that is a "
              "pickled module, pickled like it.")
@checkpoint_options
@click.option("--exported", default=None, metavar="PATH.pt2",
              help="Also write the compacted model as a torch.export program (checked after loading it back).")
@click.option("--onnx", "onnx_path", default=None, metavar="PATH.onnx",
              help="Also write it as ONNX, checked with onnxruntime (pip install onnx onnxruntime onnxscript).")
@json_option("the comparison")
@threads_option
@library_errors
def compact_command(
    checkpoint: str,
    input_size: Optional[str],
    repeats: int,
    out: Optional[str],
    weights: Optional[str],
    trust_checkpoint: bool,
    exported: Optional[str],
    onnx_path: Optional[str],
    as_json: bool,
) -> None:
    """Physically remove the channels a pruned model no longer uses, and compare.

    Output channels whose weights (and bias) are all zero, as `prunekit prune
    --method channel` leaves them, are removed with their BatchNorm slice and
    the next layer's inputs. The result is checked against the pruned model on
    a random input, then params, MACs and the measured latency (both models
    timed side by side) are printed. CHECKPOINT may be .pt or .pksparse.

    """
    from prunekit.compact.measured import WARMUP_ROUNDS, compact_and_measure

    outputs = [("--out", out, "small.pt"), ("--exported", exported, "small.pt2"), ("--onnx", onnx_path, "small.onnx")]
    refuse_inputs([(flag, value) for flag, value, _ in outputs],
                  [("input checkpoint", checkpoint), ("--weights file", weights)])
    for flag, value, example_name in outputs:
        if value is not None:
            check_output_file(flag, value, example_name)
    model = load_checkpoint_argument("compact", checkpoint, weights, trust_checkpoint).eval()
    size = parse_input_size(input_size)
    if size is None:
        size = (1, DIGITS_SIZE, DIGITS_SIZE) if in_channels(model) == 1 else (3, DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
    check_input_fits(model, size, "--input-size", input_size or "x".join(map(str, size)))
    source, dense = _dense_architecture(checkpoint, trust_checkpoint)
    run = compact_and_measure(model, size, repeats, exported=exported, onnx=onnx_path, dense=dense)
    report, removed, checks = run.report, run.removed, run.checks
    timing: Dict[str, Any] = dict(run.timing, speedup=run.speedup) if removed else {}
    saved = _save(run.small, out, source or _recorded_architecture(checkpoint)) if out is not None else None
    if as_json:
        emit_json({"report": report.to_dict(), "removed": removed, "export_checks": checks, "out": out,
                   "seconds": {name: timing[name].median for name in ("pruned", "compact")} if removed else None,
                   "seconds_iqr": {name: [timing[name].q1, timing[name].q3] for name in ("pruned", "compact")}
                   if removed else None,
                   "speedup": timing["speedup"].ratio if removed else None,
                   "speedup_interval": [timing["speedup"].low, timing["speedup"].high] if removed else None,
                   "within_noise": timing["speedup"].within_noise if removed else None,
                   "too_noisy": timing["speedup"].too_noisy if removed else None})
        return
    click.echo(str(report))
    if removed:
        before = "pruned" if dense is None else f"dense {source}"
        if dense is not None:
            click.echo(f"{checkpoint} is already compacted: compared with its dense architecture ({source})")
        click.echo(
            f"latency per input of size {'x'.join(map(str, size))} (median of {repeats} interleaved rounds, after "
            f"{WARMUP_ROUNDS} warm-up rounds): {timing['pruned']} {before}, {timing['compact']} compact; speed-up {timing['speedup']}"
        )
    else:
        click.echo(f"nothing to remove: no output channel of {checkpoint} is all zeros (prune it with --method channel "
                   "first); the compacted model is the same size, so it was not timed")
    if saved is not None:
        click.echo(saved)
    for name, target, runner in (("exported", exported, "torch.export.load"), ("onnx", onnx_path, "onnxruntime")):
        if target is not None:
            click.echo(f"wrote {target}: run with {runner}, relative difference {checks[name]:.2e} from the "
                       f"compacted model ({checks['compact_vs_source']:.2e} compacted vs the pruned source)")


def _dense_architecture(checkpoint: str, trust_checkpoint: bool) -> Tuple[Optional[str], Any]:
    """For a compacted checkpoint (``prunekit scan --steps``): its architecture's spec and that model, dense
    (what it is compared with); else ``(None, None)``."""
    source = compacted_architecture(checkpoint)
    if source is None:
        return None, None
    from prunekit.models.zoo import load_model

    return source, load_model(source, "none", trust_checkpoint=trust_checkpoint, progress=False).eval()


def _recorded_architecture(checkpoint: str) -> Optional[str]:
    """The spec that rebuilds CHECKPOINT's architecture; None for a pickled model."""
    try:
        return architecture(checkpoint)
    except ValueError:
        return None


def _save(small: Any, out: str, arch: Optional[str]) -> str:
    """Write the compacted model (a compacted checkpoint, or pickled like a pickled source); what to say."""
    if arch is None:
        from prunekit.io.files import save_torch

        save_torch(small, out)
        return f"wrote {out}: a pickled module, like its source; read it back with: prunekit report {shlex.quote(out)} --trust-checkpoint"
    from prunekit.io.compacted import save_compacted
    from prunekit.models.zoo import is_factory_spec

    save_compacted(small.cpu(), out, arch)
    trust = " --trust-checkpoint" if is_factory_spec(arch) else ""  # building a factory's model runs its code
    return (f"wrote {out}: a compacted checkpoint; read it back with: prunekit report {shlex.quote(out)}{trust} "
            "(its layers' shapes and weights, no pickled code: every command loads it)")
