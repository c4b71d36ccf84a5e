"""A PNG of held-out pairs stylised by the checkpoints of an AdaIN run, one row per checkpoint.

Shows how far training got: each row is one checkpoint (its step in the label), each
column one held-out (content, style) pair at ``--size`` px.

Usage:
    python scripts/adain_progress_grid.py runs/compact/keep/*.pt -o progress.png \
        --pair sample:hopper,sample:waves --pair heldout/china.png,heldout/gravel.png --size 128
"""

from __future__ import annotations

import argparse
from typing import List

import torch
from PIL import Image

from examples.style_transfer.adain_network import load_network
from examples.style_transfer.imaging import crop_to_multiple, side_by_side, stack_rows
from examples.style_transfer.samples import load_image_or_sample
from prunekit.io.files import atomic_write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="network files or checkpoint.pt files, in row order")
    parser.add_argument("-o", "--out", required=True)
    parser.add_argument("--pair", action="append", required=True, help="CONTENT,STYLE (files or sample:NAME)")
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pairs = [[crop_to_multiple(load_image_or_sample(spec, args.size)) for spec in pair.split(",")] for pair in args.pair]
    lines: List[Image.Image] = []
    for path in args.checkpoints:
        network = load_network(path)
        images, labels = [], []
        with torch.no_grad():
            for content, style in pairs:
                images.append(network.net(content, style).clamp(0, 1))
                labels.append(f"{network.config.mode} step {network.step}")
        lines.append(side_by_side(images, labels))
    header = side_by_side([content for content, _ in pairs] + [style for _, style in pairs],
                          ["content"] * len(pairs) + ["style"] * len(pairs))
    lines.insert(0, header)
    canvas = stack_rows(lines)
    with atomic_write(args.out, "wb") as handle:
        canvas.save(handle, format="PNG")
    print(f"wrote {args.out}: {len(args.checkpoints)} checkpoints x {len(pairs)} pairs")


if __name__ == "__main__":
    main()
