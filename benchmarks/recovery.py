"""What recovery wins back: one-shot pruning vs ``prunekit.recover`` vs gradual pruning + recover.

On REAL trained weights, offline:

* HED's VGG-16 (edge detection), a uniform fine-grained plan (every backbone conv
  at ``--uniform``, 80 % by default) and, with ``--plan``, the joint plan of a
  ``prunekit scan --model hed``. Recovery distils the dense HED into the pruned
  one for ``--steps`` Adam steps on random crops of scikit-learn's two photos
  (china, flower), exactly as ``prunekit prune --recover-steps`` does it; the
  held-out photos are other images: matplotlib's Grace Hopper and the folder
  ``--held-out`` (scikit-image's photos). Score: edge-map distortion
  ``||E_pruned - E_dense|| / ||E_dense||`` on the held-out photos (lower is better).
* digits-vgg (trained weights shipped with prunekit), every conv at 90 %:
  test accuracy one-shot vs recovered, the student distilled on the digits'
  training split (no labels used), the test split held out.

``--lrs`` runs the recover rows of the ``--plans`` at several learning rates
(how the default was chosen; ``--sweep-only`` for those rows alone). The load average is printed: the machine is shared.

Run::

    python -m examples.style_transfer adain real-data real --size 256   # held-out photos
    python -m benchmarks.recovery --held-out real/content --plan hed-scan/plan.json --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

import prunekit
from prunekit.cli.inputs import recovery_batches
from prunekit.cli.prune import DEFAULT_RECOVER_LR
from prunekit.datasets import digits_test_set, digits_train_set, photo_files
from prunekit.training.recover import plot_recovery
from prunekit.training.schedules import GradualPruner


def read_plan(path: str) -> Dict[str, float]:
    with open(path) as handle:
        data = json.load(handle)
    return {str(k): float(v) for k, v in (data["plan"] if "plan" in data else data).items()}


def distortion(model: torch.nn.Module, dense: torch.nn.Module, batches: List[torch.Tensor]) -> float:
    """Edge-map distortion over all held-out photos (float64 sums), as the scan scores it."""
    error = norm = 0.0
    with torch.inference_mode():
        for x in batches:
            out, ref = model(x).double(), dense(x).double()
            error += float((out - ref).pow(2).sum())
            norm += float(ref.pow(2).sum())
    return (error / norm) ** 0.5


def run(
    dense: torch.nn.Module, plan: Dict[str, float], train: List[torch.Tensor], held: List[torch.Tensor],
    steps: int, lr: float, mode: str, histories: Optional[Dict[str, Any]] = None, label: str = "",
) -> Tuple[float, float, int]:
    """(held-out distortion, seconds, best step) of one-shot / recover / gradual+recover."""
    student = prunekit.copy_model(dense)
    start = time.perf_counter()
    pruner = None
    best = 0
    if mode == "gradual":
        end = max(1, (3 * steps) // 4)
        pruner = GradualPruner(student, plan, start_step=0, end_step=end, frequency=max(1, end // 10))
    else:
        prunekit.apply_plan(student, plan)
    if mode != "one-shot":
        history = prunekit.recover(student, dense, train, steps, lr=lr, held_out=held, pruner=pruner, progress=False)
        best = history.best_step
        if histories is not None:
            histories[label] = history
    prunekit.finalize(student)
    return distortion(student, dense, held), time.perf_counter() - start, best


def accuracy(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.inference_mode():
        return float((model(inputs).argmax(1) == labels).float().mean())


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--held-out", required=True, metavar="FOLDER", help="held-out photos (not china/flower)")
    parser.add_argument("--plan", default=None, help="a HED plan.json (e.g. the scan's joint plan)")
    parser.add_argument("--uniform", type=float, default=0.8)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=DEFAULT_RECOVER_LR)
    parser.add_argument("--lrs", default="", help="comma list: also run the uniform recover row at these rates")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-hed", action="store_true")
    parser.add_argument("--sweep-only", action="store_true", help="only the --lrs rows (choosing the default)")
    parser.add_argument("--figure", default=None, help="PNG of the HED recovery curves (uniform plan)")
    parser.add_argument("--plans", default="uniform,joint", help="which HED plans to run: uniform, joint")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")

    if not args.skip_hed:
        dense = prunekit.load_model("hed")
        with tempfile.TemporaryDirectory() as tmp:
            train_dir, held_dir = Path(tmp, "train"), Path(tmp, "held")
            train_dir.mkdir()
            held_dir.mkdir()
            for photo in photo_files(["china", "flower"]):
                shutil.copy(photo, train_dir / photo.name)
            for photo in photo_files(["grace_hopper"]) + sorted(Path(args.held_out).iterdir()):
                shutil.copy(photo, held_dir / photo.name)
            train, held, description = recovery_batches(
                dense, str(train_dir), str(held_dir), args.size, args.batch_size, args.steps, seed=0)
        print(f"HED {args.size}x{args.size}, {args.steps} steps, batch {args.batch_size}, lr {args.lr:g}: {description}")
        plans = {f"uniform {args.uniform:.0%}": {name: args.uniform for name in prunekit.conv_layers(dense.features)}}
        plans = {label: {f"features.{k}": v for k, v in plan.items()} for label, plan in plans.items()}
        if args.plan:
            plans["scan's joint plan"] = read_plan(args.plan)
        wanted = set(args.plans.split(","))
        for lr in [float(v) for v in args.lrs.split(",") if v]:
            for label, plan in plans.items():
                if ("uniform" if label.startswith("uniform") else "joint") in wanted:
                    value, seconds, best = run(dense, plan, train, held, args.steps, lr, "recover")
                    print(f"lr {lr:g}: {label} recover held-out distortion {value:.4f} (best step {best}, "
                          f"{seconds:.0f} s)", flush=True)
        if args.sweep_only:
            return
        print(f"{'plan':<20} {'mode':<16} {'held-out distortion':>20} {'best step':>9} {'seconds':>8}")
        histories: Dict[str, Any] = {}
        one_shot: Dict[str, float] = {}
        for label, plan in plans.items():
            if ("uniform" if label.startswith("uniform") else "joint") not in wanted:
                continue
            for mode in ("one-shot", "recover", "gradual"):
                shown = "gradual+recover" if mode == "gradual" else mode
                value, seconds, best = run(dense, plan, train, held, args.steps, args.lr, mode, histories,
                                           f"{label}: {shown}")
                if mode == "one-shot":
                    one_shot[f"{label}: one-shot"] = value
                print(f"{label:<20} {shown:<16} {value:>20.4f} {best:>9} {seconds:>8.0f}", flush=True)
        if args.figure:
            plot_recovery(histories, args.figure, references=one_shot,
                          title=f"HED (real weights), recovery on crops of 2 photos, {sum(len(b) for b in held)} "
                          "other photos held out")
            print(f"wrote {args.figure}")

    digits = prunekit.load_model("digits-vgg")
    test_x, test_y = digits_test_set().tensors
    train_x = digits_train_set().tensors[0]
    cut = len(train_x) // 5  # the last fifth of the training split judges recovery; the test split stays unseen
    train = [train_x[:-cut][i : i + 64] for i in range(0, len(train_x) - cut, 64)]
    plan = {name: 0.9 for name in prunekit.conv_layers(digits)}
    one_shot = prunekit.finalize(prunekit.apply_plan(prunekit.copy_model(digits), plan))
    student = prunekit.apply_plan(prunekit.copy_model(digits), plan)
    history = prunekit.recover(student, digits, train, args.steps, lr=1e-3, held_out=[train_x[-cut:]],
                               progress=False)
    prunekit.finalize(student)
    print(f"digits-vgg, every conv at 90 %, test accuracy ({len(test_y)} held-out digits): dense "
          f"{accuracy(digits, test_x, test_y):.4f}, one-shot {accuracy(one_shot, test_x, test_y):.4f}, "
          f"recovered {accuracy(student, test_x, test_y):.4f} ({args.steps} steps, lr 1e-3, best step "
          f"{history.best_step}; distilled on {len(train_x) - cut} training digits without labels)")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
