"""Gatys et al. (CVPR 2016) style transfer by optimising the image: losses and the optimisation loop.

The losses follow jcjohnson's ``neural-style`` (and its PyTorch port), whose
default weights (content 5, style 100, TV 1e-3) this module keeps:

* content: mean squared error between the activations of the image and of the
  content image at each content layer, summed over layers;
* style: mean squared error between Gram matrices ``F F^T / (C*H*W)`` of the
  image and of the style image at each style layer, summed over layers;
* total variation: sum of squared differences between neighbouring pixels of
  the network input (so it is on the same scale as the activations).

All three are computed on what the network sees (after :class:`Preprocessor`),
so their balance depends on the input scale: the defaults were tuned on
Caffe-converted VGG-19 with ``--preprocess caffe`` (0-255 BGR input).

The image is optimised in RGB [0, 1] pixel space and clamped when returned.

Example:
    >>> from examples.style_transfer.vgg import load_vgg19_features
    >>> _ = torch.manual_seed(0)
    >>> net = load_vgg19_features("random")
    >>> result = stylize(net, torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32),
    ...                  GatysConfig(iterations=5), progress=False)
    >>> result.image.shape
    torch.Size([1, 3, 32, 32])
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import click
import torch
from torch import Tensor, nn

from examples.style_transfer.vgg import LAYER_INDEX, FeatureExtractor, Preprocessor

__all__ = [
    "DEFAULT_CONTENT_LAYERS",
    "DEFAULT_STYLE_LAYERS",
    "GatysConfig",
    "GatysLoss",
    "LossTerms",
    "StylizeResult",
    "gram_matrix",
    "initial_image",
    "preserve_colors",
    "stylize",
    "total_variation",
]

DEFAULT_CONTENT_LAYERS: Tuple[str, ...] = ("relu4_2",)
DEFAULT_STYLE_LAYERS: Tuple[str, ...] = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
OPTIMIZERS = ("lbfgs", "adam")
INITS = ("content", "noise")


@dataclass(frozen=True)
class GatysConfig:
    """Settings of one style-transfer run (see the module docstring for the loss definitions).

    Attributes:
        content_layers / style_layers: VGG-19 layer names (``relu4_2``, ``conv3_1``, ...).
        content_weight / style_weight / tv_weight: weights of the three losses.
        optimizer: ``"lbfgs"`` (one function evaluation per iteration) or ``"adam"``.
        iterations: optimisation steps.
        learning_rate: step size; L-BFGS default 1.0, Adam default 0.02 (pixel space).
        init: start from the ``"content"`` image or from uniform ``"noise"``.
        seed: seeds the noise initialisation.
        original_colors: keep the content image's colours (luminance-only transfer).
    """

    content_layers: Tuple[str, ...] = DEFAULT_CONTENT_LAYERS
    style_layers: Tuple[str, ...] = DEFAULT_STYLE_LAYERS
    content_weight: float = 5.0
    style_weight: float = 100.0
    tv_weight: float = 1e-3
    optimizer: str = "lbfgs"
    iterations: int = 200
    learning_rate: Optional[float] = None
    init: str = "content"
    seed: int = 0
    original_colors: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "content_layers", tuple(self.content_layers))
        object.__setattr__(self, "style_layers", tuple(self.style_layers))
        for kind, names in (("content", self.content_layers), ("style", self.style_layers)):
            if not names:
                raise ValueError(f"{kind}_layers is empty; name at least one VGG layer, e.g. relu4_2")
            for name in names:
                # VGG-19's names include every other VGG's; the network itself is checked by FeatureExtractor.
                if name not in LAYER_INDEX:
                    raise KeyError(f"unknown {kind} layer {name!r}; VGG layers are: {', '.join(LAYER_INDEX)}")
        for name in ("content_weight", "style_weight", "tv_weight"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; choose one of {', '.join(INITS)}")
        if int(self.iterations) < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")

    @property
    def step_size(self) -> float:
        """The learning rate actually used (the optimiser's default when ``learning_rate`` is None)."""
        if self.learning_rate is not None:
            return float(self.learning_rate)
        return 1.0 if self.optimizer == "lbfgs" else 0.02

    def replace(self, **changes: object) -> "GatysConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, object]:
        out = dataclasses.asdict(self)
        out["content_layers"] = list(self.content_layers)
        out["style_layers"] = list(self.style_layers)
        out["learning_rate"] = self.step_size
        return out


def gram_matrix(features: Tensor) -> Tensor:
    """Gram matrix of ``[B, C, H, W]`` activations, normalised by ``C*H*W``: ``[B, C, C]``.

    Example:
        >>> gram_matrix(torch.ones(1, 2, 3, 3))
        tensor([[[0.5000, 0.5000],
                 [0.5000, 0.5000]]])
    """
    if features.dim() != 4:
        raise ValueError(f"expected activations [B, C, H, W], got shape {tuple(features.shape)}")
    batch, channels, height, width = features.shape
    flat = features.reshape(batch, channels, height * width)
    return torch.bmm(flat, flat.transpose(1, 2)) / (channels * height * width)


def total_variation(x: Tensor) -> Tensor:
    """Sum of squared differences between vertically and horizontally adjacent pixels of ``[B, C, H, W]``."""
    if x.dim() != 4:
        raise ValueError(f"expected an image batch [B, C, H, W], got shape {tuple(x.shape)}")
    dy = x[..., 1:, :] - x[..., :-1, :]
    dx = x[..., :, 1:] - x[..., :, :-1]
    return dy.pow(2).sum() + dx.pow(2).sum()


@dataclass(frozen=True)
class LossTerms:
    """Weighted losses of one image (plain floats); ``total`` is their sum."""

    content: float
    style: float
    tv: float

    @property
    def total(self) -> float:
        return self.content + self.style + self.tv

    def to_dict(self) -> Dict[str, float]:
        return {"content": self.content, "style": self.style, "tv": self.tv, "total": self.total}


class GatysLoss(nn.Module):
    """The style-transfer objective for one content/style pair on one network.

    Targets (content activations, style Grams) are computed once, at
    construction, with the network as it is then. Calling the module on an
    image in [0, 1] returns the weighted ``(content, style, tv)`` loss tensors.

    Args:
        features: VGG-19 ``features``.
        content01 / style01: ``[1, 3, H, W]`` images in [0, 1]; sizes may differ.
        config: layers and weights.
        preprocessor: converts [0, 1] RGB into the network's input.
    """

    def __init__(
        self,
        features: nn.Sequential,
        content01: Tensor,
        style01: Tensor,
        config: Optional[GatysConfig] = None,
        preprocessor: Optional[Preprocessor] = None,
    ) -> None:
        super().__init__()
        self.config = config if config is not None else GatysConfig()
        self.preprocessor = preprocessor if preprocessor is not None else Preprocessor("imagenet")
        layers = list(dict.fromkeys(self.config.content_layers + self.config.style_layers))
        self.extractor = FeatureExtractor(features, layers)
        with torch.no_grad():
            content = self.extractor(self.preprocessor.normalize(content01))
            style = self.extractor(self.preprocessor.normalize(style01))
        self.content_targets = {name: content[name].detach() for name in self.config.content_layers}
        self.style_targets = {name: gram_matrix(style[name]).detach() for name in self.config.style_layers}

    def forward(self, image01: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        x = self.preprocessor.normalize(image01)
        acts = self.extractor(x)
        content = sum(
            torch.mean((acts[name] - target) ** 2) for name, target in self.content_targets.items()
        )
        style = sum(
            torch.mean((gram_matrix(acts[name]) - target) ** 2) for name, target in self.style_targets.items()
        )
        config = self.config
        return config.content_weight * content, config.style_weight * style, config.tv_weight * total_variation(x)

    @torch.no_grad()
    def measure(self, image01: Tensor) -> LossTerms:
        """The weighted losses of ``image01`` as floats."""
        content, style, tv = self(image01)
        return LossTerms(float(content), float(style), float(tv))


def initial_image(content01: Tensor, init: str, seed: int) -> Tensor:
    """The starting image: a copy of the content image, or uniform noise from ``seed``."""
    if init == "content":
        return content01.detach().clone()
    if init == "noise":
        generator = torch.Generator().manual_seed(int(seed))
        return torch.rand(content01.shape, generator=generator, dtype=content01.dtype).to(content01.device)
    raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")


# ITU-R BT.601 RGB -> YCbCr without offsets (only Y is swapped, offsets cancel).
_RGB_TO_YCC = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])


