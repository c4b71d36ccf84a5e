"""Pruning a VGG (VGG-19 or VGG-16) for Gatys style transfer: scan metrics, plan, feature-distillation fine-tuning, report.

Two ways to score a network pruned by the scanner, both lower-is-better:

* :class:`LossLayerDistortion` (the fast proxy): relative distortion, versus the
  dense network, of the content activations on the content image and of the
  style Gram matrices on the style image, at the loss layers; one forward per
  image and point (fewer with the scanner's prefix cache).
* :class:`TransferLoss` (the full metric): a short style transfer with the
  pruned network from a fixed init, and the resulting image scored with the
  DENSE network's total loss, so every point is measured on the same scale.

:func:`compare_sensitivities` summarises each layer of a scan by its mean
degradation over the scanned sparsities and gives Spearman's rank correlation
between the two metrics: when it is high, the cheap proxy orders the layers
like the real objective and can be used alone.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import click
import torch
from torch import Tensor, nn

from prunekit.plans import apply_plan, copy_model, finalize, pruned_tensors
from prunekit.training.recover import recover
from prunekit.measure.sparsity import sparsity_report
from prunekit.planning import fit_plan
from prunekit.sensitivity import ForwardMetric, SensitivityResult, scan
from prunekit.layers import model_device
from prunekit.sensitivity.metrics import relative_distance

from examples.style_transfer.gatys import GatysConfig, GatysLoss, StylizeResult, gram_matrix, stylize
from examples.style_transfer.imaging import resize_longer_side
from examples.style_transfer.quality import SSIM_WINDOW, psnr, ssim
from examples.style_transfer.vgg import LAYER_INDEX, Preprocessor, conv_index_names, layer_index_of, run_until

__all__ = [
    "METRICS",
    "FinetuneResult",
    "LossLayerDistortion",
    "PruneOutcome",
    "ScanSettings",
    "SensitivityComparison",
    "TransferLoss",
    "check_scan_matches",
    "compare_sensitivities",
    "finetune_features",
    "format_report",
    "layer_sensitivity",
    "make_metric",
    "named_plan",
    "plan_from_scan",
    "prune_and_stylize",
    "run_scan",
]


class LossLayerDistortion(ForwardMetric):
    """Fast proxy: how far the loss-layer statistics of a pruned network move from the dense one's.

    The score is the mean, over the content layers (on the content image) and
    the style layers (on the style image), of ``||A - A_dense|| / ||A_dense||``
    where ``A`` is the activation (content) or its Gram matrix (style). 0 means
    the loss layers are unchanged; lower is better. The dense references are
    recorded by :meth:`prepare` (the scanner calls it before pruning anything).

    Args:
        content01 / style01: ``[1, 3, H, W]`` images in [0, 1].
        config: the loss layers (``content_layers``, ``style_layers``).
        preprocessor: must match the weights.
        layers: layer name -> index in the network's ``features`` (default VGG-19's;
            :func:`~examples.style_transfer.vgg.layer_index_of` gives any VGG's).

    Example:
        >>> import torchvision
        >>> features = torchvision.models.vgg19().features.eval()
        >>> metric = LossLayerDistortion(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32))
        >>> metric.prepare(features); metric(features)
        0.0
    """

    name = "loss-layer distortion"
    higher_is_better = False

    def __init__(
        self,
        content01: Tensor,
        style01: Tensor,
        config: Optional[GatysConfig] = None,
        preprocessor: Optional[Preprocessor] = None,
        layers: Optional[Mapping[str, int]] = None,
    ) -> None:
        config = config if config is not None else GatysConfig()
        preprocessor = preprocessor if preprocessor is not None else Preprocessor("imagenet")
        index = dict(layers) if layers is not None else LAYER_INDEX
        for name in (*config.content_layers, *config.style_layers):
            if name not in index:
                raise KeyError(f"layer {name!r} is not in this network; its layers are: {', '.join(index)}")
        self.inputs = {
            "content": preprocessor.normalize(content01).detach(),
            "style": preprocessor.normalize(style01).detach(),
        }
        # (image, VGG layer name, module name in features, compare Gram?)
        self.terms: List[Tuple[str, str, str, bool]] = [
            ("content", layer, str(index[layer]), False) for layer in config.content_layers
        ] + [("style", layer, str(index[layer]), True) for layer in config.style_layers]
        self.capture = tuple(dict.fromkeys(module for _, _, module, _ in self.terms))
        self._reference: Optional[Dict[Tuple[str, str], Tensor]] = None

    def _statistic(self, activation: Tensor, gram: bool) -> Tensor:
        return gram_matrix(activation.double()) if gram else activation.double()

    def prepare(self, model: nn.Module) -> None:
        """Record the dense network's activations / Grams at the loss layers."""
        self._reference = None
        reference: Dict[Tuple[str, str], Tensor] = {}
        outputs = self._outputs(model)
        for image, _, module, gram in self.terms:
            reference[(image, module + (":gram" if gram else ""))] = self._statistic(outputs[image][module], gram)
        self._reference = reference

    def _outputs(self, model: nn.Module) -> Dict[str, Dict[str, Tensor]]:
        device = model_device(model)
        wanted = {int(module) for module in self.capture}
        with torch.no_grad():
            return {
                image: {str(index): value for index, value in run_until(model, x.to(device), wanted).items()}
                for image, x in self.inputs.items()
            }

    def batches(self, device: torch.device) -> Iterator[Tuple[Tensor, Any]]:
        if self._reference is None:
            raise RuntimeError("call metric.prepare(dense_features) first (the scanner does it)")
        for image, x in self.inputs.items():
            yield x.to(device), image

    def batch_statistics(self, outputs: Mapping[str, Tensor], target: Any) -> Tensor:
        assert self._reference is not None
        stats = torch.zeros(2 * len(self.terms), dtype=torch.float64)
        for i, (image, _, module, gram) in enumerate(self.terms):
            if image != target:
                continue
            reference = self._reference[(image, module + (":gram" if gram else ""))]
            if module in outputs:  # absent: before the pruned layer, hence equal to the dense output
                stats[2 * i] = (self._statistic(outputs[module], gram) - reference).pow(2).sum().cpu()
            stats[2 * i + 1] = reference.pow(2).sum().cpu()
        return stats

    def reduce(self, totals: Tensor) -> float:
        values = totals.tolist()
        distances = [relative_distance(values[2 * i], values[2 * i + 1]) for i in range(len(self.terms))]
        return float(sum(distances) / len(distances))

    def __call__(self, model: nn.Module) -> float:
        # The loss layers are read directly (faster than hooks on a Sequential, same numbers).
        if self._reference is None:
            raise RuntimeError("call metric.prepare(dense_features) first (the scanner does it)")
        outputs = self._outputs(model)
        totals = torch.zeros(2 * len(self.terms), dtype=torch.float64)
        for image in self.inputs:
            totals += self.batch_statistics(outputs[image], image)
        return self.reduce(totals)


