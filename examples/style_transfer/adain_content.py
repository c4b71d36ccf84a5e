"""How much of its content image an AdaIN output keeps: relu4_1 distance, beside two references.

A decoder that only inverts relu4_1 (stage 1 of the staged recipe) should put out an image
whose relu4_1 is close to the content's; a stylisation moves relu4_1 towards the AdaIN target
but should stay closer to the content than an image that has none of it. Two references make
the number readable:

* ``flat``: each image replaced by its mean colour (no content at all);
* ``blurred``: each image shrunk to 1/8 of its size and scaled back (coarse layout only).

The distance is the mean squared difference of relu4_1 under the run's loss network (the
frozen starting encoder), averaged over the images, as the training's content loss. A
stylisation is far from its content by that measure even when it keeps every shape: AdaIN
gives each channel the style's mean and std, and on HED's relu4_1 the AdaIN target itself is
farther from the content's features than a flat image's are (measured: 228 against 215). With
``normalize=True`` each channel of both maps is first normalised to zero mean and unit std over
its positions (instance normalisation), which is exactly what AdaIN keeps of the content: the
*structure* distance, 0 for a perfect AdaIN output, about 1 or more for an image without the
content's layout.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())  # stands in for relu4_1
    >>> images = torch.rand(2, 3, 16, 16)
    >>> content_distance(net, images, images)
    0.0
    >>> sorted(content_references(net, images))
    ['blurred', 'flat']
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.io.files import PathLike, atomic_write

__all__ = ["BLUR_FACTOR", "blurred", "content_distance", "content_distances", "content_references", "flat", "reconstruct",
           "reconstruction_report"]

BLUR_FACTOR = 8


def flat(images: Tensor) -> Tensor:
    """Each ``[B, 3, H, W]`` image replaced by its mean colour."""
    return images.mean(dim=(2, 3), keepdim=True).expand_as(images).contiguous()


def blurred(images: Tensor, factor: int = BLUR_FACTOR) -> Tensor:
    """Each image shrunk to ``1/factor`` of its size (area average) and scaled back (bilinear)."""
    if factor < 1:
        raise ValueError(f"factor={factor} must be >= 1")
    small = F.interpolate(images, scale_factor=1.0 / factor, mode="area")
    return F.interpolate(small, size=images.shape[2:], mode="bilinear", align_corners=False)


def content_distance(loss_network: nn.Module, outputs: Tensor, contents: Tensor, batch_size: int = 8,
                     normalize: bool = False) -> float:
    """Mean squared relu4_1 difference between ``outputs`` and ``contents`` under ``loss_network``.

    ``loss_network`` maps images in [0, 1] to a dict of taps with ``"relu4_1"`` (or directly to
    the relu4_1 tensor). Computed in float32 in chunks of ``batch_size`` images. ``normalize``:
    compare instance-normalised maps (the structure distance, see the module docstring).
    """
    raw, structure = content_distances(loss_network, outputs, contents, batch_size)
    return structure if normalize else raw


@torch.no_grad()
def content_distances(loss_network: nn.Module, outputs: Tensor, contents: Tensor,
                      batch_size: int = 8) -> Tuple[float, float]:
    """``(raw, structure)``: both :func:`content_distance` figures from one pass of the loss network."""
    if outputs.shape != contents.shape:
        raise ValueError(f"outputs {tuple(outputs.shape)} and contents {tuple(contents.shape)} differ in shape")
    raw, structure, count = 0.0, 0.0, 0
    for out, ref in zip(outputs.split(batch_size), contents.split(batch_size)):
        out_features, ref_features = (_relu4_1(loss_network, x.float()) for x in (out, ref))
        raw += float(F.mse_loss(out_features, ref_features, reduction="sum"))
        structure += float(F.mse_loss(_instance_normalized(out_features), _instance_normalized(ref_features),
                                      reduction="sum"))
        count += out_features.numel()
    return raw / count, structure / count


def content_references(loss_network: nn.Module, contents: Tensor, normalize: bool = False) -> Dict[str, float]:
    """The distance of the ``flat`` and the ``blurred`` version of ``contents`` to ``contents``."""
    return {
        "flat": content_distance(loss_network, flat(contents), contents, normalize=normalize),
        "blurred": content_distance(loss_network, blurred(contents), contents, normalize=normalize),
    }


def _instance_normalized(features: Tensor, eps: float = 1e-5) -> Tensor:
    flat_maps = features.flatten(2)
    mean = flat_maps.mean(dim=2, keepdim=True)
    std = (flat_maps.var(dim=2, unbiased=False, keepdim=True) + eps).sqrt()
    return ((flat_maps - mean) / std).view_as(features)


@torch.no_grad()
def reconstruct(net: nn.Module, images: Tensor, batch_size: int = 4) -> Tensor:
    """``net``'s decoder applied to its own encoder's relu4_1 of ``images`` (no style), clamped to [0, 1]."""
    outputs = [net.decoder(net.encode(chunk)).clamp(0.0, 1.0) for chunk in images.split(batch_size)]
    return torch.cat(outputs)


def reconstruction_report(
    networks: Mapping[str, Any], images: Tensor, grid_path: Optional[PathLike] = None, rows: int = 6,
) -> Dict[str, Any]:
    """How well each network's decoder inverts relu4_1 on held-out ``images``, beside the references.

    Args:
        networks: label -> :class:`~examples.style_transfer.adain_network.LoadedNetwork`.
        images: held-out photos ``[N, 3, H, W]`` in [0, 1].
        grid_path: where to draw one row per image (content, flat, blurred, each network's
            reconstruction), PNG; None: no picture.
        rows: images drawn at most.

    Returns:
        ``{"images": N, "references": {"flat": d, "blurred": d}, "networks": {label: {"step", "distance",
        "per_image"}}}``, every distance measured by the first network's loss network (so the
        columns compare), per image as well.
    """
    from examples.style_transfer.imaging import side_by_side, stack_rows

    if not networks:
        raise ValueError("pass at least one network to reconstruct with")
    loss_network = next(iter(networks.values())).loss_network()
    outputs = {label: reconstruct(network.net, images) for label, network in networks.items()}
    references = {"flat": flat(images), "blurred": blurred(images)}

    def per_image(candidates: Tensor) -> list:
        return [content_distance(loss_network, candidates[i: i + 1], images[i: i + 1]) for i in range(images.shape[0])]

    def mean(values: list) -> float:  # the images share one size, so the mean of the per-image means
        return sum(values) / len(values)

    reference_rows = {name: per_image(value) for name, value in references.items()}
    network_rows = {label: per_image(output) for label, output in outputs.items()}
    report: Dict[str, Any] = {
        "images": int(images.shape[0]),
        "references": {name: mean(values) for name, values in reference_rows.items()},
        "references_per_image": reference_rows,
        "networks": {
            label: {"step": int(networks[label].step), "distance": mean(values), "per_image": values}
            for label, values in network_rows.items()
        },
    }
    if grid_path is not None:
        lines = []
        for index in range(min(rows, images.shape[0])):
            row = [images[index: index + 1], references["flat"][index: index + 1],
                   references["blurred"][index: index + 1]] + [output[index: index + 1] for output in outputs.values()]
            labels = ["content", "flat", f"blurred 1/{BLUR_FACTOR}"] + list(outputs)
            lines.append(side_by_side(row, labels))
        with atomic_write(grid_path, "wb") as handle:
            stack_rows(lines).save(handle, format="PNG")
    return report


def _relu4_1(loss_network: nn.Module, images: Tensor) -> Tensor:
    features = loss_network(images)
    return features["relu4_1"] if isinstance(features, dict) else features
