"""Prune to a MACs budget: prunekit's budget plan beside Torch-Pruning's recipes at equal measured MACs.

For each model with trained weights (digits-vgg, digits-resnet) and each budget (1/2, 1/3, 1/4
of the dense MACs), side by side in one run:

- prunekit, three channel criteria, each scanned one group at a time on 360 training digits, the
  plan fitted to the budget (``fit_budget``), applied and compacted: ``channel`` (activation l2),
  ``filter-norm`` (the L2 norm of each filter: Torch-Pruning's magnitude criterion) and ``taylor``
  (first-order Taylor importance from the cross-entropy gradients on the same 360 labelled digits:
  Torch-Pruning's Taylor criterion), so that each Torch-Pruning recipe has a prunekit one on the
  same criterion;
- Torch-Pruning 1.6 ``MetaPruner`` with L2 magnitude importance, a uniform ratio and
  ``global_pruning=True``, and with Taylor importance (gradients of the loss on the same 360
  training digits) uniform; each ratio bisected until its compacted model's MACs (counted by
  prunekit's one counter) are at or just under the budget.

Each compacted model is scored on the held-out digits (accuracy, the 360 shipped test images)
without recovery, and again after the same recovery for every recipe (``prunekit.training.recover``:
``--recover-steps`` Adam steps distilling the dense model's logits into the compacted one on the
training digits, no labels, the best state on the last 128 training digits kept), and timed at one thread, interleaved rounds, batch 64: the median latency over the
dense model's (a speed-up), with its 95 % interval. Run: ``python benchmarks/budget.py`` (``pip install
torch-pruning``, the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import os
import platform
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

import prunekit
from prunekit.datasets import digits_test_set, digits_train_set
from prunekit.measure.macs import count_macs
from prunekit.measure.timing import latency_samples, speedup
from prunekit.methods.registry import get_method
from prunekit.planning import Budget
from prunekit.planning.budget import fit_budget
from prunekit.sensitivity import Accuracy, OutputDistortion, scan
from prunekit.training.recover import recover


def total_macs(model: nn.Module, size: Tuple[int, ...]) -> int:
    return sum(dense for dense, _ in count_macs(model, size).values())


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(images).argmax(1) == labels).float().mean())


def torch_pruning(model: nn.Module, example: torch.Tensor, ratio: float, how: str,
                  batches: List[Tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    import torch_pruning as tp

    model = prunekit.copy_model(model).eval()
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    importance = tp.importance.TaylorImportance() if how == "taylor" else tp.importance.MagnitudeImportance(p=2)
    pruner = tp.pruner.MetaPruner(model, example, importance=importance, pruning_ratio=ratio,
                                  global_pruning=how == "global", ignored_layers=[last])
    if how == "taylor":
        model.zero_grad()
        for images, labels in batches:
            nn.functional.cross_entropy(model(images), labels).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model


def at_budget(build: Callable[[float], nn.Module], size: Tuple[int, ...], target: float) -> nn.Module:
    """The model ``build(ratio)`` gives at the largest MACs not above ``target``, ratio bisected (12 steps)."""
    low, high, best = 0.0, 0.95, None
    for _ in range(12):
        middle = (low + high) / 2
        model = build(middle)
        if total_macs(model, size) <= target:
            best, high = model, middle
        else:
            low = middle
    return best if best is not None else build(high)


def recipes_at_budget(
    model: nn.Module, scans: Dict[str, Tuple[object, object]], fraction: float, example: torch.Tensor,
    metric: Callable[[nn.Module], float], build_tp: Callable[[float, str], nn.Module],
    recover_fit: Optional[Callable[[nn.Module], None]] = None,
) -> Dict[str, nn.Module]:
    """The dense model, prunekit's compacted budget plan for each scanned method (name -> (method, scan)),
    and each Torch-Pruning recipe (``build_tp(ratio, how)``) bisected to the same MACs."""
    size = tuple(example.shape[1:])
    models: Dict[str, nn.Module] = {"dense": model}
    for name, (method, result) in scans.items():
        fit = fit_budget(model, metric, result, Budget(macs=fraction), method=method, input_size=size,
                         recover=recover_fit)
        models[f"prunekit {name}"] = prunekit.compact(
            prunekit.apply_plan(prunekit.copy_model(model), fit.plan, method=method), example)
    target = fraction * total_macs(model, size)
    for how in ("uniform", "global", "taylor"):
        models[f"TP {how}"] = at_budget(lambda ratio: build_tp(ratio, how), size, target)
    return models


def measured_recipes(
    models: Dict[str, nn.Module], timing_input: torch.Tensor, rounds: int, warmup: int, size: Tuple[int, ...],
    score: Callable[[nn.Module], float], recovered: Optional[Callable[[nn.Module], None]],
) -> List[Tuple[str, float, float, Optional[float], object]]:
    """Per recipe but dense: (name, MACs kept, score as pruned, score after ``recovered`` on a copy or None, speed-up),
    the recipes timed side by side with the dense model."""
    samples = latency_samples(models, timing_input, repeats=rounds, warmup=warmup)
    dense_macs = total_macs(models["dense"], size)
    rows = []
    for recipe, pruned in models.items():
        if recipe == "dense":
            continue
        after = None
        if recovered is not None:
            student = prunekit.copy_model(pruned)
            recovered(student)
            after = score(student)
        rows.append((recipe, total_macs(pruned, size) / dense_macs, score(pruned), after,
                     speedup(samples["dense"], samples[recipe])))
    return rows


def parser_with_options(description: str) -> argparse.ArgumentParser:
    """The options every digits-like budget benchmark takes (this one, budget_mnist.py)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--budgets", default="0.5,0.333,0.25")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--methods", default="channel,filter-norm,taylor", help="prunekit methods to fit")
    parser.add_argument("--metric", choices=("accuracy", "distortion"), default="accuracy",
                        help="what the scan and the fit score: accuracy on the labelled scan images, or the "
                        "distortion of the logits against the dense model's (informative where accuracy collapses)")
    parser.add_argument("--recover-fit", action="store_true",
                        help="compare prunekit's budget candidates after that same recovery (fit_budget's recover=)")
    parser.add_argument("--recover-steps", type=int, default=300, help="distillation steps for every recipe (0: none)")
    return parser