class TransferLoss:
    """Full metric: stylise with the pruned network, score the image with the dense network's loss.

    Every call runs :func:`stylize` from the same init and seed (``config``),
    so scores differ only through the network. The score is the dense network's
    weighted total loss (content + style + TV) of the final image; lower is better.

    Args:
        dense_features: the dense network; a private copy is kept, so the scanner may
            modify the original afterwards.
        content01 / style01: images in [0, 1] (small: every call is a whole optimisation).
        config: a short run, e.g. ``GatysConfig(iterations=10)``.
        preprocessor: must match the weights.
    """

    name = "transfer loss"
    higher_is_better = False

    def __init__(
        self,
        dense_features: nn.Sequential,
        content01: Tensor,
        style01: Tensor,
        config: GatysConfig,
        preprocessor: Optional[Preprocessor] = None,
    ) -> None:
        self.config = config
        self.preprocessor = preprocessor if preprocessor is not None else Preprocessor("imagenet")
        self.content01 = content01
        self.style01 = style01
        self.dense_loss = GatysLoss(copy_model(dense_features), content01, style01, config, self.preprocessor)

    def __call__(self, model: nn.Module) -> float:
        result = stylize(model, self.content01, self.style01, self.config, self.preprocessor, progress=False)
        return self.dense_loss.measure(result.image).total


