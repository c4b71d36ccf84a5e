"""Which relu4_1 channels a trained AdaIN encoder never uses, and what removing the weakest ones costs.

* :func:`encoder_stats` / :func:`compare_runs`: :func:`prunekit.stats.collect_channel_stats`
  on held-out images, the per-image firing picture (images x channels, white:
  the channel fires, black: it is silent), the sorted per-channel l2 plot and
  the count of consistently inactive channels (silent on every image).
* :func:`prune_sweep`: for each count N, mask the N weakest channels of conv4_1
  (:func:`prunekit.channel_activation`, criterion l2), physically remove them
  from conv4_1 and from the decoder's first conv (:func:`prunekit.compact`), and
  measure the parameters, the stylisation time dense vs compact (side by side,
  interleaved, median) and the quality against the dense output: content and
  style losses under the fixed loss network, PSNR and SSIM.

A channel that conv4_1 no longer produces is all zero for content and style,
so AdaIN maps it to ``(0 - 0) / std * std_s + 0 = 0``; the decoder's first conv
reads a zero input there and dropping its input channel changes nothing. The
compacted network is therefore exactly the masked one, which the sweep checks.
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import click
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from examples.style_transfer.adain import AdaINNet, encoder_last_conv
from examples.style_transfer.adain_train import LossNetwork, list_images, load_crop, style_loss
from examples.style_transfer.imaging import side_by_side, stack_rows
from examples.style_transfer.quality import SSIM_WINDOW, psnr, ssim
from prunekit.compact import compact_chain
from prunekit.io.files import PathLike, atomic_write, write_json
from prunekit.methods import channel_activation
from prunekit.measure.timing import Speedup, latency_samples, speedup
from prunekit.stats import ChannelStats, collect_channel_stats, plot_channel_magnitudes, save_channel_stats

__all__ = [
    "REFERENCE_COUNTS",
    "SweepRow",
    "compact_adain",
    "compare_runs",
    "consistently_inactive",
    "encoder_stats",
    "load_heldout",
    "mask_weakest",
    "plot_response_comparison",
    "plot_sweep",
    "prune_sweep",
    "psnr",
    "save_sweep_grid",
    "scaled_counts",
    "ssim",
    "time_side_by_side",
]

#: The paper's sweep over the 512 relu4_1 channels of the full VGG-19.
REFERENCE_COUNTS: Tuple[int, ...] = (0, 100, 200, 300, 400, 470, 490, 500)


# --------------------------------------------------------------------------- data and stats


def load_heldout(folder: PathLike, size: int, limit: Optional[int] = None) -> Tensor:
    """Centre ``size`` crops of the images below ``folder`` (sorted; at most ``limit``), ``[N, 3, S, S]``."""
    files = list_images(folder)
    if limit is not None:
        files = files[:limit]
    return torch.stack([load_crop(path, size, size) for path in files])


def encoder_stats(net: AdaINNet, images: Tensor, batch_size: int = 8) -> ChannelStats:
    """relu4_1 channel statistics of ``net``'s encoder on images in [0, 1] (``[N, 3, H, W]``)."""
    batches = [net.preprocessor.normalize(chunk) for chunk in images.split(batch_size)]
    last = encoder_last_conv(net.encoder)
    return collect_channel_stats(net.encoder, batches, layers=[last])[last]


def consistently_inactive(stats: ChannelStats) -> int:
    """Channels that never fire on any of the images (``l0 == 0``)."""
    return int((stats.l0 == 0).sum())


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save_figure(fig: Any, path: PathLike) -> None:
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=100)


