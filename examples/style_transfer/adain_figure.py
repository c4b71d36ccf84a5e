"""The seed figure: stylisations as the N weakest relu4_1 channels are removed, network beside network.

For each network (typically a baseline and a compact one trained with the channel + xor
losses), the relu4_1 channels are ranked by their l2 response on the run's *training*
images, the N weakest are removed for each N (:func:`~examples.style_transfer.adain_network.prune_weakest`,
conv4_1's outputs and the decoder's first conv's inputs), and the held-out pairs are
stylised. Per N the report holds the Gram distance of the output to the style and the
relu4_1 distance of the output to the content (both under the network's fixed loss network),
the parameters, the multiply-accumulates of one stylisation (counted by
``torch.utils.flop_counter.FlopCounterMode``) and the measured time beside the unpruned network
(:func:`~examples.style_transfer.adain_analysis.prune_sweep`). The picture puts one row per
network and pair, one column per N, and the sorted l2 curves underneath.

Example:
    >>> from examples.style_transfer.adain_figure import stylisation_macs
    >>> from examples.style_transfer.adain import AdaINNet
    >>> from torch import nn
    >>> net = AdaINNet(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()))
    >>> stylisation_macs(net, torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))  # 2 encoder passes + decoder
    20736
"""

from __future__ import annotations

import io
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from PIL import Image
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from examples.style_transfer.adain import AdaINNet
from examples.style_transfer.adain_analysis import encoder_stats, load_heldout, prune_sweep
from examples.style_transfer.adain_network import gram_distance, prune_weakest
from examples.style_transfer.imaging import side_by_side, stack_rows
from prunekit.io.files import PathLike, atomic_write
from prunekit.stats import ChannelStats

__all__ = ["FIGURE_COUNTS", "draw_pruning_figure", "format_figure_table", "pruning_figure", "stylisation_macs",
           "training_ranking"]

#: The issue's N: 0 to 500 of VGG's 512 relu4_1 channels.
FIGURE_COUNTS = (0, 100, 200, 300, 400, 500)