def layer_sensitivity(result: SensitivityResult) -> Dict[str, float]:
    """Each layer's mean degradation over the scanned sparsities (higher = more sensitive).

    Degradation is ``score - baseline`` for a lower-is-better score (``baseline - score``
    otherwise), divided by ``|baseline|`` when the baseline is not 0, so metrics
    on different scales are comparable (the rank correlation ignores the scale anyway).
    """
    if result.baseline is None:
        raise ValueError("the scan has no baseline; finish it before comparing sensitivities")
    scale = abs(result.baseline) if result.baseline else 1.0
    out = {}
    for layer, values in result.scores.items():
        measured = [v for v in values if v is not None]
        if not measured:
            continue
        drops = [(v - result.baseline) if not result.higher_is_better else (result.baseline - v) for v in measured]
        out[layer] = sum(drops) / len(drops) / scale
    return out


@dataclass(frozen=True)
class SensitivityComparison:
    """Per-layer sensitivities of two scans and Spearman's rank correlation between them."""

    proxy: Dict[str, float]
    full: Dict[str, float]
    spearman: Optional[float]
    p_value: Optional[float]

    def to_dict(self) -> Dict[str, Any]:
        return {
            "definition": "per layer: mean over the scanned sparsities of (score - dense) / |dense| "
            "(proxy: score - 0); spearman over the layers scanned by both",
            "proxy": self.proxy,
            "full": self.full,
            "spearman": self.spearman,
            "p_value": self.p_value,
        }


def compare_sensitivities(proxy: SensitivityResult, full: SensitivityResult) -> SensitivityComparison:
    """Spearman's rank correlation between the per-layer sensitivities of two scans (common layers).

    Returns ``spearman=None`` when fewer than 3 layers are shared or a side is
    constant (no ranking to compare).
    """
    from scipy.stats import spearmanr  # imported here: it takes about a second, and only this needs it

    a = layer_sensitivity(proxy)
    b = layer_sensitivity(full)
    common = [layer for layer in a if layer in b]
    rho = p_value = None
    if len(common) >= 3 and len({a[k] for k in common}) > 1 and len({b[k] for k in common}) > 1:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            statistic = spearmanr([a[k] for k in common], [b[k] for k in common])
        rho, p_value = float(statistic[0]), float(statistic[1])
        if math.isnan(rho):
            rho = p_value = None
    return SensitivityComparison({k: a[k] for k in common}, {k: b[k] for k in common}, rho, p_value)


def named_plan(plan: Mapping[str, float], features: Optional[nn.Sequential] = None) -> Dict[str, float]:
    """The plan keyed by VGG names (``conv1_1``) instead of indices in ``features`` (``'0'``; default VGG-19's)."""
    names = conv_index_names(features if features is not None else "vgg19")
    return {names.get(layer, layer): value for layer, value in plan.items()}


@dataclass(frozen=True)
class FinetuneResult:
    """Loss-layer distortion (the proxy metric) before and after fine-tuning, and whether it was kept."""

    steps: int
    distortion_before: float
    distortion_after: float
    kept: bool
    learning_rate: float

    def to_dict(self) -> Dict[str, Any]:
        return {
            "steps": self.steps,
            "learning_rate": self.learning_rate,
            "distortion_before": self.distortion_before,
            "distortion_after": self.distortion_after,
            "kept": self.kept,
        }


