"""Latency of a compacted VGG-19 ``features`` against the dense one, next to the MACs reduction.

Half of the output channels of every conv are masked (prunekit's
``channel_activation`` with random scores; random-init weights: speed does not
depend on the values), ``prunekit.compact`` removes them, and the dense and
compacted models are timed in alternation in this one process (batch 1,
224x224, CPU). The figure to reach: speed-up >= 0.8 x MACs ratio. Where
Torch-Pruning is installed (``pip install torch-pruning``, benchmark only) the
same channels are also removed with it, timed in the same rounds and compared.

Run: ``python benchmarks/compact_speed.py [--threads 2] [--rounds 10] [--size 224]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from typing import List, Optional

import torch
import torchvision
from torch import nn

import prunekit
from prunekit.compact import compact, compaction_report
from prunekit.measure.timing import latency_samples, speedup, spread


def mask_half_of_every_conv(features: nn.Sequential) -> nn.Sequential:
    for conv in prunekit.conv_layers(features).values():
        prunekit.channel_activation(conv, torch.rand(conv.out_channels), amount=0.5)
    return features


def live_channels(masked: nn.Sequential) -> torch.Tensor:
    """Output channels of the last conv that are not masked."""
    last = list(prunekit.conv_layers(masked).values())[-1]
    return torch.nonzero(last.weight_mask.flatten(1).any(dim=1)).flatten()


def torch_pruning_version(model: nn.Module, example: torch.Tensor) -> Optional[nn.Module]:
    """The same channels removed with Torch-Pruning, or None when it is not installed."""
    try:
        import torch_pruning as tp
    except ImportError:
        return None
    pruned = prunekit.finalize(prunekit.copy_model(model))
    relus = [m for m in pruned.modules() if isinstance(m, nn.ReLU) and m.inplace]
    for relu in relus:  # Torch-Pruning cannot trace torch 2.x in-place ReLUs (AsStrided/CopySlices nodes)
        relu.inplace = False
    graph = tp.DependencyGraph().build_dependency(pruned, example_inputs=example)
    for conv in prunekit.conv_layers(pruned).values():
        dead = torch.nonzero((conv.weight.flatten(1) == 0).all(dim=1)).flatten().tolist()
        graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=dead).prune()
    for relu in relus:  # same modules as the other two models when timing
        relu.inplace = True
    return pruned


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().norm() / a.double().norm())


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    dense = torchvision.models.vgg19().features.eval()
    masked = mask_half_of_every_conv(prunekit.copy_model(dense))
    x = torch.rand(1, 3, args.size, args.size)
    compacted = compact(masked, x, prune_output_channels=True)
    report = compaction_report(dense, compacted, (3, args.size, args.size))
    models = {"dense": dense, "prunekit.compact": compacted}
    tp_model = torch_pruning_version(masked, x)
    if tp_model is not None:
        models["torch-pruning"] = tp_model

    print(f"machine: {platform.platform()} ({platform.processor() or platform.machine()}), "
          f"python {platform.python_version()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"model: torchvision vgg19().features (random init), 50% of the channels of all 16 convs removed; "
          f"input 1x3x{args.size}x{args.size}, {args.rounds} interleaved rounds after warm-up")
    print(f"params {report.params_before:,} -> {report.params_after:,} ({report.params_ratio:.2f}x fewer); "
          f"MACs {report.macs_before / 1e9:.2f} G -> {report.macs_after / 1e9:.2f} G "
          f"(MACs ratio {report.macs_ratio:.2f}x)")

    times = latency_samples(models, x, repeats=args.rounds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name in medians:
        print(f"  {name:18s} {spread(times[name])}")
    gain = speedup(times["dense"], times["prunekit.compact"])
    ratio = gain.ratio / report.macs_ratio
    print(f"speed-up prunekit.compact vs dense: {gain} = {ratio:.2f} x MACs ratio "
          f"(target >= 0.80 x: {'met' if ratio >= 0.8 else 'NOT met'})")

    with torch.inference_mode():
        ours = compacted(x)
        expected = masked(x).index_select(1, live_channels(masked))
        print(f"prunekit.compact output vs the masked model's kept channels: relative error "
              f"{relative_error(expected, ours):.2e}")
        if tp_model is not None:
            theirs = tp_model(x)
            agree = theirs.shape == ours.shape and relative_error(ours, theirs) < 1e-5
            print(f"torch-pruning {tp_version()}: speed-up {speedup(times['dense'], times['torch-pruning'])}; "
                  f"torch-pruning latency / prunekit.compact latency "
                  f"{speedup(times['torch-pruning'], times['prunekit.compact'])}; outputs agree: {agree} "
                  f"(relative error {relative_error(ours, theirs):.2e})")
        else:
            print("torch-pruning: not installed (pip install torch-pruning) - comparison skipped")


def tp_version() -> str:
    import torch_pruning as tp

    return getattr(tp, "__version__", "?")


if __name__ == "__main__":
    main()