def plot_response_comparison(stats_by_label: Mapping[str, ChannelStats], path: PathLike) -> None:
    """One panel per run: images x relu4_1 channels, white where the channel fires, black where silent.

    Channels are in their natural order, so columns that are black from top to
    bottom are the consistently inactive ones.
    """
    if not stats_by_label:
        raise ValueError("stats_by_label is empty; pass at least one {label: ChannelStats}")
    fig = _figure(9.0, 2.6 * len(stats_by_label))
    axes = fig.subplots(len(stats_by_label), 1, squeeze=False)[:, 0]
    for ax, (label, stats) in zip(axes, stats_by_label.items()):
        ax.imshow(stats.per_image_l0.numpy(), cmap="gray", vmin=0, vmax=1, aspect="auto",
                  interpolation="nearest")
        ax.set_title(f"{label}: {consistently_inactive(stats)}/{stats.num_channels} channels never fire "
                     f"on {stats.num_images} held-out images")
        ax.set_ylabel("image")
    axes[-1].set_xlabel("relu4_1 channel")
    _save_figure(fig, path)


def compare_runs(
    nets: Mapping[str, AdaINNet], images: Tensor, out_dir: PathLike, batch_size: int = 8
) -> Dict[str, Any]:
    """Stats of each run's encoder on the same held-out images, with the two plots and a summary.

    Writes ``stats_<label>.json``, ``response.png``, ``magnitudes.png`` and
    ``summary.json`` into ``out_dir``; returns the summary.
    """
    out = Path(out_dir)
    stats = OrderedDict((label, encoder_stats(net, images, batch_size)) for label, net in nets.items())
    for label, layer_stats in stats.items():
        save_channel_stats({encoder_last_conv(nets[label].encoder): layer_stats}, out / f"stats_{label}.json")
    plot_response_comparison(stats, out / "response.png")
    plot_channel_magnitudes(stats, out / "magnitudes.png", "relu4_1 channel magnitudes on held-out images")
    summary = {
        "images": int(images.shape[0]),
        "image_size": list(images.shape[2:]),
        "runs": {
            label: {
                "channels": s.num_channels,
                "consistently_inactive": consistently_inactive(s),
                "inactive_on_some_image": int((s.l0 < 1).sum()),
                "mean_firing_rate": float(s.l0.mean()),
            }
            for label, s in stats.items()
        },
    }
    write_json(out / "summary.json", summary)
    return summary


# --------------------------------------------------------------------------- pruning


def mask_weakest(net: AdaINNet, stats: ChannelStats, count: int, criterion: str = "l2") -> AdaINNet:
    """A copy of ``net`` whose conv4_1 has its ``count`` weakest channels masked (weight and bias)."""
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= stats.num_channels:
        raise ValueError(f"count={count!r} must be an int in [0, {stats.num_channels}]")
    masked = copy.deepcopy(net)
    if count > 0:
        channel_activation(masked.encoder[int(encoder_last_conv(masked.encoder))], stats, amount=count, criterion=criterion)
    return masked


def compact_adain(masked: AdaINNet) -> AdaINNet:
    """Physically remove the masked conv4_1 channels and the decoder inputs they fed.

    Returns a new network; ``masked`` is not modified.
    """
    encoder, decoder = compact_chain(masked.encoder, masked.decoder)
    return AdaINNet(encoder, decoder, masked.preprocessor.mode)


# --------------------------------------------------------------------------- metrics


def _losses(loss_network: LossNetwork, output: Tensor, content: Tensor, style: Tensor) -> Tuple[float, float]:
    with torch.no_grad():
        out = loss_network(output)
        content_value = F.mse_loss(out["relu4_1"], loss_network(content)["relu4_1"]).item()
        style_value = style_loss(out, loss_network(style)).item()
    return content_value, style_value


