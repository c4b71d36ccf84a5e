"""Size on disk of a pruned VGG-19 ``features``: ``torch.save`` of the dense state_dict vs ``prunekit.save_sparse``.

The reference plan of the Deep Neural Compression project (per-conv sparsities
0.0, 0.9, 0.6, 0.6, 0.9, 0.8, 0.8, 0.7, 0.8, 0.8, 0.8, 0.9, 0.9, 0.9, 0.9, 0.85,
about 85 % overall) is applied with prunekit's fine-grained L1 method to
RANDOM-INIT weights (no pretrained weights offline), then finalized. Printed:
the counting figure (non-zero parameters, as that project reported it), the
dense file, the lossless sparse file (checked bit for bit after loading) and
the opt-in LOSSY float16-values file, with ratios, all measured in this run.

Run: ``python benchmarks/sparse_size.py [--out DIR]``
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from typing import List, Optional

import torch
import torchvision

import prunekit
from prunekit.io.sparse import load_sparse, read_sparse_header, save_sparse

REFERENCE_PLAN = (0.0, 0.9, 0.6, 0.6, 0.9, 0.8, 0.8, 0.7, 0.8, 0.8, 0.8, 0.9, 0.9, 0.9, 0.9, 0.85)


def bit_identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for the files (default: a temporary folder)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    features = torchvision.models.vgg19().features
    plan = dict(zip(prunekit.conv_layers(features), REFERENCE_PLAN))
    prunekit.finalize(prunekit.apply_plan(features, plan))
    state = features.state_dict()
    params = sum(v.numel() for v in state.values())
    nonzero = sum(int((v != 0).sum()) for v in state.values())
    negative_zeros = sum(int(((v == 0) & torch.signbit(v)).sum()) for v in state.values())

    print(f"machine: {platform.platform()}, python {platform.python_version()}, torch {torch.__version__}")
    print("model: torchvision vgg19().features, RANDOM-INIT weights, reference plan (fine-grained L1), finalized")
    print(f"counting: {params / 1e6:.2f}M -> {nonzero / 1e6:.2f}M non-zero parameters "
          f"({params / nonzero:.2f}x by counting, {1 - nonzero / params:.1%} zeros)")

    with tempfile.TemporaryDirectory() as scratch:
        folder = args.out or scratch
        os.makedirs(folder, exist_ok=True)
        dense_path = os.path.join(folder, "vgg19_features_dense.pt")
        prunekit.io.files.save_torch(state, dense_path)
        dense = os.path.getsize(dense_path)
        print(f"torch.save(state_dict), dense:        {dense:>12,} bytes   1.00x")

        rows = [("lossless", None), ("LOSSY float16 values", torch.float16)]
        for label, values_dtype in rows:
            path = os.path.join(folder, f"vgg19_features_{'fp16' if values_dtype else 'lossless'}.pksparse")
            start = time.perf_counter()
            save_sparse(state, path, values_dtype=values_dtype)
            saved = time.perf_counter() - start
            start = time.perf_counter()
            loaded = load_sparse(path)
            read = time.perf_counter() - start
            size = os.path.getsize(path)
            if values_dtype is None:
                exact = all(bit_identical(state[k], loaded[k]) for k in state)
                check = f"bit-identical after load: {exact}"
            else:
                worst = max(
                    float(((loaded[k] - state[k]).abs() / state[k].abs().clamp_min(1e-30))[state[k] != 0].max())
                    for k in state
                    if state[k].is_floating_point() and bool((state[k] != 0).any())
                )
                check = f"header lossy={read_sparse_header(path)['lossy']}, max relative error {worst:.1e}"
            print(f"save_sparse, {label + ':':27s}{size:>12,} bytes  {dense / size:5.2f}x smaller "
                  f"(save {saved:.1f} s, load {read:.1f} s; {check})")

        if negative_zeros:
            print(f"note: {negative_zeros:,} of the zeros are -0.0; the lossless file keeps their signs")
    print("targets: lossless >= 5.4x, float16 values >= 10x smaller than torch.save of the dense features")


if __name__ == "__main__":
    main()
