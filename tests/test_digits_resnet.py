"""digits-resnet: a trained residual model offline, and channel groups from scan to a smaller, exact model."""

import json

import pytest
import torch

import prunekit
from prunekit.cli import cli
from prunekit.datasets import digits_test_set
from prunekit.models.digits_resnet import digits_resnet


def accuracy(model) -> float:
    images, labels = digits_test_set().tensors
    with torch.no_grad():
        return float((model.eval()(images).argmax(dim=1) == labels).float().mean())


def test_the_shipped_weights_classify_the_held_out_digits():
    model = digits_resnet(pretrained=True)
    assert accuracy(model) >= 0.98
    groups = prunekit.channel_groups(model)
    stream = next(g for g in groups if g.name == "layer3.0.conv2")
    assert stream.members == ("layer3.0.conv2", "layer3.0.downsample.0", "layer3.1.conv2")
    with pytest.raises(ValueError, match="10 classes"):
        digits_resnet(pretrained=True, num_classes=3)


def test_scan_prune_compact_run_offline_and_keep_accuracy_within_max_drop(runner):
    scanned = runner.invoke(cli, ["scan", "--model", "digits-resnet", "--method", "filter-norm", "--sparsities",
                                  "0.1,0.25,0.5", "--max-drop", "0.02", "--out", "fn", "--quiet"])
    assert scanned.exit_code == 0, scanned.output
    plan = json.loads(open("fn/plan.json").read())["plan"]
    assert "layer3.0.conv2" in plan and "layer3.1.conv2" not in plan  # one entry per channel group
    assert plan["layer3.0.conv2"] > 0  # a residual stream is pruned
    pruned = runner.invoke(cli, ["prune", "--plan", "fn/plan.json", "--out", "fn.pt"])
    assert pruned.exit_code == 0, pruned.output
    assert "prunekit compact fn.pt" in pruned.output
    compacted = runner.invoke(cli, ["compact", "fn.pt", "--out", "small.pt"])
    assert compacted.exit_code == 0, compacted.output
    masked = prunekit.load_model("fn.pt")
    small = prunekit.load_model("small.pt", trust_checkpoint=True)
    kept = round(64 * (1 - plan["layer3.0.conv2"]))
    for name in ("layer3.0.conv2", "layer3.0.downsample.0", "layer3.1.conv2"):
        assert small.get_submodule(name).out_channels == kept
    x = digits_test_set().tensors[0]
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked.eval()(x), rtol=1e-4, atol=1e-4)
    assert accuracy(small) >= accuracy(digits_resnet(pretrained=True)) - 0.02