def time_side_by_side(
    first: nn.Module, second: nn.Module, inputs: Sequence[Tensor], repeats: int = 10, warmup: int = 2
) -> Tuple[float, float, Speedup]:
    """Median seconds per call of ``first(*inputs)`` and ``second(*inputs)``, and the speed-up with its interval.

    Alternating the two within each repeat exposes both to the same load on a
    shared machine, so their ratio is meaningful even when the absolute times drift.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    # prunekit's timer: interleaved rounds, CUDA synchronised around each call, paired ratios.
    samples = latency_samples({"first": first, "second": second}, tuple(inputs), repeats=repeats, warmup=warmup)
    gain = speedup(samples["first"], samples["second"])
    return statistics.median(samples["first"]), statistics.median(samples["second"]), gain


# --------------------------------------------------------------------------- sweep


def scaled_counts(channels: int, reference: Sequence[int] = REFERENCE_COUNTS) -> List[int]:
    """The paper's counts (out of 512 channels) scaled to ``channels``, without duplicates.

    Example:
        >>> scaled_counts(64)
        [0, 12, 25, 38, 50, 59, 61, 62]
    """
    counts = [min(channels - 1, round(n * channels / 512)) for n in reference]
    return list(dict.fromkeys(counts))


@dataclass
class SweepRow:
    """Measurements for one pruned count N."""

    pruned: int
    channels_left: int
    params: int
    params_dense: int
    time_dense_s: float
    time_compact_s: float
    content_loss: float
    style_loss: float
    content_loss_dense: float
    style_loss_dense: float
    psnr_db: float
    ssim: float
    max_abs_diff_vs_masked: float
    max_rel_diff_vs_masked: float
    inactive_pruned: int
    speedup: float = float("nan")
    speedup_low: float = float("nan")
    speedup_high: float = float("nan")

    @property
    def within_noise(self) -> bool:
        """The speed-up's 95 % interval holds 1.0: the timings cannot tell dense and compact apart."""
        return self.speedup_low <= 1.0 <= self.speedup_high

    def to_dict(self) -> Dict[str, Any]:
        """Plain dict for JSON; an infinite PSNR (output identical to the dense one) becomes ``None``."""
        data = dict(self.__dict__)
        if not math.isfinite(data["psnr_db"]):
            data["psnr_db"] = None
        data["within_noise"] = self.within_noise
        data["params_saved_fraction"] = 1.0 - self.params / self.params_dense
        return data


def prune_sweep(
    net: AdaINNet,
    loss_network: LossNetwork,
    stats: ChannelStats,
    content: Tensor,
    style: Tensor,
    counts: Optional[Sequence[int]] = None,
    timing_repeats: int = 10,
    alpha: float = 1.0,
    progress: bool = False,
) -> Tuple[List[SweepRow], Dict[int, Tensor]]:
    """Prune the N weakest conv4_1 channels for each N, compact, and measure against the dense network.

    Args:
        net: the trained network (not modified).
        loss_network: the fixed network that measures content and style losses.
        stats: relu4_1 stats of ``net`` on held-out images (ranks the channels by l2).
        content, style: held-out pairs ``[B, 3, H, W]`` in [0, 1] (same B, or style B=1).
        counts: channel counts to prune; ``None``: :func:`scaled_counts`.
        timing_repeats: interleaved repeats per N for the dense vs compact timing.

    Returns:
        One :class:`SweepRow` per count, and the compact outputs by count (for a grid).
    """
    channels = stats.num_channels
    counts = list(counts) if counts is not None else scaled_counts(channels)
    bad = [n for n in counts if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < channels]
    if bad or not counts:
        raise ValueError(f"counts {bad or counts} must be non-empty ints in [0, {channels - 1}]")
    net.eval()
    with torch.no_grad():
        dense_output = net(content, style, alpha)
    dense_content, dense_style = _losses(loss_network, dense_output, content, style)
    dense_params = net.parameter_counts()["total"]
    never_fire = stats.l0 == 0
    order = torch.argsort(stats.score("l2"), stable=True)
    rows: List[SweepRow] = []
    outputs: Dict[int, Tensor] = {}
    bar = (click.progressbar(counts, label="prune sweep", file=sys.stderr) if progress
           else contextlib.nullcontext(counts))
    with bar as items:
        for count in items:
            masked = mask_weakest(net, stats, count)
            compacted = compact_adain(masked) if count > 0 else copy.deepcopy(net)
            compacted.eval()
            with torch.no_grad():
                masked_output = masked(content, style, alpha)
                output = compacted(content, style, alpha)
            diff = (output - masked_output).abs().max().item()
            scale = masked_output.abs().max().item()
            dense_time, compact_time, gain = time_side_by_side(
                _Stylizer(net, alpha), _Stylizer(compacted, alpha), (content, style), timing_repeats
            )
            content_value, style_value = _losses(loss_network, output, content, style)
            rows.append(
                SweepRow(
                    pruned=count,
                    channels_left=compacted.encoder[int(encoder_last_conv(compacted.encoder))].out_channels,
                    params=compacted.parameter_counts()["total"],
                    params_dense=dense_params,
                    time_dense_s=dense_time,
                    time_compact_s=compact_time,
                    content_loss=content_value,
                    style_loss=style_value,
                    content_loss_dense=dense_content,
                    style_loss_dense=dense_style,
                    psnr_db=psnr(output, dense_output),
                    ssim=ssim(output, dense_output) if min(output.shape[-2:]) >= SSIM_WINDOW else float("nan"),
                    max_abs_diff_vs_masked=diff,
                    max_rel_diff_vs_masked=diff / scale if scale > 0 else diff,
                    inactive_pruned=int(never_fire[order[:count]].sum()),
                    speedup=gain.ratio,
                    speedup_low=gain.low,
                    speedup_high=gain.high,
                )
            )
            outputs[count] = output
    return rows, outputs