def compare_at_budgets(
    name: str, model: nn.Module, args: argparse.Namespace, batches: List[Tuple[torch.Tensor, torch.Tensor]],
    test_images: torch.Tensor, test_labels: torch.Tensor, recovery_data: List[torch.Tensor],
    recovery_held_out: List[torch.Tensor],
) -> None:
    """Scan ``model`` with each method on ``batches``, then print every recipe's row at every budget."""
    example = test_images[:1]
    size = tuple(example.shape[1:])
    timing_input = test_images[:64]
    metric = Accuracy(batches) if args.metric == "accuracy" else OutputDistortion([b[0] for b in batches])
    scans = {}
    for method_name in args.methods.split(","):
        method = get_method(method_name)
        if method.needs_data:  # activations for channel, labelled gradients for taylor
            method = method.prepare(model, batches if method_name == "taylor" else [b[0] for b in batches])
        scans[method_name] = method, scan(model, metric, method=method, sparsities=[i / 10 for i in range(1, 10)],
                                          progress=False)

    def recovered(student: nn.Module) -> None:  # the same recovery every recipe gets below
        torch.manual_seed(0)
        recover(student, model, recovery_data, args.recover_steps, held_out=recovery_held_out, progress=False)

    for fraction in (float(b) for b in args.budgets.split(",")):
        models = recipes_at_budget(model, scans, fraction, example, metric,
                                   lambda ratio, how: torch_pruning(model, example, ratio, how, batches),
                                   recovered if args.recover_fit and args.recover_steps else None)
        rows = measured_recipes(models, timing_input, args.rounds, 3, size,
                                lambda m: accuracy(m, test_images, test_labels),
                                recovered if args.recover_steps else None)
        for recipe, kept, pruned_score, after, faster in rows:
            after_text = "-" if after is None else f"{after:.4f}"
            print(f"{name:13s} {fraction:6.3f}  {recipe:20s}  {kept:9.3f}  {pruned_score:12.4f}"
                  f"  {after_text:>9s}  {faster.ratio:.2f}x ({faster.low:.2f}-{faster.high:.2f})")
    print(f"{name:13s} dense   {'':20s}  {1.0:9.3f}  {accuracy(model, test_images, test_labels):12.4f}")


HEADER = "model         budget  recipe                MACs kept  held-out acc  recovered  speed-up over dense (95% interval)"


def one_thread(note: str = "") -> None:
    """Time at one thread, seeded; print the machine, the load and ``note``."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread, "
          f"load {os.getloadavg()[0]:.2f}{note}")


def digits_data() -> Tuple[List[Tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor, List[torch.Tensor],
                           List[torch.Tensor]]:
    """``(scan batches: 360 labelled training digits, test images, test labels, recovery batches: the other
    training digits but the last 128, recovery held-out: those 128)``."""
    train = digits_train_set()
    scan_images, scan_labels = train.tensors[0][:360], train.tensors[1][:360]
    batches = [(scan_images[i:i + 120], scan_labels[i:i + 120]) for i in range(0, 360, 120)]
    test_images, test_labels = digits_test_set().tensors
    train_images = train.tensors[0]
    recovery_data = [train_images[i:i + 64] for i in range(0, len(train_images) - 128, 64)]
    return batches, test_images, test_labels, recovery_data, [train_images[-128:]]


def main() -> None:
    parser = parser_with_options(__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits-vgg,digits-resnet")
    args = parser.parse_args()
    one_thread()
    batches, test_images, test_labels, recovery_data, recovery_held_out = digits_data()
    print(HEADER)
    for name in args.models.split(","):
        compare_at_budgets(name, prunekit.load_model(name).eval(), args, batches, test_images, test_labels,
                           recovery_data, recovery_held_out)
    print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
