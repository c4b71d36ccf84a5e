"""Forward-time cost of torch's pruning reparametrization, and what ``prunekit.finalize`` saves.

A masked layer recomputes ``weight = weight_orig * weight_mask`` in a forward
pre-hook at every forward. ``prunekit.finalize`` makes the masked weight a plain
parameter, so that multiply (and the memory traffic of two dense tensors) goes
away. Here VGG-19 ``features`` (random init) is pruned with the reference
plan; the masked and the finalized models are timed in alternation in this one
process, and the mask multiply alone is timed too.

Run: ``python benchmarks/mask_overhead.py [--threads 2] [--rounds 10] [--sizes 224 64]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import List, Optional

import torch
import torchvision
from torch import nn
from torch.nn.utils import prune

import prunekit
from prunekit.measure.timing import latency_samples, speedup, spread

REFERENCE_PLAN = (0.0, 0.9, 0.6, 0.6, 0.9, 0.8, 0.8, 0.7, 0.8, 0.8, 0.8, 0.9, 0.9, 0.9, 0.9, 0.85)


def mask_multiply_time(model: nn.Module, rounds: int) -> float:
    """Median time of recomputing every masked tensor once, as the pre-hooks do per forward."""
    hooks = [
        (module, hook)
        for module in model.modules()
        for hook in module._forward_pre_hooks.values()
        if isinstance(hook, prune.BasePruningMethod)
    ]
    times = []
    with torch.inference_mode():
        for _ in range(rounds + 1):
            start = time.perf_counter()
            for module, hook in hooks:
                hook.apply_mask(module)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 64])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    masked = torchvision.models.vgg19().features.eval()
    prunekit.apply_plan(masked, dict(zip(prunekit.conv_layers(masked), REFERENCE_PLAN)))
    finalized = prunekit.finalize(prunekit.copy_model(masked))

    print(f"machine: {platform.platform()}, python {platform.python_version()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print("model: torchvision vgg19().features, random init, reference plan (fine-grained, 85% zeros), batch 1")
    print(f"mask multiply alone (15 masked weights, {args.rounds} rounds): "
          f"{mask_multiply_time(masked, args.rounds) * 1e3:.1f} ms per forward")
    for size in args.sizes:
        x = torch.rand(1, 3, size, size)
        times = latency_samples({"masked": masked, "finalized": finalized}, x, repeats=args.rounds)
        with torch.inference_mode():
            identical = torch.equal(masked(x), finalized(x))
        gain = speedup(times["masked"], times["finalized"])
        print(f"  {size}x{size}: masked {spread(times['masked'])}, finalized {spread(times['finalized'])} "
              f"({args.rounds} interleaved rounds): masked / finalized {gain}; outputs identical: {identical}")


if __name__ == "__main__":
    main()
