"""Train a built-in digits model (``digits-vgg``, ``digits-resnet``) and write the files prunekit ships.

Data: scikit-learn's bundled handwritten digits (1797 8x8 images, offline), split
into 1437 training and 360 test images (stratified, fixed seed; see
``prunekit.datasets.digits_split``). Training is seeded, single-threaded and uses
deterministic algorithms, so a rerun on the same machine and torch version gives
the same weights bit for bit (other CPUs may differ in the last bits).

Writes (atomically) into ``prunekit/assets/`` unless ``--out`` says otherwise:

* ``digits_vgg.pt`` (``digits_resnet.pt``): the trained state_dict (tensors only: loads with
  ``weights_only=True``);
* ``digits_test.npz``: the held-out images (uint8, 8x8, grey levels 0..16) and labels (written
  by the digits-vgg run; both models share the split);
* ``digits_vgg.json`` (``digits_resnet.json``): the measured test accuracy and how it was obtained.

Usage:
    python scripts/train_default_model.py                          # about a minute on 2 cores
    python scripts/train_default_model.py --model digits-resnet    # about two minutes
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from prunekit.datasets import digits_split, preprocess_digits
from prunekit.io.files import atomic_write, save_torch, write_json
from prunekit.models.digits_resnet import digits_resnet
from prunekit.models.zoo import digits_vgg

BUILDERS = {"digits-vgg": digits_vgg, "digits-resnet": digits_resnet}

ASSETS = Path(__file__).resolve().parent.parent / "prunekit" / "assets"


def shift_batch(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero-padded with the background value -1)."""
    n, _, h, w = x.shape
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(dim=1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(BUILDERS), default="digits-vgg")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ASSETS, help="folder for the asset files")
    args = parser.parse_args()

    # One thread and deterministic kernels: multithreaded reductions change the
    # summation order, and with it the trained weights.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    train_images, train_labels, test_images, test_labels = digits_split()
    train_x = preprocess_digits(train_images)
    train_y = torch.as_tensor(train_labels, dtype=torch.int64)
    test_x = preprocess_digits(test_images)
    test_y = torch.as_tensor(test_labels, dtype=torch.int64)

    model = BUILDERS[args.model]()
    stem = args.model.replace("-", "_")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * -(-len(train_x) // args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps)

    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        total = 0.0
        for begin in range(0, len(order), args.batch_size):
            index = order[begin : begin + args.batch_size]
            loss = F.cross_entropy(model(shift_batch(train_x[index], generator)), train_y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(index)
        if (epoch + 1) % 5 == 0 or epoch == args.epochs - 1:
            print(
                f"epoch {epoch + 1:3d}/{args.epochs}  loss {total / len(train_x):.4f}  "
                f"train acc {accuracy(model, train_x, train_y):.4f}"
            )
    seconds = time.perf_counter() - start
    test_accuracy = accuracy(model, test_x, test_y)

    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    save_torch(state, args.out / f"{stem}.pt")
    written = [args.out / f"{stem}.pt", args.out / f"{stem}.json"]
    if args.model == "digits-vgg":
        with atomic_write(args.out / "digits_test.npz", "wb") as handle:
            np.savez_compressed(handle, images=test_images.astype(np.uint8), labels=test_labels.astype(np.uint8))
        written.append(args.out / "digits_test.npz")
    write_json(
        args.out / f"{stem}.json",
        {
            "model": args.model,
            "data": "sklearn.datasets.load_digits, stratified split (prunekit.datasets.digits_split)",
            "train_images": len(train_x),
            "test_images": len(test_x),
            "test_accuracy": round(test_accuracy, 6),
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "seed": args.seed,
            "training_seconds": round(seconds, 1),
            "threads": 1,
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
    )
    print(f"test accuracy {test_accuracy:.4f} on {len(test_x)} held-out digits")
    print(f"training took {seconds:.1f} s on 1 thread ({platform.processor() or platform.machine()})")
    print(f"wrote {', '.join(str(path) for path in written)}")


if __name__ == "__main__":
    main()
