"""Channel pruning on every common CNN: prunekit ``compact`` next to Torch-Pruning, on the same channels.

For each model (random weights, randomised BatchNorm statistics, eval mode), half of
every channel group's removable units are masked, lowest L1 weight norm first (summed
over the group's members: the data-free criterion, so both tools see the same
channels). prunekit's ``compact`` removes them; Torch-Pruning (``pip install
torch-pruning``, the ``bench`` extra) prunes the same output channels of each group's
first member through its dependency graph. Printed per model: parameters and MACs
before/after, the batch-1 latency of dense / prunekit / Torch-Pruning timed in
interleaved rounds (median per-round speed-ups with 95 % bootstrap intervals), and the
largest relative difference of each compacted model from the masked model.

Run: ``python benchmarks/compact_coverage.py [--size 224] [--threads 1] [--rounds 15] [models...]``
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
from typing import Dict, List, Optional

import torch
import torchvision
from torch import nn
from torch.nn.utils import prune

import prunekit
from prunekit.compact import compact
from prunekit.dependency import channel_groups, unit_masks
from prunekit.layers import channel_tensor_names, channel_weight
from prunekit.measure.macs import count_macs
from prunekit.testing import randomize_batchnorms, randomize_layer_norms
from prunekit.measure.timing import latency_samples, speedup
from prunekit.measure.error import relative_error

MODELS = [
    "vgg16_bn", "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0",
    "densenet121", "regnet_x_400mf", "googlenet", "squeezenet1_1", "shufflenet_v2_x1_0", "convnext_tiny",
    "regnet_y_400mf", "efficientnet_v2_s", "swin_t", "vit_b_16:mlp", "vit_b_16",
]  # fmt: skip
# "NAME:mlp": only the groups of convs and Linear layers (a ViT's MLP hidden units), not the attentions' heads,
# which Torch-Pruning cannot remove (its nn.MultiheadAttention pruner narrows embed_dim with the residual stream).


def build(name: str) -> nn.Module:
    name = name.partition(":")[0]
    kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    model = getattr(torchvision.models, name)(**kwargs).eval()
    if isinstance(getattr(model, "heads", None), nn.Sequential):
        nn.init.normal_(model.heads.head.weight)  # a ViT's zero-initialised head would make every output 0
    randomize_layer_norms(model, seed=1)  # a model with LayerNorms (ConvNeXt): their affine pairs and biases
    return randomize_batchnorms(model, seed=1, affine=False)  # statistics only, as the figures were measured


def mask_half(model: nn.Module, heads: bool = True) -> Dict[str, List[int]]:
    """Mask half of each group's removable units (lowest summed L1 first); each group's first member's dead channels.
    ``heads=False`` leaves the attentions alone."""
    first_member: Dict[str, List[int]] = {}
    for group in channel_groups(model):
        removable = list(group.removable_units)
        if len(removable) < 2 or (not heads and isinstance(model.get_submodule(group.name), nn.MultiheadAttention)):
            continue
        scores = torch.tensor([
            sum(float(channel_weight(model.get_submodule(n)).detach()[list(c)].abs().sum())
                for n, c in group.units[k].channels.items())
            for k in removable
        ])
        drop = [removable[i] for i in scores.argsort()[: len(removable) // 2].tolist()]
        for name, keep in unit_masks(model, group, drop).items():
            layer = model.get_submodule(name)
            for tensor_name in channel_tensor_names(layer):  # weight and bias (an attention's in-projection's)
                tensor = getattr(layer, tensor_name)
                prune.custom_from_mask(layer, tensor_name, keep.view((-1,) + (1,) * (tensor.dim() - 1)).expand_as(tensor))
        head = group.members[0]
        first_member[head] = sorted(c for k in drop for c in group.units[k].channels.get(head, ()))
    return first_member


def torch_pruning_version(masked: nn.Module, dead: Dict[str, List[int]], example: torch.Tensor) -> Optional[nn.Module]:
    try:
        import torch_pruning as tp
    except ImportError:
        return None
    model = prunekit.finalize(prunekit.copy_model(masked))
    for module in model.modules():
        if isinstance(module, (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU)) and getattr(module, "inplace", False):
            module.inplace = False  # Torch-Pruning cannot trace torch 2.x in-place activations
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    for name, channels in dead.items():
        layer = model.get_submodule(name)
        handler = tp.prune_conv_out_channels if isinstance(layer, nn.Conv2d) else tp.prune_linear_out_channels
        group = graph.get_pruning_group(layer, handler, idxs=channels)
        if graph.check_pruning_group(group):
            group.prune()
    return model


def total(counts: Dict[str, tuple]) -> float:
    return sum(dense for dense, _ in counts.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=MODELS)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s), "
          f"batch 1 at {args.size} px, load average {os.getloadavg()[0]:.2f}; random weights")
    header = ("model", "params M dense/pk/TP", "MACs G dense/pk", "prunekit speed-up", "TP speed-up", "TP/pk time", "rel pk", "rel TP")
    print(" | ".join(header))
    for name in args.models:
        torch.manual_seed(0)
        x = torch.rand(1, 3, args.size, args.size)
        dense = build(name)
        masked = copy.deepcopy(dense)
        try:
            dead = mask_half(masked, heads=not name.endswith(":mlp"))
            small = compact(masked, x)
        except Exception as err:  # noqa: BLE001 - the benchmark reports what each model does
            print(f"{name} | prunekit refused: {' '.join(str(err).split())[:160]}")
            continue
        with torch.no_grad():
            reference = masked(x)
            rel_pk = relative_error(small(x), reference)
        attentions = [n for n in dead if isinstance(masked.get_submodule(n), nn.MultiheadAttention)]
        try:
            tp_model = None if attentions else torch_pruning_version(masked, dead, x)
        except Exception as err:  # noqa: BLE001
            tp_model, tp_error = None, f"failed: {type(err).__name__}"
        else:
            tp_error = ("no head pruning for nn.MultiheadAttention" if attentions else
                        "not installed" if tp_model is None else "")
        models = {"dense": dense, "prunekit": small}
        if tp_model is not None:
            with torch.no_grad():
                rel_tp = relative_error(tp_model(x), reference)
            models["tp"] = tp_model
        samples = latency_samples(models, x, repeats=args.rounds, warmup=3)
        params = [sum(p.numel() for p in m.parameters()) / 1e6 for m in models.values()]
        macs = (total(count_macs(dense, x.shape)) / 1e9, total(count_macs(small, x.shape)) / 1e9)
        row = [name, "/".join(f"{p:.2f}" for p in params), f"{macs[0]:.2f}/{macs[1]:.2f}",
               str(speedup(samples["dense"], samples["prunekit"])).split(" (")[0] + f" ({speedup(samples['dense'], samples['prunekit']).low:.2f}-{speedup(samples['dense'], samples['prunekit']).high:.2f})"]
        if tp_model is not None:
            tp = speedup(samples["dense"], samples["tp"])
            ratio = speedup(samples["tp"], samples["prunekit"])
            row += [f"{tp.ratio:.2f}x ({tp.low:.2f}-{tp.high:.2f})", f"{ratio.ratio:.2f} ({ratio.low:.2f}-{ratio.high:.2f})",
                    f"{rel_pk:.1e}", f"{rel_tp:.1e}"]
        else:
            row += [tp_error, "", f"{rel_pk:.1e}", ""]
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
