"""Prune in stages: prunekit's staged budget plan beside one-shot plans and Torch-Pruning's iterative pruning.

At equal total recovery (``--recover-steps`` distillation steps per recipe, split evenly over the
stages of a staged recipe), for each model with trained weights (digits-resnet, digits-vgg, and
``mnist-resnet``: benchmarks/budget_mnist.py's network on 1,000 held-out MNIST digits) and each
MACs budget, side by side in one run:

- prunekit one-shot: the budget plan fitted on the dense model's scan (``fit_budget``), compacted,
  then recovered for all the steps;
- prunekit staged: ``prune_in_stages`` with ``--stages`` stages, each scanning the model as it is
  (only the groups the stage before pruned are scanned again), fitting its share of the budget,
  compacting and recovering for ``steps / stages``;
- Torch-Pruning 1.6 ``MetaPruner`` (L2 magnitude, uniform ratio and ``global_pruning=True``), one-shot
  (ratio bisected to the budget's MACs, then recovered for all the steps) and iterative
  (``iterative_steps=stages`` at the same ratio, recovered for ``steps / stages`` after each step).

Scans and plan fits score accuracy on 360 training digits; the recovery distils the dense model's
logits on the other training digits (no labels, the best state on the last 128 kept), the same for
every recipe; the held-out score is accuracy on the 360 shipped test digits. Each model is timed at one
thread, interleaved rounds, batch 64 (speed-up over the dense model, 95 % interval). Run: ``python
benchmarks/iterative.py`` (``pip install torch-pruning``, the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Dict, Tuple

import torch
from torch import nn

import prunekit
from prunekit.measure.timing import latency_samples, speedup
from prunekit.methods.registry import get_method
from prunekit.planning import Budget
from prunekit.planning.budget import fit_budget
from prunekit.planning.stages import prune_in_stages
from prunekit.sensitivity import Accuracy, scan
from prunekit.training.recover import recover

from budget import accuracy, digits_data, one_thread, total_macs  # benchmarks/budget.py, beside this file


def tp_pruner(model: nn.Module, example: torch.Tensor, ratio: float, how: str, stages: int) -> Tuple[nn.Module, object]:
    import torch_pruning as tp

    model = prunekit.copy_model(model).eval()
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=ratio, global_pruning=how == "global", ignored_layers=[last],
                                  iterative_steps=stages)
    return model, pruner


def tp_one_shot(model: nn.Module, example: torch.Tensor, ratio: float, how: str) -> nn.Module:
    pruned, pruner = tp_pruner(model, example, ratio, how, 1)
    pruner.step()
    return pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits-resnet,digits-vgg",
                        help="digits-resnet, digits-vgg, mnist-resnet (benchmarks/budget_mnist.py's)")
    parser.add_argument("--budgets", default="0.333,0.25")
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--recover-steps", type=int, default=300, help="total distillation steps per recipe")
    parser.add_argument("--methods", default="channel,filter-norm")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    one_thread(f"; {args.stages} stages, {args.recover_steps} recovery steps per recipe")
    batches, test_images, test_labels, recovery_data, held = digits_data()
    example = test_images[:1]
    size = tuple(example.shape[1:])
    share = args.recover_steps // args.stages

    print("model          budget  recipe                      MACs kept  held-out acc  speed-up (95% interval)  seconds")
    for name in args.models.split(","):
        if name == "mnist-resnet":  # benchmarks/budget_mnist.py's network and data
            from budget_mnist import mnist_case

            dense, batches, test_images, test_labels, recovery_data, held = mnist_case()
        else:
            dense = prunekit.load_model(name).eval()

        def recovered(student: nn.Module, steps: int) -> nn.Module:
            torch.manual_seed(0)
            recover(student, dense, recovery_data, steps, held_out=held, progress=False)
            return student.eval()

        metric = Accuracy(batches)
        scans = {}
        for method_name in args.methods.split(","):
            method = get_method(method_name)
            if method.needs_data:
                # labelled gradients for taylor (as its stages prepare it), activations for channel
                method = method.prepare(dense, batches if method_name == "taylor" else [b[0] for b in batches])
            scans[method_name] = method, scan(dense, metric, method=method, sparsities=[i / 10 for i in range(1, 10)],
                                              progress=False)
        for fraction in (float(b) for b in args.budgets.split(",")):
            models: Dict[str, nn.Module] = {"dense": dense}
            seconds: Dict[str, float] = {}
            for method_name, (method, result) in scans.items():
                start = time.process_time()
                fit = fit_budget(dense, metric, result, Budget(macs=fraction), method=method, input_size=size)
                small = prunekit.compact(prunekit.apply_plan(prunekit.copy_model(dense), fit.plan, method=method), example)
                models[f"prunekit {method_name} one-shot"] = recovered(small, args.recover_steps)
                seconds[f"prunekit {method_name} one-shot"] = time.process_time() - start
                start = time.process_time()
                run = prune_in_stages(dense, batches, Budget(macs=fraction), args.stages, method=method_name,
                                      sparsities=[i / 10 for i in range(1, 10)],
                                      recover=lambda student, teacher: recover(
                                          student, teacher, recovery_data, share, held_out=held, progress=False),
                                      progress=False)
                models[f"prunekit {method_name} staged"] = run.model.eval()
                seconds[f"prunekit {method_name} staged"] = time.process_time() - start
            target = fraction * total_macs(dense, size)
            for how in ("uniform", "global"):
                start = time.process_time()
                ratio = bisected_ratio(dense, example, how, size, target)
                models[f"TP {how} one-shot"] = recovered(tp_one_shot(dense, example, ratio, how), args.recover_steps)
                seconds[f"TP {how} one-shot"] = time.process_time() - start
                start = time.process_time()
                staged, pruner = tp_pruner(dense, example, ratio, how, args.stages)
                for _ in range(args.stages):
                    pruner.step()
                    recovered(staged, share)
                models[f"TP {how} iterative"] = staged
                seconds[f"TP {how} iterative"] = time.process_time() - start
            samples = latency_samples(models, test_images[:64], repeats=args.rounds, warmup=3)
            dense_macs = total_macs(dense, size)
            for recipe, model in models.items():
                if recipe == "dense":
                    continue
                faster = speedup(samples["dense"], samples[recipe])
                print(f"{name:14s} {fraction:6.3f}  {recipe:26s}  {total_macs(model, size) / dense_macs:9.3f}"
                      f"  {accuracy(model, test_images, test_labels):12.4f}  {faster.ratio:.2f}x "
                      f"({faster.low:.2f}-{faster.high:.2f}){seconds[recipe]:>14.0f}")
        print(f"{name:14s} dense   {'':26s}  {1.0:9.3f}  {accuracy(dense, test_images, test_labels):12.4f}")
    print(f"load {os.getloadavg()[0]:.2f}")


def bisected_ratio(dense: nn.Module, example: torch.Tensor, how: str, size: Tuple[int, ...], target: float) -> float:
    """The largest one-shot ratio whose model stays at or under ``target`` MACs (12 bisection steps)."""
    low, high, best = 0.0, 0.95, 0.95
    for _ in range(12):
        middle = (low + high) / 2
        if total_macs(tp_one_shot(dense, example, middle, how), size) <= target:
            best, high = middle, middle
        else:
            low = middle
    return best


if __name__ == "__main__":
    main()