def stylisation_macs(net: AdaINNet, content: Tensor, style: Tensor) -> int:
    """Multiply-accumulates of one stylisation of the first pair (two encoder passes and the decoder)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(content[:1], style[:1])
    return int(counter.get_total_flops() // 2)


def training_ranking(network: Any, size: int, limit: int = 64) -> ChannelStats:
    """relu4_1 statistics that rank a network's channels: its file's own (training images), else its run's
    training folders (centre ``size`` crops of at most ``limit`` content and ``limit`` style images)."""
    if network.stats is not None:
        return network.stats
    images = torch.cat([load_heldout(network.config.content_dir, size, limit),
                        load_heldout(network.config.style_dir, size, limit)])
    return encoder_stats(network.net, images)


def pruning_figure(
    networks: Mapping[str, Any],
    content: Tensor,
    style: Tensor,
    rankings: Mapping[str, ChannelStats],
    counts: Sequence[int] = FIGURE_COUNTS,
    repeats: int = 10,
    progress: bool = False,
) -> Dict[str, Any]:
    """Prune each network's N weakest channels for every N and measure it; see the module docstring.

    Args:
        networks: label -> :class:`~examples.style_transfer.adain_network.LoadedNetwork`.
        content, style: held-out pairs ``[B, 3, H, W]`` in [0, 1].
        rankings: label -> the statistics that rank its channels (:func:`training_ranking`).
        counts: the N to prune.
        repeats: interleaved timing rounds per N.

    Returns:
        ``{"counts", "pairs", "size", "networks": {label: {"step", "never_fire", "ranking_images",
        "sorted_l2", "rows": [...]}}}`` and, under ``"outputs"``, label -> N -> the stylisations
        (tensors, for :func:`draw_pruning_figure`; not JSON).
    """
    if set(networks) != set(rankings):
        raise ValueError(f"rankings {sorted(rankings)} must name the same networks as {sorted(networks)}")
    report: Dict[str, Any] = {"counts": list(counts), "pairs": int(content.shape[0]), "size": int(content.shape[-1]),
                              "networks": {}, "outputs": {}}
    for label, network in networks.items():
        ranking = rankings[label]
        loss_network = network.loss_network()
        rows, outputs = prune_sweep(network.net, loss_network, ranking, content, style, list(counts), repeats,
                                    progress=progress)
        table = []
        for row in rows:
            pruned = prune_weakest(network.net, ranking, row.pruned)
            table.append({
                "pruned": row.pruned,
                "never_fire_pruned": row.inactive_pruned,
                "gram_distance": gram_distance(loss_network, outputs[row.pruned], style),
                "content_distance": row.content_loss,
                "params": row.params,
                "macs": stylisation_macs(pruned, content, style),
                "time_dense_ms": 1e3 * row.time_dense_s,
                "time_ms": 1e3 * row.time_compact_s,
                "speedup": row.speedup,
                "speedup_low": row.speedup_low,
                "speedup_high": row.speedup_high,
            })
        report["networks"][label] = {
            "step": int(network.step),
            "never_fire": int((ranking.l0 == 0).sum()),
            "ranking_images": int(ranking.num_images),
            "sorted_l2": sorted(ranking.l2.tolist(), reverse=True),
            "rows": table,
        }
        report["outputs"][label] = outputs
    return report


def format_figure_table(report: Mapping[str, Any]) -> str:
    """A Markdown table: one line per network and N."""
    lines = ["| network | pruned N | never-firing among them | Gram distance to the style | relu4_1 distance to "
             "the content | parameters | MMACs per stylisation | ms (unpruned ms) | speed-up (95 % interval) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, network in report["networks"].items():
        for row in network["rows"]:
            lines.append(
                f"| {label} | {row['pruned']} | {row['never_fire_pruned']} | {row['gram_distance']:.4g} | "
                f"{row['content_distance']:.4g} | {row['params']:,} | {row['macs'] / 1e6:,.0f} | "
                f"{row['time_ms']:.0f} ({row['time_dense_ms']:.0f}) | {row['speedup']:.2f}x "
                f"({row['speedup_low']:.2f}-{row['speedup_high']:.2f}) |")
    return "\n".join(lines)


def draw_pruning_figure(report: Mapping[str, Any], content: Tensor, style: Tensor, path: PathLike,
                        pairs: Optional[int] = None) -> None:
    """PNG: a row per network and held-out pair (content, style, the output at each N), the sorted l2 curves below."""
    from matplotlib.figure import Figure

    rows: List[Image.Image] = []
    shown = min(pairs or content.shape[0], content.shape[0])
    for label, outputs in report["outputs"].items():
        for index in range(shown):
            images = [content[index: index + 1], style[min(index, style.shape[0] - 1)][None]]
            labels = ["content", "style"]
            for count in report["counts"]:
                images.append(outputs[count][index: index + 1].clamp(0, 1))
                labels.append(f"{label}, N={count}")
            rows.append(side_by_side(images, labels))
    grid = stack_rows(rows)
    fig = Figure(figsize=(grid.width / 100, 3.2), layout="constrained")
    axes = fig.subplots(1, 1)
    for label, network in report["networks"].items():
        curve = network["sorted_l2"]
        axes.plot(range(len(curve)), curve, label=f"{label}: {network['never_fire']} never fire")
    for count in report["counts"]:
        if count:
            axes.axvline(len(curve) - count, color="grey", linewidth=0.6, linestyle=":")
    axes.set_xlabel("relu4_1 channel, strongest first (dotted: where N weakest are cut)")
    axes.set_ylabel("l2 response on training images")
    axes.set_yscale("symlog", linthresh=1e-3)
    axes.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    buffer.seek(0)
    with Image.open(buffer) as curve_image:
        canvas = stack_rows([grid, curve_image.convert("RGB")])
    with atomic_write(path, "wb") as handle:
        canvas.save(handle, format="PNG")
