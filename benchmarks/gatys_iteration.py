"""Time per Gatys style-transfer iteration, dense vs fine-grained-pruned VGG features, side by side.

One iteration of ``examples.style_transfer stylize`` is one evaluation of the
loss (forward to the deepest loss layer) and its gradient with respect to the
image. Dense and pruned networks are evaluated in alternation in this one
process, so a load spike slows both alike; the medians' ratio is the figure.
The pruned network is the dense one with ``--plan`` applied (fine-grained L1)
and finalized: plain weights holding zeros, run by the same dense kernels.

Run (after ``python -m examples.style_transfer prune ... --weights hed --out runs/prune``)::

    python -m benchmarks.gatys_iteration --weights hed --plan runs/prune/plan.json   # from the repository root
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import List, Optional

import torch

import prunekit
from examples.style_transfer.gatys import GatysConfig, GatysLoss
from examples.style_transfer.gatys_cli import default_tv_weight
from examples.style_transfer.samples import load_image_or_sample
from examples.style_transfer.vgg import Preprocessor, default_preprocess, load_vgg_features


def seconds_per_iteration(loss: GatysLoss, image: torch.Tensor) -> float:
    image = image.clone().requires_grad_(True)
    start = time.perf_counter()
    total = sum(loss(image))
    total.backward()
    return time.perf_counter() - start


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="hed")
    parser.add_argument("--arch", default=None)
    parser.add_argument("--plan", required=True, help="plan.json written by the example's prune command")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    dense = load_vgg_features(args.weights, arch=args.arch)
    with open(args.plan) as handle:
        plan = json.load(handle)
    pruned = prunekit.finalize(prunekit.apply_plan(prunekit.copy_model(dense), {str(k): float(v) for k, v in plan.items()}))
    preprocessor = Preprocessor(default_preprocess(args.weights))
    config = GatysConfig(tv_weight=default_tv_weight(preprocessor.mode))
    content = load_image_or_sample("sample:hopper", args.size)
    style = load_image_or_sample("sample:mosaic", args.size)
    losses = {name: GatysLoss(net, content, style, config, preprocessor) for name, net in (("dense", dense), ("pruned", pruned))}
    samples = {name: [] for name in losses}
    for round_index in range(args.rounds + 1):
        for name, loss in losses.items():
            elapsed = seconds_per_iteration(loss, content)
            if round_index:  # the first round warms up
                samples[name].append(elapsed)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    zeros = sum(int((p == 0).sum()) for p in pruned.parameters()) / sum(p.numel() for p in pruned.parameters())
    print(f"machine: {platform.platform()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"network: {args.weights} VGG features, plan {args.plan} ({zeros:.1%} zeros); content "
          f"{tuple(content.shape[-2:])} px, {args.rounds} interleaved rounds (loss + gradient)")
    print(f"seconds per iteration: dense {medians['dense']:.3f} s, pruned {medians['pruned']:.3f} s "
          f"(pruned / dense {medians['pruned'] / medians['dense']:.2f})")


if __name__ == "__main__":
    main()