class _Stylizer(nn.Module):
    """``net(content, style, alpha)`` as a two-input module, for timing."""

    def __init__(self, net: AdaINNet, alpha: float) -> None:
        super().__init__()
        self.net = net
        self.alpha = alpha

    def forward(self, content: Tensor, style: Tensor) -> Tensor:
        return self.net(content, style, self.alpha)


def plot_sweep(rows: Sequence[SweepRow], path: PathLike, title: Optional[str] = None) -> None:
    """PNG: parameters and speed-up (left), PSNR/SSIM to the dense output (middle), losses (right) vs N."""
    fig = _figure(14.0, 4.0)
    cost, fidelity, losses = fig.subplots(1, 3)
    pruned = [r.pruned for r in rows]
    cost.plot(pruned, [r.params / r.params_dense for r in rows], marker="o", label="parameters (rel.)")
    cost.plot(pruned, [r.time_compact_s / r.time_dense_s for r in rows], marker="s", label="time (rel.)")
    cost.set_xlabel("pruned relu4_1 channels")
    cost.set_ylabel("compact / dense")
    cost.legend()
    finite = [(r.pruned, r.psnr_db) for r in rows if r.psnr_db != float("inf")]
    if finite:
        fidelity.plot(*zip(*finite), marker="o", color="tab:blue", label="PSNR (dB)")
    fidelity.set_xlabel("pruned relu4_1 channels")
    fidelity.set_ylabel("PSNR to the dense output (dB)", color="tab:blue")
    twin = fidelity.twinx()
    twin.plot(pruned, [r.ssim for r in rows], marker="s", color="tab:orange")
    twin.set_ylabel("SSIM to the dense output", color="tab:orange")
    twin.set_ylim(min(0.9, min(r.ssim for r in rows) - 0.01), 1.005)
    losses.plot(pruned, [r.content_loss / r.content_loss_dense for r in rows], marker="o", label="content")
    losses.plot(pruned, [r.style_loss / r.style_loss_dense for r in rows], marker="s", label="style")
    losses.set_xlabel("pruned relu4_1 channels")
    losses.set_ylabel("loss / dense loss (fixed loss network)")
    losses.legend()
    fig.suptitle(title or "AdaIN: pruning the weakest relu4_1 channels")
    _save_figure(fig, path)


def save_sweep_grid(
    content: Tensor, style: Tensor, outputs: Mapping[int, Tensor], path: PathLike, rows: int = 4
) -> None:
    """PNG grid: one row per held-out pair (content, style, output for each N)."""
    lines: List[Image.Image] = []
    for index in range(min(rows, content.shape[0])):
        images = [content[index : index + 1], style[min(index, style.shape[0] - 1)][None]]
        labels = ["content", "style"]
        for count, output in outputs.items():
            images.append(output[index : index + 1].clamp(0, 1))
            labels.append(f"N={count}")
        lines.append(side_by_side(images, labels))
    canvas = stack_rows(lines)
    with atomic_write(path, "wb") as handle:
        canvas.save(handle, format="PNG")
