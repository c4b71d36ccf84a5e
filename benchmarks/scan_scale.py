"""Sensitivity scans at scale: memory and time against the number of batches, fx suffixes, two processes.

Side by side, on this machine, each figure from the same run:

(a) peak memory (the process's maximum resident set, each configuration in a
    fresh process) and time for 2, 8 and 32 evaluation batches: the streaming
    scan (``cache_limit=0``: each batch's prefix recomputed per layer), the
    prefix cache (``cache_limit`` unbounded, the pre-streaming behaviour) and
    full forwards (a plain callable: every point runs the whole model);
(b) HED (real weights, side outputs: not a chain) scanned with fx suffixes vs
    full forwards, with equality of the scores;
(c) one process vs two under torchrun (gloo, one thread each), with equality.

Run: ``python benchmarks/scan_scale.py [--quick]`` (about 6 minutes; --quick: a smaller workload).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Dict, List, Optional

CHILD = textwrap.dedent(
    """
    import json, os, resource, sys, time
    import torch, torchvision
    import torch.distributed as dist
    from prunekit.sensitivity import OutputDistortion, scan

    config = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    if config["model"] == "hed":
        import prunekit
        from prunekit.datasets import builtin_photos
        model = prunekit.hed.hed()
        photos = torch.stack(list(builtin_photos(config["size"], normalize="none")))
        batches = [photos[i:i + 1] for i in range(len(photos))]
    else:
        from torchvision.models.vgg import cfgs, make_layers
        model = make_layers(cfgs["A"]).eval()  # vgg11().features without building the 133M-parameter head
        batches = [torch.rand(config["batch"], 3, config["size"], config["size"]) for _ in range(config["batches"])]
    metric = OutputDistortion(batches)
    evaluate = metric
    if config["mode"] == "full":
        def evaluate(m):
            return metric(m)
        evaluate.name, evaluate.higher_is_better = metric.name, False
        metric.prepare(model)
    limit = 0 if config["mode"] == "streaming" else (1 << 62)
    start = time.perf_counter()
    result = scan(model, evaluate, sparsities=config["levels"], progress=False, cache_limit=limit)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rank = dist.get_rank() if world > 1 else 0
    if rank == 0:
        print(json.dumps({"seconds": seconds, "peak_bytes": peak, "scores": result.scores}))
    if world > 1:
        dist.destroy_process_group()
    """
)


def run(config: Dict, processes: int = 1) -> Dict:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
        handle.write(CHILD)
        script = handle.name
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, script, json.dumps(config)]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                   str(processes), script, json.dumps(config)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    except subprocess.CalledProcessError as err:
        raise SystemExit(f"benchmark child failed:\n{err.stderr[-3000:]}") from None
    finally:
        os.unlink(script)
    return json.loads(done.stdout.strip().splitlines()[-1])


def max_relative_difference(a: Dict, b: Dict) -> float:
    worst = 0.0
    for layer, values in a.items():
        for x, y in zip(values, b[layer]):
            worst = max(worst, abs(x - y) / max(abs(x), 1e-300))
    return worst


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches and smaller images")
    args = parser.parse_args(argv)
    counts = (2, 8) if args.quick else (2, 8, 32)
    size = 32 if args.quick else 64
    print(f"machine: {platform.platform()}, python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; every child: 1 thread")

    print(f"\n(a) torchvision vgg11().features (random init), 8 convs x 2 levels, batches of 4x3x{size}x{size}; "
          "peak RSS includes torch itself and the model (the first row's floor)")
    print(f"{'batches':>8} {'mode':>10} {'seconds':>8} {'peak RSS MB':>12}")
    for count in counts:
        rows = {}
        for mode in ("streaming", "cache", "full"):
            rows[mode] = run({"model": "vgg11", "mode": mode, "batches": count, "batch": 4, "size": size,
                              "levels": [0.5, 0.9]})
            print(f"{count:>8} {mode:>10} {rows[mode]['seconds']:>8.2f} {rows[mode]['peak_bytes'] / 1e6:>12.1f}")
        assert rows["streaming"]["scores"] == rows["cache"]["scores"] == rows["full"]["scores"], "scores differ"
    print("  scores: streaming == cache == full forwards, bitwise, at every count")

    hed_size = 64 if args.quick else 128
    print(f"\n(b) HED (real weights), 19 convs x 2 levels, the 3 built-in photos at {hed_size} px")
    fx = run({"model": "hed", "mode": "cache", "size": hed_size, "levels": [0.5, 0.9]})
    full = run({"model": "hed", "mode": "full", "size": hed_size, "levels": [0.5, 0.9]})
    same = fx["scores"] == full["scores"]
    print(f"  fx suffixes {fx['seconds']:.1f} s, full forwards {full['seconds']:.1f} s: "
          f"{full['seconds'] / fx['seconds']:.2f}x; scores bitwise equal: {same}")

    print(f"\n(c) torchrun, gloo, 1 thread per process: vgg11 features, {counts[-1]} batches (streaming)")
    config = {"model": "vgg11", "mode": "streaming", "batches": counts[-1], "batch": 4, "size": size,
              "levels": [0.5, 0.9]}
    one = run(config, processes=1)
    two = run(config, processes=2)
    print(f"  1 process {one['seconds']:.1f} s, 2 processes {two['seconds']:.1f} s: {one['seconds'] / two['seconds']:.2f}x; "
          f"largest relative difference of the scores {max_relative_difference(one['scores'], two['scores']):.1e}")


if __name__ == "__main__":
    main()
