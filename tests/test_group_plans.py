"""Plans and scans of channel groups: one level per group, the same units masked in every member, compact follows."""

import pytest
import torch
from torch import nn

import prunekit
from prunekit.methods.groups import unit_scores
from prunekit.methods.registry import get_method
from prunekit.sensitivity import OutputDistortion, evaluate_plan, scan
from prunekit.stats import collect_channel_stats
from test_compact_groups import Net, ResidualStream, randomize_batchnorms


def residual():
    torch.manual_seed(0)
    model = ResidualStream()
    randomize_batchnorms(model)
    return model.eval()


def dead(layer: nn.Module) -> torch.Tensor:
    return (layer.weight.detach().flatten(1) == 0).all(dim=1)


@pytest.mark.parametrize("method", ["filter-norm", "channel"])
def test_a_level_given_to_one_member_masks_the_same_channels_in_the_whole_group(method):
    model = residual()
    stats = None
    if method == "channel":
        stats = collect_channel_stats(model, [torch.randn(4, 3, 10, 10)], progress=False)
    prunekit.apply_plan(model, {"a2": 0.5}, method=method, stats=stats)
    masked = dead(model.stem[0])
    assert int(masked.sum()) == 4
    assert torch.equal(dead(model.a2), masked) and torch.equal(dead(model.b2), masked)
    assert torch.equal(model.stem[0].bias == 0, masked) and not bool(dead(model.a1).any())
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        expected = model(x)
    small = prunekit.compact(model, x)
    assert small.stem[0].out_channels == small.a2.out_channels == small.b2.out_channels == 4
    torch.testing.assert_close(small(x), expected)


def test_two_levels_for_one_group_are_refused_naming_both_and_nothing_changes():
    model = residual()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"plan gives 'stem.0' 0.5 and 'b2' 0.25.*channel group 'stem.0': stem.0, a2, b2"):
        prunekit.apply_plan(model, {"stem.0": 0.5, "a1": 0.5, "b2": 0.25}, method="filter-norm")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(hasattr(m, "weight_mask") for m in model.modules())


def test_unit_scores_weigh_every_member_relative_to_its_own_channels():
    model = residual()
    block = get_method("filter-norm").block(model, "b2")
    assert block.name == "stem.0" and block.member_names == ["stem.0", "a2", "b2"]
    stem = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    flat = torch.ones(8)
    # A member with 100x larger scores does not outvote the others: each is divided by its mean.
    scores = unit_scores(block, [stem, flat * 100, flat])
    torch.testing.assert_close(scores, stem / 4.5 + 2)
    picked = get_method("filter-norm").scores(model, {"stem.0": block})["stem.0"]
    norms = [m.conv.weight.detach().abs().sum(dim=(1, 2, 3)) for m in block.members]
    torch.testing.assert_close(picked, sum(n / n.mean() for n in norms))


def test_a_channel_scan_measures_one_point_per_group_equal_to_the_plan_at_that_level():
    model = residual()
    metric = OutputDistortion([torch.randn(2, 3, 10, 10), torch.randn(2, 3, 10, 10)])
    result = scan(model, metric, sparsities=[0.25, 0.5], method="filter-norm", progress=False)
    assert result.layers == ["stem.0", "a1", "b1", "head"]
    for level_index, level in enumerate(result.sparsities):
        for key in ("stem.0", "a1"):
            alone = evaluate_plan(model, metric, {key: level}, method="filter-norm")
            assert result.scores[key][level_index] == pytest.approx(alone, rel=1e-6)
    plan = result.plan(max_drop=1.0)
    pruned = prunekit.apply_plan(prunekit.copy_model(model), plan, method="filter-norm")
    prunekit.compact(pruned, torch.randn(1, 3, 10, 10))  # every group's units: realisable


def test_masks_a_group_scan_uses_are_the_masks_a_plan_applies():
    torch.manual_seed(0)
    model = Net()
    randomize_batchnorms(model)
    pruning = get_method("filter-norm")
    blocks = pruning.blocks(model.eval(), ["block.expand.0"])
    (key, block), = blocks.items()
    assert block.member_names == ["block.expand.0", "block.depthwise.0", "block.excite"]
    make = pruning.mask_maker(block, pruning.scores(model, blocks)[key])
    for level in (0.25, 0.5, 0.75):
        pruned = prunekit.apply_plan(prunekit.copy_model(model), {"block.excite": level}, method="filter-norm")
        applied = [getattr(m, n + "_mask") for m, n in pruning.targets(pruning.block(pruned, "block.excite"))]
        assert all(torch.equal(a, b) for a, b in zip(make(level), applied))
        assert pruning.current_sparsity(pruning.block(pruned, "block.expand.0")) == pytest.approx(level)


class Summed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.a(x) + self.b(x)
        z = torch.cat([y, self.c(x)], dim=1)
        return self.head(z) + y.sum(dim=1, keepdim=True)  # the sum mixes y's channels: they are fixed


def test_a_group_level_beyond_its_removable_units_is_refused_naming_why():
    Shuffle = Summed
    with pytest.raises(ValueError, match=r"'a' cannot be channel-pruned: none of its 4 units of channel group .a. can be removed \(tensor.sum\(\) \(graph node .sum_1.\) is not supported\); leave it out of the plan"):
        prunekit.apply_plan(Shuffle(), {"a": 0.5}, method="filter-norm")


