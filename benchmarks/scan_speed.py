"""Sensitivity scan speed and memory: prunekit's scan vs. the naive loop, side by side in one run.

The workload is the reference analysis on torchvision ``vgg19().features``
(random init): each of the 16 conv layers pruned alone at 40..90 % (96
points), scored with ``OutputDistortion`` on one fixed batch of 4x3x224x224.

* naive: for every point ``prune.l1_unstructured`` -> full forward ->
  ``prune.remove`` -> copy the saved weight back;
* scan: ``prunekit.sensitivity.scan`` (masks swapped in and out, the dense
  input of the scanned layer cached, only the layers after it re-run).

Both include the dense reference and baseline forwards. Each variant runs in
its own subprocess; after building the model and the batch, the process's
peak-RSS mark is reset (``/proc/self/clear_refs``), so the peak read at the end
(``VmHWM``: resident memory as the OS charges it; torch's CPU allocations are
invisible to tracemalloc) is the workload's own. A third subprocess runs one
dense forward for the memory reference.

Scores are compared exactly. torch's ``l1_unstructured`` (topk) and prunekit's
``FineGrainedL1`` (stable argsort) may break ties between equal magnitudes
differently; the naive worker therefore also checks, outside its timed
sections, whether its mask equals ``FineGrainedL1``'s for each point, and
points whose masks differ are reported separately.

Usage:
    python benchmarks/scan_speed.py            # the full figure (several minutes on 2 cores)
    python benchmarks/scan_speed.py --quick    # 64x64 inputs, a smoke run
"""

from __future__ import annotations

import argparse
import json
import gc
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Any, Dict, List

__all__: List[str] = []

SPARSITIES = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_MIB = 1024.0  # /proc/self/status reports KiB


class _Clock:
    """Wall and CPU time summed over the timed sections only."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0

    def __enter__(self) -> "_Clock":
        self._wall, self._cpu = time.perf_counter(), _cpu_seconds()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall += time.perf_counter() - self._wall
        self.cpu += _cpu_seconds() - self._cpu


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak() -> int:
    """Reset the peak-RSS mark to the current RSS (Linux >= 4.0); return the current RSS in KiB."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _status_kib("VmRSS")


def _setup(args: argparse.Namespace) -> Any:
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.vgg19().features.eval()
    inputs = torch.randn(args.batch, 3, args.image_size, args.image_size)
    return model, inputs


def _naive(model: Any, inputs: Any, clock: _Clock) -> Dict[str, Any]:
    import torch
    from torch.nn.utils import prune

    from prunekit.layers import conv_layers
    from prunekit.methods.fine_grained import FineGrainedL1
    from prunekit.sensitivity import OutputDistortion

    with clock:
        metric = OutputDistortion(inputs)
        metric.prepare(model)
        baseline = metric(model)
    scores, same_mask = [], []
    for _, conv in conv_layers(model).items():
        with clock:
            original = conv.weight.detach().clone()
        for sparsity in SPARSITIES:
            with clock:
                prune.l1_unstructured(conv, "weight", amount=sparsity)
                scores.append(metric(model))
            # Untimed: does torch's mask equal the one prunekit (and apply_plan) uses?
            count = round(sparsity * original.numel())
            reference = FineGrainedL1(count).compute_mask(original, torch.ones_like(original))
            same_mask.append(bool(torch.equal(conv.weight_mask, reference)))
            with clock:
                prune.remove(conv, "weight")
                with torch.no_grad():
                    conv.weight.copy_(original)
    return {"baseline": baseline, "scores": scores, "same_mask": same_mask}


def _scan(model: Any, inputs: Any, clock: _Clock) -> Dict[str, Any]:
    from prunekit.sensitivity import OutputDistortion, scan

    with clock:
        result = scan(model, OutputDistortion(inputs), sparsities=SPARSITIES, progress=False)
    return {"baseline": result.baseline, "scores": [s for values in result.scores.values() for s in values]}


