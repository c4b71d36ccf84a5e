"""Training AdaIN with the channel and xor losses that switch encoder channels off (or a baseline).

Three modes, all with AdaIN's content and style losses:

* ``compact`` (the Sensors 2022 method): the encoder trains at a small learning
  rate and :class:`prunekit.training.regularizer.ChannelRegularizer` adds the channel
  loss (switch channels off) and the xor loss (switch the same ones off for
  every image) on the encoder output, relu4_1.
* ``baseline``: the encoder is frozen, no regulariser: plain AdaIN.
* ``uncorrelation``: the encoder trains with the uncorrelation loss instead
  (*Uncorrelated feature encoding for faster image style transfer*, 2021).

The losses are measured by a frozen copy of the initial encoder (the "loss
network"), so training the encoder cannot make the style loss easier. The
content loss compares relu4_1 of the output with either the AdaIN target
(``content_target="adain"``, measured by the encoder being trained, so a
channel it switched off is off on both sides) or with the content image's
relu4_1 under the loss network (``"content"``).

Training can go in two stages (``stage``): ``invert`` trains the decoder alone
to turn the frozen encoder's relu4_1 back into the image (content loss at
relu4_1 against the image's own features, plus ``pixel_weight`` times the pixel
MSE), and ``stylise`` (AdaIN's training) can start from such a run
(``init_from``) with the style weight ramped up from zero over ``style_ramp``
steps. Every ``probe_every`` steps the log records ``probe_content``: how far the
held-out outputs' relu4_1 is from their content's (reconstructions in ``invert``,
stylisations with the probe styles in ``stylise``), and ``probe_structure``, the same
on instance-normalised maps (what AdaIN keeps of the content), each beside the same
distance for flat and blurred versions of the content
(:mod:`examples.style_transfer.adain_content`). With ``content_guard`` > 0, a stylising
run halves its style weight whenever ``probe_structure`` exceeds ``content_guard``
times the flat image's.

Every batch is a pure function of ``(seed, step)``, and a checkpoint holds the
model, the optimisers, the step, the RNG and the style scale, so a resumed run
continues exactly as the uninterrupted one would.

Example:
    >>> config = TrainConfig("coco/", "wikiart/", "runs/compact", steps=160000)  # doctest: +SKIP
    >>> train(config)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from examples.style_transfer.adain import (
    STYLE_LAYERS,
    AdaINNet,
    adain,
    build_decoder,
    build_encoder,
    channel_mean_std,
    encoder_arch,
    encoder_output,
    encoder_widths,
)
from examples.style_transfer.adain_content import content_distances, content_references
from examples.style_transfer.vgg import FeatureExtractor, Preprocessor, default_preprocess
from prunekit.datasets import IMAGE_EXTENSIONS
from prunekit.io.files import PathLike, atomic_write, save_torch, write_json
from prunekit.training.losses import channel_loss, uncorrelation_loss, xor_loss
from prunekit.progress import progress_bar
from prunekit.training.regularizer import ChannelRegularizer

__all__ = [
    "CHECKPOINT_FORMAT",
    "CONTENT_TARGETS",
    "MODES",
    "LossNetwork",
    "PairedCropBatches",
    "STAGES",
    "TrainConfig",
    "TrainedModel",
    "augment_crop",
    "count_inactive",
    "list_images",
    "load_checkpoint",
    "load_crop",
    "model_from_checkpoint",
    "plot_training_log",
    "read_log",
    "read_tensor_file",
    "style_loss",
    "train",
]

MODES = ("compact", "baseline", "uncorrelation")
CONTENT_TARGETS = ("adain", "content")
STAGES = ("stylise", "invert")
CHECKPOINT_FORMAT = "prunekit-adain-checkpoint-v1"
CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"


@dataclass
class TrainConfig:
    """Everything a run depends on; saved in every checkpoint.

    Defaults are the reference settings of the Sensors 2022 paper's unofficial
    implementation: batch 4, 256 px crops, style weight 100, channel 1e4, xor 500,
    encoder lr 5e-6, decoder lr 1e-4.

    Attributes:
        content_dir, style_dir: folders of training images (searched recursively).
        out_dir: where checkpoint.pt, log.jsonl, log.png and config.json go.
        mode: ``compact`` | ``baseline`` | ``uncorrelation``.
        weights: encoder weights: ``imagenet`` | ``hed`` (HED's real VGG-16, offline) | ``random`` |
            path to a state_dict.
        width: encoder channel multiplier in (0, 1] (below 1: random weights only).
        preprocess: ``imagenet`` | ``caffe`` | ``hed`` input normalisation of the weights;
            ``None``: ``hed`` for HED's weights, else ``imagenet``.
        arch: the encoder's VGG (``vgg19``, ``vgg16``, ...); ``None``: ``vgg16`` for HED's
            weights, else ``vgg19``.
        content_target: ``adain`` | ``content`` (see the module docstring).
        probe_dir: held-out images whose consistently inactive channels are logged;
            ``None`` uses centre crops of the first ``probe_images`` training images.
        lr_decay: AdaIN's schedule ``lr / (1 + lr_decay * step)``.
        augment: jitter every crop (:func:`augment_crop`; scale 0.7-1.4x ``load_size``,
            flips, colour; a full hue turn on styles).
        stage: ``stylise`` (AdaIN's training) or ``invert`` (the decoder alone learns to
            reconstruct the content from the frozen encoder's relu4_1; ``mode`` baseline).
        pixel_weight: weight of the pixel MSE to the content (``invert`` only).
        init_from: a checkpoint (e.g. of an ``invert`` run) whose encoder, decoder and loss
            network start this run; its encoder settings must match. Optimisers start afresh.
        style_ramp: steps over which the style weight rises linearly from 0 (0: at once).
        probe_style_dir: held-out styles for the ``stylise`` probe; ``None`` uses centre crops
            of the first training styles.
        content_guard: with ``stylise``, halve the style weight whenever the probe's structure
            distance exceeds this multiple of the flat image's (0: never).
    """

    content_dir: str
    style_dir: str
    out_dir: str
    mode: str = "compact"
    weights: str = "imagenet"
    width: float = 1.0
    preprocess: Optional[str] = None
    arch: Optional[str] = None
    steps: int = 160_000
    batch_size: int = 4
    crop: int = 256
    load_size: int = 512
    lr_decoder: float = 1e-4
    lr_encoder: float = 5e-6
    lr_decay: float = 5e-5
    content_weight: float = 1.0
    style_weight: float = 100.0
    channel_weight: float = 1e4
    xor_weight: float = 500.0
    uncorrelation_weight: float = 1.0
    content_target: str = "adain"
    seed: int = 0
    log_every: int = 50
    probe_every: int = 500
    checkpoint_every: int = 1000
    probe_dir: Optional[str] = None
    probe_images: int = 16
    augment: bool = False
    num_workers: int = 0
    threads: Optional[int] = None
    stage: str = "stylise"
    pixel_weight: float = 0.0
    init_from: Optional[str] = None
    style_ramp: int = 0
    probe_style_dir: Optional[str] = None
    content_guard: float = 0.0

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting and its allowed values."""
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is unknown; choose one of {', '.join(MODES)}")
        if self.content_target not in CONTENT_TARGETS:
            raise ValueError(
                f"content_target={self.content_target!r} is unknown; choose one of {', '.join(CONTENT_TARGETS)}"
            )
        if self.stage not in STAGES:
            raise ValueError(f"stage={self.stage!r} is unknown; choose one of {', '.join(STAGES)}")
        if self.stage == "invert" and self.mode != "baseline":
            raise ValueError(
                f"stage='invert' trains the decoder alone on a frozen encoder, but mode={self.mode!r} trains "
                "the encoder; use mode='baseline' (--mode baseline) for the invert stage"
            )
        if self.pixel_weight and self.stage != "invert":
            raise ValueError(
                f"pixel_weight={self.pixel_weight} asks a stylisation to equal its content pixel by pixel; "
                "use it with stage='invert' only (--stage invert)"
            )
        if isinstance(self.style_ramp, bool) or not isinstance(self.style_ramp, int) or self.style_ramp < 0:
            raise ValueError(f"style_ramp={self.style_ramp!r} must be an int >= 0 (steps; 0: no ramp)")
        encoder_widths(self.width)
        encoder_arch(self.weights, self.arch)
        if self.preprocess is not None and self.preprocess not in Preprocessor.MODES:
            raise ValueError(f"preprocess={self.preprocess!r} is unknown; choose one of {', '.join(Preprocessor.MODES)}")
        for name in ("steps", "batch_size", "crop", "load_size", "log_every", "probe_every",
                     "checkpoint_every", "probe_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        if self.batch_size < 2 and self.mode == "compact":
            raise ValueError("batch_size must be >= 2 in compact mode: the xor loss compares images")
        if self.crop % 8:
            raise ValueError(f"crop={self.crop} must be a multiple of 8 (three 2x poolings); e.g. 256")
        if self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers} must be >= 0")
        for name in ("lr_decoder", "lr_encoder", "lr_decay", "content_weight", "style_weight",
                     "channel_weight", "xor_weight", "uncorrelation_weight", "pixel_weight", "content_guard"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}={value!r} must be a finite number >= 0")

    @property
    def trains_encoder(self) -> bool:
        """Whether the encoder is updated (every mode but ``baseline``)."""
        return self.mode != "baseline"

    def style_factor(self, step: int) -> float:
        """The ramp's share of ``style_weight`` at 0-based ``step`` (1 once the ramp is over)."""
        if self.stage == "invert":
            return 0.0
        if self.style_ramp == 0:
            return 1.0
        return min(1.0, (step + 1) / self.style_ramp)

    def to_dict(self) -> Dict[str, Any]:
        """Plain dict (JSON and ``weights_only`` checkpoint friendly)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys are {sorted(names)}")
        return cls(**data)


# --------------------------------------------------------------------------- data


def list_images(folder: PathLike) -> List[Path]:
    """Image files below ``folder`` (recursive, sorted, hidden files skipped).

    Raises:
        FileNotFoundError: ``folder`` is not a directory.
        ValueError: it holds no image file.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a directory")
    files = sorted(
        path
        for path in root.rglob("*")
        if path.is_file()
        and path.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    )
    if not files:
        raise ValueError(
            f"no image file ({', '.join(IMAGE_EXTENSIONS)}) below {str(root)!r}; point to a folder of images"
        )
    return files


def load_crop(
    path: PathLike, crop: int, load_size: Optional[int] = None, generator: Optional[torch.Generator] = None
) -> Tensor:
    """Read an image, scale its shorter side to ``load_size`` (at least ``crop``) and cut a ``crop`` square.

    The crop position is drawn from ``generator``; ``None`` takes the centre.
    Returns ``[3, crop, crop]`` in [0, 1].
    """
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read {str(path)!r} as an image ({err.__class__.__name__}); remove it") from None
    shorter = max(crop, load_size or min(image.size))
    scale = shorter / min(image.size)
    size = (max(crop, round(image.width * scale)), max(crop, round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    width, height = image.size
    if generator is None:
        left, top = (width - crop) // 2, (height - crop) // 2
    else:
        left = int(torch.randint(0, width - crop + 1, (1,), generator=generator))
        top = int(torch.randint(0, height - crop + 1, (1,), generator=generator))
    image = image.crop((left, top, left + crop, top + crop))
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(crop, crop, 3).permute(2, 0, 1).float().div(255.0)


_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def augment_crop(image: Tensor, generator: torch.Generator, hue_turn: float = 0.05) -> Tensor:
    """Random horizontal flip and colour jitter of one ``[3, H, W]`` image in [0, 1].

    Brightness and contrast 0.8-1.2x, saturation 0.7-1.3x, hue rotated by up to
    ``hue_turn`` of a full turn either way (in YIQ space). A pure function of the
    generator's state.

    Example:
        >>> out = augment_crop(torch.rand(3, 8, 8), torch.Generator().manual_seed(0))
        >>> out.shape, bool(out.min() >= 0 and out.max() <= 1)
        (torch.Size([3, 8, 8]), True)
    """
    draws = torch.rand(5, generator=generator).tolist()
    if draws[0] < 0.5:
        image = image.flip(-1)
    brightness, contrast, saturation = 0.8 + 0.4 * draws[1], 0.8 + 0.4 * draws[2], 0.7 + 0.6 * draws[3]
    angle = (2 * draws[4] - 1) * hue_turn * 2 * math.pi
    cos, sin = math.cos(angle), math.sin(angle)
    rotate = torch.tensor([[1.0, 0.0, 0.0], [0.0, cos * saturation, -sin * saturation],
                           [0.0, sin * saturation, cos * saturation]])
    transform = torch.linalg.inv(_YIQ) @ rotate @ _YIQ
    image = torch.einsum("ij,jhw->ihw", transform, image) * brightness
    mean = image.mean()
    return ((image - mean) * contrast + mean).clamp(0.0, 1.0)


class PairedCropBatches(Dataset):
    """Item ``step`` is a (content, style) batch of random crops, a pure function of ``(seed, step)``.

    Images are drawn with replacement, so a resumed run sees exactly the batches
    the uninterrupted run would have, with or without loader workers. With
    ``augment``, every crop is cut at a random scale (0.7-1.4x ``load_size``) and
    jittered by :func:`augment_crop` (styles by up to a full hue turn).
    """

    def __init__(
        self,
        content_files: Sequence[Path],
        style_files: Sequence[Path],
        batch_size: int,
        crop: int,
        load_size: Optional[int],
        seed: int,
        steps: int,
        augment: bool = False,
    ) -> None:
        self.augment = augment
        self.content_files = list(content_files)
        self.style_files = list(style_files)
        self.batch_size = batch_size
        self.crop = crop
        self.load_size = load_size
        self.seed = seed
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def _draw(self, files: Sequence[Path], generator: torch.Generator, hue_turn: float) -> Tensor:
        picks = torch.randint(0, len(files), (self.batch_size,), generator=generator).tolist()
        crops = []
        for index in picks:
            load_size = self.load_size
            if self.augment:
                scale = 0.7 + 0.7 * float(torch.rand(1, generator=generator))
                load_size = max(self.crop, round(scale * (self.load_size or self.crop)))
            crop = load_crop(files[index], self.crop, load_size, generator)
            crops.append(augment_crop(crop, generator, hue_turn) if self.augment else crop)
        return torch.stack(crops)

    def __getitem__(self, step: int) -> Tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return self._draw(self.content_files, generator, 0.05), self._draw(self.style_files, generator, 0.5)


def _probe_images(config: TrainConfig, content: Sequence[Path], style: Sequence[Path]) -> Tensor:
    if config.probe_dir is not None:
        files = list_images(config.probe_dir)[: config.probe_images]
    else:
        half = max(1, config.probe_images // 2)
        files = list(content[:half]) + list(style[: config.probe_images - half])
    return torch.stack([load_crop(path, config.crop, config.load_size) for path in files])


def _probe_styles(config: TrainConfig, style: Sequence[Path], count: int) -> Tensor:
    """One style per probe content image: the held-out styles (cycled), else the first training styles."""
    files = list_images(config.probe_style_dir) if config.probe_style_dir is not None else list(style)
    return torch.stack([load_crop(files[index % len(files)], config.crop, config.load_size) for index in range(count)])


# --------------------------------------------------------------------------- losses


class LossNetwork(nn.Module):
    """A frozen encoder that measures relu1_1..relu4_1 of images in [0, 1] (AdaIN's loss network)."""

    def __init__(self, encoder: nn.Sequential, preprocess: str = "imagenet") -> None:
        super().__init__()
        self.encoder = encoder
        self.encoder.eval()
        self.encoder.requires_grad_(False)
        self.taps = FeatureExtractor(self.encoder, STYLE_LAYERS)
        self.preprocessor = Preprocessor(preprocess)

    def forward(self, images: Tensor) -> Dict[str, Tensor]:
        return self.taps(self.preprocessor.normalize(images))

    def train(self, mode: bool = True) -> "LossNetwork":
        # Frozen by design: ignore a parent's .train().
        return super().train(False)


def style_loss(output: Dict[str, Tensor], style: Dict[str, Tensor]) -> Tensor:
    """AdaIN's style loss: sum over layers of the MSE between channel means and between channel stds."""
    total = None
    for name in STYLE_LAYERS:
        out_mean, out_std = channel_mean_std(output[name])
        style_mean, style_std = channel_mean_std(style[name])
        term = F.mse_loss(out_mean, style_mean) + F.mse_loss(out_std, style_std)
        total = term if total is None else total + term
    assert total is not None
    return total


def count_inactive(feature: Tensor) -> int:
    """Channels of ``[B, C, H, W]`` that are exactly zero on every image: consistently inactive."""
    return int((feature.detach().flatten(2) != 0).any(dim=2).any(dim=0).logical_not().sum())


# --------------------------------------------------------------------------- model state


@dataclass
class TrainedModel:
    """A network loaded from a checkpoint, with its loss network and config."""

    net: AdaINNet
    loss_network: LossNetwork
    config: TrainConfig
    step: int


def _build(config: TrainConfig) -> Tuple[AdaINNet, LossNetwork]:
    encoder = build_encoder(config.weights, config.width, config.arch)
    preprocess = config.preprocess or default_preprocess(config.weights)
    loss_network = LossNetwork(copy.deepcopy(encoder), preprocess)
    net = AdaINNet(encoder, build_decoder(encoder), preprocess)
    net.encoder.requires_grad_(config.trains_encoder)
    return net, loss_network


def _optimizers(config: TrainConfig, net: AdaINNet) -> Dict[str, torch.optim.Optimizer]:
    optimizers = {"decoder": torch.optim.Adam(net.decoder.parameters(), lr=config.lr_decoder)}
    if config.trains_encoder:
        optimizers["encoder"] = torch.optim.Adam(net.encoder.parameters(), lr=config.lr_encoder)
    return optimizers


def _checkpoint_state(
    config: TrainConfig, net: AdaINNet, loss_network: LossNetwork,
    optimizers: Dict[str, torch.optim.Optimizer], step: int, style_scale: float = 1.0,
) -> Dict[str, Any]:
    return {
        "style_scale": style_scale,
        "format": CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        "step": step,
        "encoder": net.encoder.state_dict(),
        "decoder": net.decoder.state_dict(),
        "loss_network": loss_network.encoder.state_dict(),
        "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
        "rng": torch.get_rng_state(),
    }


def read_tensor_file(path: PathLike, kind: str, hint: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with errors that name the file.

    Raises:
        FileNotFoundError: no such file (the message names ``kind`` and ends with ``hint``).
        ValueError: the file cannot be read as a tensors-only torch file.
    """
    target = Path(path)
    if not target.is_file():
        raise FileNotFoundError(f"{kind} {str(target)!r} does not exist; {hint}")
    try:
        return torch.load(target, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt files
        raise ValueError(f"cannot read {kind} {str(target)!r} ({err.__class__.__name__}: {err})") from None


def _read_checkpoint(path: PathLike) -> Dict[str, Any]:
    state = read_tensor_file(path, "checkpoint", "train first (adain train)")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not an AdaIN checkpoint written by adain_train.train")
    return state


def _structure_config(config: TrainConfig) -> TrainConfig:
    # The checkpoint holds the weights: build the structure without downloading anything,
    # with the architecture and input convention the run's weights implied.
    return dataclasses.replace(
        config,
        weights="random",
        arch=encoder_arch(config.weights, config.arch),
        preprocess=config.preprocess or default_preprocess(config.weights),
    )


_ENCODER_SETTINGS = ("width", "arch", "preprocess", "weights")


def _start_from(config: TrainConfig, net: AdaINNet, loss_network: LossNetwork) -> None:
    """Load ``config.init_from``'s encoder, decoder and loss network into a fresh run's networks."""
    assert config.init_from is not None
    state = _read_checkpoint(config.init_from)
    source = TrainConfig.from_dict(state["config"])
    built, trained = _structure_config(config), _structure_config(source)  # defaults resolved
    for name in _ENCODER_SETTINGS:
        mine, theirs = (config, source) if name == "weights" else (built, trained)  # weights: as named
        if getattr(mine, name) != getattr(theirs, name):
            raise ValueError(
                f"init_from {config.init_from!r} was trained with {name}={getattr(source, name)!r}, this run asks "
                f"for {name}={getattr(config, name)!r}; pass the same encoder settings (--{name.replace('_', '-')})"
            )
    net.encoder.load_state_dict(state["encoder"])
    net.decoder.load_state_dict(state["decoder"])
    loss_network.encoder.load_state_dict(state["loss_network"])


def load_checkpoint(path: PathLike) -> TrainedModel:
    """Load a checkpoint (``weights_only=True``) into a fresh network in eval mode.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not an AdaIN checkpoint.
    """
    return model_from_checkpoint(_read_checkpoint(path))


def model_from_checkpoint(state: Dict[str, Any]) -> TrainedModel:
    """The network of a checkpoint already read (:func:`load_checkpoint` reads and calls this)."""
    config = TrainConfig.from_dict(state["config"])
    net, loss_network = _build(_structure_config(config))
    net.encoder.load_state_dict(state["encoder"])
    net.decoder.load_state_dict(state["decoder"])
    loss_network.encoder.load_state_dict(state["loss_network"])
    net.eval()
    net.requires_grad_(False)
    return TrainedModel(net, loss_network, config, int(state["step"]))


# --------------------------------------------------------------------------- log


def read_log(path: PathLike) -> List[Dict[str, Any]]:
    """Entries of a ``log.jsonl`` (one JSON object per line); a missing file is an empty log."""
    target = Path(path)
    if not target.is_file():
        return []
    entries = []
    for number, line in enumerate(target.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{str(target)!r} line {number} is not JSON; delete the line or the file") from None
    return entries


def _rewrite_log(path: Path, entries: Sequence[Dict[str, Any]]) -> None:
    with atomic_write(path, "w") as handle:
        for entry in entries:
            handle.write(json.dumps(entry) + "\n")


def plot_training_log(log_path: PathLike, png_path: PathLike, title: Optional[str] = None) -> None:
    """PNG of the losses, the inactive relu4_1 channels and the held-out content distance over the steps."""
    from matplotlib.figure import Figure

    entries = read_log(log_path)
    if not entries:
        raise ValueError(f"{str(log_path)!r} has no entries to plot; train for at least log_every steps")
    fig = Figure(figsize=(16, 4), layout="constrained")
    losses, channels, kept = fig.subplots(1, 3)
    for key in ("content", "style", "pixel", "channel", "xor", "uncorrelation"):
        points = [(e["step"], e[key]) for e in entries if key in e and e[key] > 0]
        if points:
            losses.plot(*zip(*points), label=key)
    losses.set_yscale("log")
    losses.set_xlabel("step")
    losses.set_ylabel("loss (unweighted)")
    losses.legend()
    for key, label in (("batch_inactive", "inactive on the batch"),
                       ("probe_inactive", "inactive on every probe image")):
        points = [(e["step"], e[key]) for e in entries if key in e]
        if points:
            channels.plot(*zip(*points), label=label, marker="." if key == "probe_inactive" else None)
    channels.set_xlabel("step")
    channels.set_ylabel(f"relu4_1 channels of {entries[-1].get('channels', '?')}")
    channels.legend()
    for key, label in (("probe_content", "held-out outputs"), ("probe_content_flat", "flat (mean colour)"),
                       ("probe_content_blurred", "blurred to 1/8")):
        points = [(e["step"], e[key]) for e in entries if key in e]
        if points:
            kept.plot(*zip(*points), label=label, marker="." if key == "probe_content" else None,
                      linestyle="-" if key == "probe_content" else "--")
    kept.set_xlabel("step")
    kept.set_ylabel("held-out relu4_1 distance to content")
    structure = [(e["step"], e["probe_structure"]) for e in entries if "probe_structure" in e]
    if structure:
        twin = kept.twinx()
        twin.plot(*zip(*structure), color="tab:red", marker="x", label="structure (normalised), held-out outputs")
        flat_structure = [(e["step"], e["probe_structure_flat"]) for e in entries if "probe_structure_flat" in e]
        twin.plot(*zip(*flat_structure), color="tab:red", linestyle=":", label="structure, flat")
        twin.set_ylabel("normalised relu4_1 distance", color="tab:red")
        twin.legend(loc="upper right")
    kept.legend(loc="upper left")
    fig.suptitle(title or "AdaIN training")
    with atomic_write(png_path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=100)


# --------------------------------------------------------------------------- training


def _set_lr(config: TrainConfig, optimizers: Dict[str, torch.optim.Optimizer], step: int) -> None:
    factor = 1.0 / (1.0 + config.lr_decay * step)
    base = {"decoder": config.lr_decoder, "encoder": config.lr_encoder}
    for name, optimizer in optimizers.items():
        for group in optimizer.param_groups:
            group["lr"] = base[name] * factor


def _regularizer(config: TrainConfig, net: AdaINNet) -> Optional[ChannelRegularizer]:
    if config.mode == "compact":
        return ChannelRegularizer(net.encoder, [encoder_output(net.encoder)], config.channel_weight, config.xor_weight)
    if config.mode == "uncorrelation":
        return ChannelRegularizer(net.encoder, [encoder_output(net.encoder)], 0.0, 0.0, config.uncorrelation_weight)
    return None


def _regularizer_terms(config: TrainConfig, features: Tensor) -> Dict[str, float]:
    """Unweighted values of the terms the mode uses, for the log."""
    with torch.no_grad():
        if config.mode == "compact":
            return {"channel": float(channel_loss(features)), "xor": float(xor_loss(features))}
        if config.mode == "uncorrelation":
            return {"uncorrelation": float(uncorrelation_loss(features))}
    return {}


def _train_step(
    config: TrainConfig,
    net: AdaINNet,
    loss_network: LossNetwork,
    regularizer: Optional[ChannelRegularizer],
    optimizers: Dict[str, torch.optim.Optimizer],
    content: Tensor,
    style: Tensor,
    style_weight: float,
) -> Dict[str, Any]:
    if config.stage == "invert":
        return _invert_step(config, net, optimizers, content)
    # One encoder pass over content and style: the regulariser (which keeps only
    # the latest forward) sees both, and the xor loss compares all 2B images.
    content_features, style_features = net.encode_pair(content, style)
    penalty = regularizer.loss() if regularizer is not None else None
    both = torch.cat([content_features, style_features]).detach()
    terms = _regularizer_terms(config, both)
    target = adain(content_features, style_features)
    output = net.decoder(target)
    output_features = loss_network(output)
    with torch.no_grad():
        style_targets = loss_network(style)
    if config.content_target == "adain":
        measured = net.encode(output) if config.trains_encoder else output_features["relu4_1"]
        content_value = F.mse_loss(measured, target.detach())
    else:
        with torch.no_grad():
            reference = loss_network(content)["relu4_1"]
        content_value = F.mse_loss(output_features["relu4_1"], reference)
    style_value = style_loss(output_features, style_targets)
    total = config.content_weight * content_value + style_weight * style_value
    if penalty is not None:
        total = total + penalty
    _optimise(optimizers, total)
    if regularizer is not None:
        regularizer.clear()
    return {
        "loss": total.item(),
        "content": content_value.item(),
        "style": style_value.item(),
        "style_weight": style_weight,
        **terms,
        "batch_inactive": count_inactive(both),
        "channels": both.shape[1],
    }


def _optimise(optimizers: Dict[str, torch.optim.Optimizer], total: Tensor) -> None:
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    total.backward()
    for optimizer in optimizers.values():
        optimizer.step()


def _invert_step(
    config: TrainConfig,
    net: AdaINNet,
    optimizers: Dict[str, torch.optim.Optimizer],
    content: Tensor,
) -> Dict[str, Any]:
    # Stage 1: the decoder alone learns to reconstruct the content from the frozen encoder's relu4_1,
    # measured by that same encoder (the loss network's weights in baseline mode, the only mode here).
    with torch.no_grad():
        features = net.encode(content)
    output = net.decoder(features)
    content_value = F.mse_loss(net.encode(output), features)
    pixel_value = F.mse_loss(output, content)
    total = config.content_weight * content_value + config.pixel_weight * pixel_value
    _optimise(optimizers, total)
    return {
        "loss": total.item(),
        "content": content_value.item(),
        "pixel": pixel_value.item(),
        "batch_inactive": count_inactive(features),
        "channels": features.shape[1],
    }


@torch.no_grad()
def _probe_content(config: TrainConfig, net: AdaINNet, loss_network: LossNetwork, probe: Tensor,
                   probe_style: Tensor) -> Tuple[float, float]:
    """relu4_1 distance of the held-out outputs to their content (reconstructions or stylisations): raw, normalised."""
    was_training = net.training
    net.eval()
    outputs = []
    for index in range(0, probe.shape[0], config.batch_size):
        content = probe[index: index + config.batch_size]
        features = net.encode(content)
        if config.stage == "stylise":
            features = adain(features, net.encode(probe_style[index: index + config.batch_size]))
        outputs.append(net.decoder(features).clamp(0.0, 1.0))
    net.train(was_training)
    net.encoder.train(was_training and config.trains_encoder)
    return content_distances(loss_network, torch.cat(outputs), probe, config.batch_size)


def _probe_inactive(net: AdaINNet, probe: Tensor, batch_size: int) -> int:
    with torch.no_grad():
        features = torch.cat([net.encode(chunk) for chunk in probe.split(batch_size * 2)])
    return count_inactive(features)


def _check_device(device: Optional[Union[str, torch.device]]) -> torch.device:
    try:
        target = torch.device(device) if device is not None else torch.device("cpu")
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a torch device; use e.g. cpu, cuda, cuda:1, mps") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} is not available here (no CUDA device); use cpu")
    return target


def train(
    config: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    on_log: Optional[Callable[[Dict[str, Any]], None]] = None,
    plot: bool = True,
    device: Optional[Union[str, torch.device]] = None,
) -> TrainedModel:
    """Train (or with ``resume``, continue) an AdaIN network; return it with its loss network.

    Writes into ``config.out_dir``: ``config.json``, ``log.jsonl`` (a line every
    ``log_every`` steps: losses, inactive relu4_1 channels on the batch, and every
    ``probe_every`` steps on the probe images), ``log.png`` and ``checkpoint.pt``
    (every ``checkpoint_every`` steps and at the end, written atomically).

    Args:
        config: the run's settings.
        resume: continue from ``out_dir/checkpoint.pt`` if it exists. Its settings win,
            except ``steps`` (so a finished run can be extended) and ``num_workers``.
        progress: show a progress bar on stderr.
        on_log: called with every log entry (e.g. to print it).
        plot: redraw ``log.png`` at every checkpoint (needs matplotlib).
        device: where to train (``"cuda"``, ...); default CPU. Checkpoints load on any device.

    Raises:
        ValueError: a bad setting, a folder without images, a checkpoint of another run.
        WeightsUnavailableError: ImageNet weights cannot be downloaded (pass a PATH).
    """
    config.validate()
    device = _check_device(device)
    out_dir = Path(config.out_dir)
    checkpoint_path = out_dir / CHECKPOINT_NAME
    log_path = out_dir / LOG_NAME
    if not resume and checkpoint_path.is_file():
        raise ValueError(
            f"{str(out_dir)!r} already holds a checkpoint; pass resume=True (--resume) to continue "
            "it, or choose another output folder"
        )
    state = _read_checkpoint(checkpoint_path) if resume and checkpoint_path.is_file() else None
    if state is not None:
        saved = TrainConfig.from_dict(state["config"])
        config = dataclasses.replace(
            saved, steps=config.steps, out_dir=config.out_dir, num_workers=config.num_workers,
            threads=config.threads or saved.threads,
        )
        net, loss_network = _build(_structure_config(config))
        net.encoder.load_state_dict(state["encoder"])
        net.decoder.load_state_dict(state["decoder"])
        loss_network.encoder.load_state_dict(state["loss_network"])
        net.to(device)
        loss_network.to(device)
        optimizers = _optimizers(config, net)
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        start = int(state["step"])
        style_scale = float(state.get("style_scale", 1.0))
        torch.set_rng_state(state["rng"])
        # Entries logged after the checkpoint will be logged again.
        _rewrite_log(log_path, [e for e in read_log(log_path) if e["step"] <= start])
    else:
        torch.manual_seed(config.seed)
        net, loss_network = _build(_structure_config(config) if config.init_from else config)
        if config.init_from:
            _start_from(config, net, loss_network)
        net.to(device)
        loss_network.to(device)
        optimizers = _optimizers(config, net)
        start = 0
        style_scale = 1.0
        _rewrite_log(log_path, [])
    # The run's own folders (from the checkpoint when resuming), and its threads.
    content_files = list_images(config.content_dir)
    style_files = list_images(config.style_dir)
    if config.threads:
        torch.set_num_threads(config.threads)
    write_json(out_dir / "config.json", config.to_dict())

    probe = _probe_images(config, content_files, style_files).to(device)
    probe_style = _probe_styles(config, style_files, probe.shape[0]).to(device)
    references = content_references(loss_network, probe)
    structure_references = content_references(loss_network, probe, normalize=True)
    batches = PairedCropBatches(
        content_files, style_files, config.batch_size, config.crop, config.load_size, config.seed, config.steps,
        augment=config.augment,
    )
    loader = DataLoader(
        batches, batch_size=None, sampler=range(start, config.steps), num_workers=config.num_workers
    )
    regularizer = _regularizer(config, net)
    net.train()
    net.encoder.train(config.trains_encoder)
    step = start
    try:
        # prunekit's progress display: a bar on a terminal, a line every 30 s off one (a log file, nohup, CI).
        with progress_bar(config.steps - start, "training AdaIN", progress) as tick, \
                open(log_path, "a", encoding="utf-8") as log:
            iterator: Iterator[Tuple[Tensor, Tensor]] = iter(loader)
            for step in range(start, config.steps):
                content, style = (batch.to(device) for batch in next(iterator))
                _set_lr(config, optimizers, step)
                style_weight = config.style_weight * style_scale * config.style_factor(step)
                entry = _train_step(config, net, loss_network, regularizer, optimizers, content, style, style_weight)
                done = step + 1
                if done % config.probe_every == 0 or done == config.steps:
                    entry["probe_inactive"] = _probe_inactive(net, probe, config.batch_size)
                    entry["probe_content"], entry["probe_structure"] = _probe_content(
                        config, net, loss_network, probe, probe_style)
                    entry.update({f"probe_content_{name}": value for name, value in references.items()})
                    entry.update({f"probe_structure_{name}": value for name, value in structure_references.items()})
                    if (config.stage == "stylise" and config.content_guard
                            and entry["probe_structure"] > config.content_guard * structure_references["flat"]):
                        style_scale /= 2.0
                        entry["style_scale"] = style_scale
                if done % config.log_every == 0 or "probe_inactive" in entry:
                    entry = {"step": done, **entry}
                    log.write(json.dumps(entry) + "\n")
                    log.flush()
                    if on_log is not None:
                        on_log(entry)
                if done % config.checkpoint_every == 0 or done == config.steps:
                    log.flush()
                    save_torch(_checkpoint_state(config, net, loss_network, optimizers, done, style_scale),
                               checkpoint_path)
                    if plot:
                        plot_training_log(log_path, out_dir / "log.png", f"AdaIN, mode {config.mode}")
                step = done
                tick(f"step {done}")
    finally:
        if regularizer is not None:
            regularizer.remove()
    net.eval()
    net.requires_grad_(False)
    return TrainedModel(net, loss_network, config, step)