def test_scan_skips_and_prune_refuses_channels_compact_could_not_remove(tmp_path, monkeypatch, one_error_line):
    import json

    from click.testing import CliRunner

    from prunekit.cli import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "shuffled.py").write_text(
        "from torch import nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),\n"
        "                         nn.ReLU(), nn.PixelShuffle(2), nn.Conv2d(4, 3, 1))\n"
    )
    runner = CliRunner()
    common = ["--model", "shuffled:build", "--method", "filter-norm", "--image-size", "16", "--batch-size", "2"]
    scanned = runner.invoke(cli, ["scan", *common, "--sparsities", "0.25,0.5", "--max-drop", "10", "--out", "s", "--quiet"])
    assert scanned.exit_code == 0, scanned.output
    assert "skipping channel group '2' (at most 0%: PixelShuffle '4' is not supported)" in scanned.output
    plan = json.loads(open("s/plan.json").read())["plan"]
    assert "2" not in plan and plan["0"] > 0
    assert "compact will not shrink" not in scanned.output
    (tmp_path / "plan2.json").write_text(json.dumps({"plan": {"2": 0.5}, "method": "filter-norm"}))
    refused = runner.invoke(cli, ["prune", "--plan", "plan2.json", "--model", "shuffled:build", "--out", "p.pt"])
    one_error_line(refused, "'2' cannot be channel-pruned", "PixelShuffle '4' is not supported", "leave it out of the plan")
    assert not (tmp_path / "p.pt").exists()
    # Where compact works, the hint is there (plan on the first conv only).
    (tmp_path / "plan0.json").write_text(json.dumps({"plan": {"0": 0.5}, "method": "filter-norm"}))
    fine = runner.invoke(cli, ["prune", "--plan", "plan0.json", "--model", "shuffled:build", "--out", "q.pt"])
    assert fine.exit_code == 0, fine.output
    assert "remove the pruned channels for real: prunekit compact q.pt" in fine.output


def test_scan_and_prune_say_when_compact_cannot_realise_a_channel_plan(tmp_path, monkeypatch):
    """A model torch.fx cannot trace has no known couplings: its convs are masked, and both commands say compact will not shrink it."""
    import json

    from click.testing import CliRunner

    from prunekit.cli import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "branchy.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "class Branchy(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 3, 1)\n"
        "    def forward(self, x):\n"
        "        y = torch.relu(self.a(x))\n"
        "        return self.b(y) if bool(y.mean() > -1) else x  # data-dependent: fx cannot trace it\n"
        "def build():\n"
        "    return Branchy()\n"
    )
    runner = CliRunner()
    common = ["--model", "branchy:build", "--method", "filter-norm", "--image-size", "16", "--batch-size", "2"]
    scanned = runner.invoke(cli, ["scan", *common, "--sparsities", "0.25,0.5", "--max-drop", "10", "--out", "s", "--quiet"])
    assert scanned.exit_code == 0, scanned.output
    assert json.loads(open("s/plan.json").read())["plan"]["a"] > 0
    assert "warning: compact will not shrink a model pruned by this plan" in scanned.output
    assert "could not trace Branchy" in scanned.output
    pruned = runner.invoke(cli, ["prune", "--plan", "s/plan.json", "--model", "branchy:build", "--out", "p.pt"])
    assert pruned.exit_code == 0, pruned.output
    assert "note: compact cannot shrink this model" in pruned.output and "could not trace Branchy" in pruned.output
    assert "prunekit compact" not in pruned.output


def test_a_scan_warns_when_the_dense_output_is_all_zeros():
    from prunekit.sensitivity.metrics import ZeroOutputWarning

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    nn.init.zeros_(model[3].weight)
    nn.init.zeros_(model[3].bias)  # a zero-initialised head
    with pytest.warns(ZeroOutputWarning, match="model's output is all zeros on every batch"):
        result = scan(model, OutputDistortion(torch.randn(2, 3, 8, 8)), sparsities=[0.5], progress=False)
    assert result.layers == ["0", "3"]  # fine-grained scans the Linear head too
    nn.init.normal_(model[3].weight)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", ZeroOutputWarning)
        scan(model, OutputDistortion(torch.randn(2, 3, 8, 8)), sparsities=[0.5], progress=False)


def test_a_scan_skips_groups_it_cannot_prune_or_refuses_them_when_named():
    model = Summed().eval()
    metric = OutputDistortion(torch.randn(2, 3, 6, 6))
    with pytest.warns(UserWarning, match=r"skipping channel groups 'a' \(at most 0%: tensor.sum\(\).*'head' \(at most 0%: add\(\)"):
        result = scan(model, metric, sparsities=[0.5], method="filter-norm", progress=False)
    assert result.layers == ["c"]  # head's channels meet the add() of an untracked sum: compact could not remove them
    with pytest.raises(ValueError, match=r"channel group 'a' \(at most 0%.*cannot be pruned to 50%; leave out"):
        scan(model, metric, layers=["b", "c"], sparsities=[0.5], method="filter-norm", progress=False)