def _dense(model: Any, inputs: Any, clock: _Clock) -> Dict[str, Any]:
    import torch

    with clock, torch.no_grad():
        model(inputs)
    return {}


def _worker(args: argparse.Namespace) -> None:
    model, inputs = _setup(args)
    setup_kib = _reset_peak()
    clock = _Clock()
    out = {"naive": _naive, "scan": _scan, "dense": _dense}[args.worker](model, inputs, clock)
    out.update(seconds=clock.wall, cpu_seconds=clock.cpu, rss_setup_kib=setup_kib, rss_peak_kib=_status_kib("VmHWM"))
    print(json.dumps(out))


def _run(args: argparse.Namespace, worker: str) -> Dict[str, Any]:
    command = [
        sys.executable, os.path.abspath(__file__), "--worker", worker,
        "--image-size", str(args.image_size), "--batch", str(args.batch),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"worker {worker} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64x64 inputs instead of 224x224 (smoke run)")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--worker", choices=["naive", "scan", "dense"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.image_size is None:
        args.image_size = 64 if args.quick else 224
    if args.worker:
        _worker(args)
        return

    import torch

    print("prunekit sensitivity scan benchmark")
    print(
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(f"python {platform.python_version()}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(
        f"workload: torchvision vgg19().features (random init), 16 convs x {len(SPARSITIES)} levels, "
        f"OutputDistortion on a {args.batch}x3x{args.image_size}x{args.image_size} batch"
    )
    print("running: dense forward, naive loop, prunekit scan (one subprocess each) ...", flush=True)
    dense = _run(args, "dense")
    naive = _run(args, "naive")
    scan = _run(args, "scan")

    same = [True] + naive["same_mask"]  # the baseline needs no mask
    pairs = list(zip([naive["baseline"]] + naive["scores"], [scan["baseline"]] + scan["scores"], same))
    agree = [(a, b) for a, b, m in pairs if m]
    ties = [(a, b) for a, b, m in pairs if not m]
    identical = all(a == b for a, b in agree)
    print()
    print(
        f"scores: baseline + {len(naive['scores'])} points; {len(agree) - 1} points with the same mask as "
        f"FineGrainedL1: identical {'yes' if identical else 'NO'} "
        f"(max abs diff {max(abs(a - b) for a, b in agree):.3g})"
    )
    if ties:
        print(
            f"        {len(ties)} points where torch's l1_unstructured broke a tie between equal |w| "
            f"differently: max abs diff {max(abs(a - b) for a, b in ties):.3g}"
        )
    print(f"naive loop:    {naive['seconds']:8.1f} s wall  {naive['cpu_seconds']:8.1f} s CPU")
    print(f"prunekit scan: {scan['seconds']:8.1f} s wall  {scan['cpu_seconds']:8.1f} s CPU")
    print(
        f"speed-up:      {naive['seconds'] / scan['seconds']:8.2f}x wall   "
        f"{naive['cpu_seconds'] / scan['cpu_seconds']:6.2f}x CPU"
    )
    print()
    print("peak resident memory (VmHWM of each subprocess, peak mark reset after building the model and")
    print("the input batch; 'extra' = peak minus the RSS at that point, i.e. what the workload added):")
    for name, run in (("one dense forward", dense), ("naive loop", naive), ("prunekit scan", scan)):
        extra = run["rss_peak_kib"] - run["rss_setup_kib"]
        print(f"  {name:18s} peak {run['rss_peak_kib'] / _MIB:7.1f} MiB   extra {extra / _MIB:7.1f} MiB")
    dense_extra = dense["rss_peak_kib"] - dense["rss_setup_kib"]
    scan_extra = scan["rss_peak_kib"] - scan["rss_setup_kib"]
    print(
        f"scan / dense forward: peak {scan['rss_peak_kib'] / dense['rss_peak_kib']:.2f}x, "
        f"extra {scan_extra / max(dense_extra, 1):.2f}x"
    )


if __name__ == "__main__":
    main()