def preserve_colors(stylized01: Tensor, content01: Tensor) -> Tensor:
    """Luminance-only transfer: the stylised image's luminance with the content image's chrominance."""
    to_ycc = _RGB_TO_YCC.to(stylized01)
    to_rgb = torch.linalg.inv(to_ycc)
    ycc_stylized = torch.einsum("ij,bjhw->bihw", to_ycc, stylized01)
    ycc_content = torch.einsum("ij,bjhw->bihw", to_ycc, content01.to(stylized01))
    mixed = torch.cat([ycc_stylized[:, :1], ycc_content[:, 1:]], dim=1)
    return torch.einsum("ij,bjhw->bihw", to_rgb, mixed).clamp(0.0, 1.0)


@dataclass
class StylizeResult:
    """Output of :func:`stylize`."""

    image: Tensor
    losses: LossTerms
    seconds_per_iteration: float
    iterations: int
    history: List[float] = dataclasses.field(default_factory=list)


def _progress_label(terms: Sequence[float]) -> str:
    content, style, tv = terms
    return f"content {content:.3g} style {style:.3g} tv {tv:.3g}"


def stylize(
    features: nn.Sequential,
    content01: Tensor,
    style01: Tensor,
    config: Optional[GatysConfig] = None,
    preprocessor: Optional[Preprocessor] = None,
    progress: bool = True,
    label: str = "stylizing",
    callback: Optional[Callable[[int, Tensor], None]] = None,
) -> StylizeResult:
    """Optimise an image so its content matches ``content01`` and its Gram statistics ``style01``.

    Args:
        features: VGG-19 ``features`` (frozen; pruned or dense).
        content01 / style01: ``[1, 3, H, W]`` images in [0, 1]. The result has the content's size.
        config: losses, optimiser and iterations (default :class:`GatysConfig`).
        preprocessor: must match the weights (default ImageNet mean/std).
        progress: show a progress bar with the current losses.
        label: the progress bar's label.
        callback: called as ``callback(iteration, image01)`` after every iteration.

    Returns:
        The clamped image (with the content's colours when ``config.original_colors``), its
        losses measured by ``features``, and the wall time per iteration.
    """
    config = config if config is not None else GatysConfig()
    for name, image in (("content01", content01), ("style01", style01)):
        if image.dim() != 4 or image.shape[:2] != (1, 3):
            raise ValueError(f"{name} must be one RGB image [1, 3, H, W], got shape {tuple(image.shape)}")
    loss_fn = GatysLoss(features, content01, style01, config, preprocessor)
    image = initial_image(content01, config.init, config.seed).requires_grad_(True)
    if config.optimizer == "lbfgs":
        # max_iter=1: each step() is exactly one evaluation and one update, so the bar
        # advances per iteration and the time per iteration is comparable across runs.
        optimizer: torch.optim.Optimizer = torch.optim.LBFGS(
            [image], lr=config.step_size, max_iter=1, history_size=100, tolerance_grad=0.0, tolerance_change=0.0
        )
    else:
        optimizer = torch.optim.Adam([image], lr=config.step_size)
    last: List[float] = [math.nan, math.nan, math.nan]
    history: List[float] = []

    def closure() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        content, style, tv = loss_fn(image)
        total = content + style + tv
        total.backward()
        last[:] = [float(content.detach()), float(style.detach()), float(tv.detach())]
        return total

    bar = click.progressbar(
        length=int(config.iterations),
        label=label,
        item_show_func=lambda _: _progress_label(last) if not math.isnan(last[0]) else None,
        hidden=not progress,
        file=sys.stderr,
    )
    start = time.perf_counter()
    with bar:
        for iteration in range(int(config.iterations)):
            optimizer.step(closure)
            if config.optimizer == "adam":
                with torch.no_grad():
                    image.clamp_(0.0, 1.0)
            history.append(sum(last))
            if not math.isfinite(history[-1]):
                raise FloatingPointError(
                    f"the loss became {history[-1]} at iteration {iteration + 1}; lower the learning "
                    f"rate or the loss weights"
                )
            if callback is not None:
                callback(iteration + 1, image.detach())
            bar.update(1)
    seconds = (time.perf_counter() - start) / int(config.iterations)
    with torch.no_grad():
        result = image.detach().clamp(0.0, 1.0)
        if config.original_colors:
            result = preserve_colors(result, content01)
    return StylizeResult(result, loss_fn.measure(result), seconds, int(config.iterations), history)