def _random_views(images: Sequence[Tensor], crop: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless random crops (with horizontal flips) of the given images, one image at a time."""
    while True:
        for image in images:
            height, width = image.shape[-2:]
            size_h, size_w = min(crop, height), min(crop, width)
            top = int(torch.randint(0, height - size_h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - size_w + 1, (1,), generator=generator))
            view = image[..., top : top + size_h, left : left + size_w]
            if bool(torch.rand(1, generator=generator) < 0.5):
                view = view.flip(-1)
            yield view


def finetune_features(
    pruned: nn.Sequential,
    dense: nn.Sequential,
    images01: Sequence[Tensor],
    metric: LossLayerDistortion,
    steps: int,
    learning_rate: float = 1e-4,
    crop: int = 128,
    seed: int = 0,
    preprocessor: Optional[Preprocessor] = None,
    progress: bool = True,
) -> FinetuneResult:
    """Feature distillation with :func:`prunekit.training.recover`: the pruned network learns the dense loss-layer activations.

    The pruned network must still carry its pruning reparametrization
    (``weight_orig`` + ``weight_mask``): only ``weight_orig`` and the biases are
    trained, and the masks stay as they are. ``recover`` matches the metric's loss
    layers on random crops of ``images01`` and keeps its best state on the whole
    images; if the distortion measured by ``metric`` (prepared on the dense
    network) still does not improve, the weights from before fine-tuning are put back.

    Args:
        pruned: the pruned network (modified in place; frozen again on return).
        dense: the dense network (not modified).
        images01: images in [0, 1] to distil on, e.g. the content and style images.
        metric: the proxy metric, already prepared on the dense network.
        steps: optimiser steps (Adam).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not any(True for _ in pruned_tensors(pruned)):
        raise ValueError("the network carries no pruning masks; fine-tune it before prunekit.finalize")
    preprocessor = preprocessor if preprocessor is not None else Preprocessor("imagenet")
    layers = [str(index) for index in sorted({int(module) for module in metric.capture})]
    before = metric(pruned)
    params = [p for name, p in pruned.named_parameters() if name.endswith("weight_orig") or name.endswith("bias")]
    saved = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(int(seed))
    views = _random_views(images01, crop, generator)
    crops = [preprocessor.normalize(next(views)) for _ in range(min(steps, 64))]
    whole = [preprocessor.normalize(image) for image in images01]
    flags = [(p, p.requires_grad) for p in pruned.parameters()]
    for p in pruned.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        recover(pruned, dense, crops, steps, lr=learning_rate, layers=layers, held_out=whole,
                eval_every=max(1, steps // 10), progress=progress)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
        for p in params:
            p.requires_grad_(False)
    after = metric(pruned)
    kept = after <= before
    if not kept:
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)
    return FinetuneResult(steps, before, after, kept, learning_rate)


# ---------------------------------------------------------------------------
# Scans, plan and the prune pipeline

METRICS = ("proxy", "full")


@dataclass(frozen=True)
class ScanSettings:
    """What the sensitivity scans measure, and at what cost.

    Attributes:
        sparsities: the levels scanned for every layer.
        layers: conv layers of ``features`` to scan (``'0'``, ``'2'``, ...; None: all 16).
        proxy_size: longer side of the images the proxy sees.
        full_size: longer side of the images of the full metric's short style transfers.
        full_iterations: iterations of each short style transfer.
    """

    sparsities: Tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    layers: Optional[Tuple[str, ...]] = None
    proxy_size: int = 128
    full_size: int = 64
    full_iterations: int = 10

    def to_dict(self) -> Dict[str, Any]:
        return {
            "sparsities": list(self.sparsities),
            "layers": list(self.layers) if self.layers is not None else None,
            "proxy_size": self.proxy_size,
            "full_size": self.full_size,
            "full_iterations": self.full_iterations,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ScanSettings":
        """Read :meth:`to_dict` back (e.g. the settings a saved scan recorded).

        Example:
            >>> ScanSettings.from_dict(ScanSettings(proxy_size=64).to_dict()).proxy_size
            64
        """
        layers = data.get("layers")
        return cls(
            sparsities=tuple(float(v) for v in data["sparsities"]),
            layers=tuple(str(v) for v in layers) if layers is not None else None,
            proxy_size=int(data["proxy_size"]),
            full_size=int(data["full_size"]),
            full_iterations=int(data["full_iterations"]),
        )


def make_metric(
    kind: str,
    features: nn.Sequential,
    content01: Tensor,
    style01: Tensor,
    config: GatysConfig,
    preprocessor: Preprocessor,
    settings: ScanSettings,
) -> Any:
    """The scan metric ``kind`` (``"proxy"`` or ``"full"``) on images resized to the settings' sizes.

    Raises:
        ValueError: an image whose shorter side, at that size, is below what the network's
            pooling layers need (the message gives the size that works).
    """
    # The proxy's scan runs the whole of ``features``; the full metric's transfers stop at the deepest loss layer.
    index = layer_index_of(features)
    deepest = max(index[name] for name in (*config.content_layers, *config.style_layers) if name in index)
    modules = list(features) if kind == "proxy" else list(features)[:deepest]
    need = 2 ** sum(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) for m in modules)
    flag, size = ("--proxy-size", settings.proxy_size) if kind == "proxy" else ("--full-size", settings.full_size)
    for name, image in (("content", content01), ("style", style01)):
        height, width = image.shape[-2:]
        if min(height, width) * size < need * max(height, width):
            enough = math.ceil(need * max(height, width) / min(height, width))
            raise ValueError(
                f"{flag} {size}: the {name} image ({width}x{height}) would be {min(height, width) * size // max(height, width)} px "
                f"on its shorter side, below the {need} px the network's poolings need; pass {flag} {enough} or more"
            )
    if kind == "proxy":
        return LossLayerDistortion(
            resize_longer_side(content01, size), resize_longer_side(style01, size), config, preprocessor,
            layers=layer_index_of(features),
        )
    if kind == "full":
        size = settings.full_size
        short = config.replace(iterations=settings.full_iterations, original_colors=False)
        return TransferLoss(
            features, resize_longer_side(content01, size), resize_longer_side(style01, size), short, preprocessor
        )
    raise ValueError(f"unknown metric {kind!r}; choose one of {', '.join(METRICS)}")


def run_scan(
    kind: str,
    features: nn.Sequential,
    content01: Tensor,
    style01: Tensor,
    config: GatysConfig,
    preprocessor: Preprocessor,
    settings: ScanSettings,
    meta: Optional[Mapping[str, Any]] = None,
    progress: bool = True,
) -> SensitivityResult:
    """Scan the convs of ``features`` with metric ``kind``; ``meta`` is stored with the result."""
    metric = make_metric(kind, features, content01, style01, config, preprocessor, settings)
    info = dict(meta or {})
    info.update({"metric_kind": kind, "scan": settings.to_dict(), "layer_names": conv_index_names(features)})
    if progress:
        click.echo(f"scanning with the {kind} metric ({metric.name})", err=True)
    start = time.perf_counter()
    result = scan(
        features,
        metric,
        layers=list(settings.layers) if settings.layers is not None else None,
        sparsities=settings.sparsities,
        method="fine-grained",
        progress=progress,
        meta=info,
    )
    result.meta["seconds"] = time.perf_counter() - start
    return result


def plan_from_scan(result: SensitivityResult, tolerance: float) -> Dict[str, float]:
    """Per-layer plan: the highest sparsity within ``tolerance`` of the dense network.

    The tolerance is a fraction in both cases: for the proxy (dense baseline 0)
    it is the largest acceptable loss-layer distortion (0.2 = 20 %); for the full
    metric, the largest acceptable increase of the dense-scored loss relative to
    the dense run (0.2 = 20 % higher).
    """
    if tolerance < 0 or not math.isfinite(tolerance):
        raise ValueError(f"tolerance must be a finite fraction >= 0, got {tolerance}")
    relative = bool(result.baseline)
    return result.plan(max_drop=tolerance, relative=relative)


def check_scan_matches(result: SensitivityResult, expected: Mapping[str, Any], source: str) -> None:
    """Refuse a saved scan made on another network or other loss layers than this run's."""
    for key in ("weights", "seed", "preprocess", "content_layers", "style_layers"):
        if key == "seed" and expected.get("weights") != "random":
            continue  # the seed only changes the network for random weights
        if key in result.meta and key in expected and result.meta[key] != expected[key]:
            raise ValueError(
                f"{source} was scanned with {key}={result.meta[key]!r} but this run uses "
                f"{key}={expected[key]!r}; rerun the scan with the same options"
            )


@dataclass
class PruneOutcome:
    """What :func:`prune_and_stylize` produced: the pruned network, both stylisations and the report."""

    pruned: nn.Sequential
    plan: Dict[str, float]
    dense_run: StylizeResult
    pruned_run: StylizeResult
    report: Dict[str, Any]


def prune_and_stylize(
    features: nn.Sequential,
    content01: Tensor,
    style01: Tensor,
    config: GatysConfig,
    preprocessor: Preprocessor,
    scans: Mapping[str, SensitivityResult],
    plan_metric: str = "proxy",
    tolerance: float = 0.2,
    settings: Optional[ScanSettings] = None,
    finetune_steps: int = 0,
    finetune_lr: float = 1e-4,
    progress: bool = True,
    joint: bool = False,
) -> PruneOutcome:
    """Apply the plan read off ``scans[plan_metric]``, optionally fine-tune, stylise dense and pruned, report.

    ``features`` is not modified: the pruned network is a copy, finalized (plain
    weights with zeros, no masks) before it stylises, so both runs use the same
    dense kernels. Both final images are scored by the dense network's losses.
    With ``joint``, the per-layer plan is trimmed with
    :func:`prunekit.planning.fit_plan` until the network with every layer
    pruned at once stays within ``tolerance`` on the plan's metric.
    """
    settings = settings if settings is not None else ScanSettings()
    if plan_metric not in scans:
        raise ValueError(
            f"no {plan_metric!r} scan to plan from (have: {', '.join(scans) or 'none'}); "
            f"scan with that metric or choose --plan-metric among those"
        )
    source = scans[plan_metric]
    plan = plan_from_scan(source, tolerance)
    if joint:
        metric = make_metric(plan_metric, features, content01, style01, config, preprocessor, settings)
        plan = fit_plan(features, metric, source, tolerance, relative=bool(source.baseline)).plan
    pruned = apply_plan(copy_model(features), plan)
    proxy = make_metric("proxy", features, content01, style01, config, preprocessor, settings)
    proxy.prepare(features)
    distortion = proxy(pruned)
    finetuned: Optional[FinetuneResult] = None
    if finetune_steps:
        finetuned = finetune_features(
            pruned,
            features,
            [content01, style01],
            proxy,
            finetune_steps,
            learning_rate=finetune_lr,
            crop=settings.proxy_size,
            seed=config.seed,
            preprocessor=preprocessor,
            progress=progress,
        )
    finalize(pruned)
    height, width = content01.shape[-2:]
    counts = sparsity_report(pruned, input_size=(3, height, width))
    dense_run = stylize(features, content01, style01, config, preprocessor, progress=progress, label="dense ")
    pruned_run = stylize(pruned, content01, style01, config, preprocessor, progress=progress, label="pruned")
    dense_loss = GatysLoss(features, content01, style01, config, preprocessor)
    pruned_losses = dense_loss.measure(pruned_run.image)
    comparison = compare_sensitivities(scans["proxy"], scans["full"]) if {"proxy", "full"} <= set(scans) else None
    report: Dict[str, Any] = {
        "network": f"VGG features ({len(conv_index_names(features))} convs)",
        "image_size": [int(height), int(width)],
        "config": config.to_dict(),
        "preprocess": preprocessor.mode,
        "plan": {
            "metric": plan_metric,
            "tolerance": tolerance,
            "joint": joint,
            "tolerance_kind": "relative increase of the dense-scored loss" if source.baseline else "distortion",
            "sparsity": named_plan(plan, features),
        },
        "parameters": {
            "dense": counts.total_params,
            "nonzero": counts.total_nonzeros,
            "compression": counts.compression,
            "sparsity": counts.sparsity,
        },
        "macs": {"dense": counts.macs, "on_nonzero_weights": counts.effective_macs},
        "losses": {
            "measured_by": "dense network",
            "dense": dense_run.losses.to_dict(),
            "pruned": pruned_losses.to_dict(),
        },
        "similarity_to_dense": _similarity(pruned_run.image, dense_run.image),
        "seconds_per_iteration": {
            "dense": dense_run.seconds_per_iteration,
            "pruned": pruned_run.seconds_per_iteration,
            "pruned_over_dense": pruned_run.seconds_per_iteration / dense_run.seconds_per_iteration,
        },
        "loss_layer_distortion": {
            "pruned": distortion,
            "after_finetune": finetuned.distortion_after if finetuned is not None else None,
        },
        "finetune": finetuned.to_dict() if finetuned is not None else None,
        "sensitivity": comparison.to_dict() if comparison is not None else None,
        "scans": {
            kind: {
                "metric": result.metric,
                "baseline": result.baseline,
                "sparsities": list(result.sparsities),
                "points": result.num_done,
                "seconds": result.meta.get("seconds"),
            }
            for kind, result in scans.items()
        },
    }
    if comparison is not None:
        names = conv_index_names(features)
        report["sensitivity"]["proxy"] = {names.get(k, k): v for k, v in comparison.proxy.items()}
        report["sensitivity"]["full"] = {names.get(k, k): v for k, v in comparison.full.items()}
    return PruneOutcome(pruned, plan, dense_run, pruned_run, report)


def _similarity(image: Tensor, reference: Tensor) -> Dict[str, Optional[float]]:
    """PSNR (dB; None when identical) and SSIM (pytorch-msssim; None below its window) of the pruned result."""
    value = psnr(image, reference)
    return {
        "psnr_db": value if math.isfinite(value) else None,
        "ssim": ssim(image, reference) if min(image.shape[-2:]) >= SSIM_WINDOW else None,
    }


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M"


def format_report(report: Mapping[str, Any]) -> str:
    """The report as a few human-readable lines (the JSON holds everything)."""
    params = report["parameters"]
    losses = report["losses"]
    seconds = report["seconds_per_iteration"]
    plan = report["plan"]
    lines = [
        f"plan ({plan['metric']} metric, tolerance {plan['tolerance']:g} {plan['tolerance_kind']}):",
        "  " + ", ".join(f"{name} {value:.0%}" for name, value in plan["sparsity"].items()),
        f"parameters: {_millions(params['dense'])} -> {_millions(params['nonzero'])} non-zero "
        f"({params['compression']:.2f}x compression, {params['sparsity']:.1%} sparse)",
        "losses of the final images, measured by the dense network:",
        "  {:<7} {:>11} {:>11} {:>11} {:>11}".format("", "content", "style", "tv", "total"),
    ]
    for kind in ("dense", "pruned"):
        row = losses[kind]
        lines.append(
            "  {:<7} {:>11.4g} {:>11.4g} {:>11.4g} {:>11.4g}".format(kind, row["content"], row["style"], row["tv"], row["total"])
        )
    similarity = report.get("similarity_to_dense") or {}
    if similarity:
        db = similarity.get("psnr_db")
        value = similarity.get("ssim")
        lines.append(
            "pruned result vs dense result: PSNR "
            + (f"{db:.2f} dB" if db is not None else "inf (identical)")
            + ", SSIM " + (f"{value:.4f}" if value is not None else "n/a (image below the 11 px window)")
        )
    lines.append(
        f"time per iteration: dense {seconds['dense']:.3f} s, pruned {seconds['pruned']:.3f} s "
        f"(x{seconds['pruned_over_dense']:.2f}; zeros in dense kernels do not save time)"
    )
    distortion = report["loss_layer_distortion"]
    line = f"loss-layer distortion of the pruned network: {distortion['pruned']:.4f}"
    finetune = report.get("finetune")
    if finetune:
        verdict = "kept" if finetune["kept"] else "discarded (no improvement)"
        line += f" -> {finetune['distortion_after']:.4f} after {finetune['steps']} fine-tuning steps ({verdict})"
    lines.append(line)
    sensitivity = report.get("sensitivity")
    if sensitivity:
        rho = sensitivity["spearman"]
        lines.append(
            "proxy vs full per-layer sensitivity: Spearman "
            + (f"{rho:.3f} (p={sensitivity['p_value']:.3g})" if rho is not None else "undefined (constant or < 3 layers)")
        )
    return "\n".join(lines)
