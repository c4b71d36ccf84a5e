"""Pruning to a budget in stages (prune_in_stages, prunekit scan --steps): shares, compaction, recovery, resume."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from prunekit.cli import cli
from prunekit.io.compacted import rebuild_compacted
from prunekit.models.zoo import load_model
from prunekit.planning import Budget
from prunekit.planning.costs import measured_costs
from prunekit.planning.stages import StagesInterrupted, prune_in_stages, stage_budget
from prunekit.training.recover import recover

LEVELS = (0.25, 0.5, 0.75)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                                  nn.Conv2d(24, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 4, 1))

    def forward(self, x):
        x = self.stem(x)
        return self.head(x + self.body(x))


def _model():
    torch.manual_seed(0)
    model = Residual()
    for module in model.modules():  # BatchNorms with statistics of their own: the folded constants matter
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def _batches():
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 12, 12, generator=generator) for _ in range(2)]


def _distil(train):
    def run(student, teacher):
        torch.manual_seed(0)
        return recover(student, teacher, train, 3, held_out=train[:1], progress=False)
    return run


def test_each_stage_takes_an_equal_share_of_what_is_left_and_the_budget_is_met():
    model, batches = _model(), _batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run = prune_in_stages(model, batches, Budget(macs=0.3), 3, method="filter-norm", sparsities=LEVELS,
                          recover=_distil(batches), progress=False)
    assert [stage.index for stage in run.stages] == [1, 2, 3]
    assert run.stages[0].budget["macs"] == pytest.approx(0.3 ** (1 / 3))
    macs = [stage.macs for stage in run.stages]
    assert macs == sorted(macs, reverse=True) and run.macs <= 0.3 * 1.02
    dense, final = measured_costs(model, (3, 12, 12)), measured_costs(run.model, (3, 12, 12))
    assert final.macs / dense.macs == pytest.approx(run.macs)  # what the record says is what the model costs
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the dense model is untouched
    assert "share of its input" in run.table() and run.table().count("\n") == 5


def test_rescan_changed_scans_only_the_groups_the_stage_before_pruned():
    model, batches = _model(), _batches()
    changed = prune_in_stages(model, batches, Budget(macs=0.5), 2, method="filter-norm", sparsities=LEVELS,
                              progress=False)
    first, second = changed.stages
    pruned_groups = sum(1 for level in first.plan.values() if level > 0)
    assert second.rescanned == pruned_groups < second.groups
    everything = prune_in_stages(model, batches, Budget(macs=0.5), 2, method="filter-norm", sparsities=LEVELS,
                                 rescan="all", progress=False)
    assert everything.stages[1].rescanned == everything.stages[1].groups


def test_an_interrupted_run_resumes_after_its_last_stage_and_ends_as_an_unbroken_one(tmp_path):
    model, batches = _model(), _batches()
    options = dict(method="filter-norm", sparsities=LEVELS, progress=False)
    whole = prune_in_stages(model, batches, Budget(macs=0.3), 3, recover=_distil(batches), **options)
    calls = {"n": 0}

    def interrupted_in_stage_two(student, teacher):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return _distil(batches)(student, teacher)

    with pytest.raises(StagesInterrupted) as caught:
        prune_in_stages(model, batches, Budget(macs=0.3), 3, recover=interrupted_in_stage_two, folder=tmp_path, **options)
    assert (caught.value.stage, caught.value.during) == (2, "recovery")
    saved = json.loads((tmp_path / "stages.json").read_text())
    assert len(saved["stages"]) == 1 and (tmp_path / "stage-1" / "model.pt").is_file()
    with pytest.raises(ValueError, match="other options"):
        prune_in_stages(model, batches, Budget(macs=0.25), 3, recover=_distil(batches), folder=tmp_path, resume=True,
                        **options)
    resumed = prune_in_stages(model, batches, Budget(macs=0.3), 3, recover=_distil(batches), folder=tmp_path,
                              resume=True, **options)
    assert resumed.stages == whole.stages  # every record too: what was scanned, scored and recovered
    x = batches[0]
    with torch.no_grad():
        assert torch.equal(resumed.model(x), whole.model(x))
    rebuilt = rebuild_compacted(_model(), torch.load(tmp_path / "stage-3" / "model.pt", weights_only=True), "stage-3")
    with torch.no_grad():
        assert torch.equal(rebuilt(x), whole.model(x))


@pytest.mark.parametrize("call, fragment", [
    (dict(steps=0), "steps=0"),
    (dict(method="fine-grained"), "needs a channel method"),
    (dict(rescan="some"), "rescan='some'"),
    (dict(budget={"macs": 0.5}), "Budget"),
])
def test_bad_arguments_are_refused_before_any_work(call, fragment):
    arguments = dict(budget=Budget(macs=0.5), steps=2, method="filter-norm")
    arguments.update(call)
    with pytest.raises((ValueError, TypeError), match=fragment):
        prune_in_stages(_model(), _batches(), arguments.pop("budget"), arguments.pop("steps"), progress=False,
                        **arguments)


def test_a_share_already_met_is_left_out():
    reached = {"macs": 0.2, "params": 0.5, "speedup": 1.0}
    assert stage_budget(Budget(macs=0.3, params=0.25), reached, 1) == {"params": 0.5}
    assert stage_budget(Budget(macs=0.3), reached, 2) == {}
    assert stage_budget(Budget(speedup=4), {"macs": 1, "params": 1, "speedup": 2.0}, 2) == {"speedup": pytest.approx(2 ** 0.5)}


ARGS = ["scan", "--model", "digits-vgg", "--method", "filter-norm", "--target-macs", "0.5", "--steps", "2",
        "--sparsities", "0.5,0.75", "--out", "run", "-q"]


@pytest.mark.slow
def test_scan_steps_writes_the_stages_and_a_compacted_model_every_command_loads(runner):
    result = runner.invoke(cli, ARGS + ["--recover-steps", "2", "--json"])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert [stage["index"] for stage in document["stages"]] == [1, 2]
    assert document["stages"][-1]["macs"] <= 0.5 * 1.02
    assert all(stage["recovery"]["steps_done"] == 2 for stage in document["stages"])
    small = load_model("run/pruned.pt")
    dense = load_model("digits-vgg")
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in dense.parameters())
    again = runner.invoke(cli, ARGS)
    assert again.exit_code == 1 and "--resume" in again.stderr  # an earlier run's stages are never replaced silently
    resumed = runner.invoke(cli, ARGS + ["--recover-steps", "2", "--resume", "--json"])
    assert resumed.exit_code == 0, resumed.stderr
    assert json.loads(resumed.stdout)["stages"] == document["stages"]
    compacted = runner.invoke(cli, ["compact", "run/pruned.pt", "--repeats", "2", "--json"])
    assert compacted.exit_code == 0, compacted.stderr
    report = json.loads(compacted.stdout)
    assert report["removed"] and report["report"]["macs_after"] <= 0.5 * 1.02 * report["report"]["macs_before"]
    assert Path("run/stage-2/scan.json").is_file()


@pytest.mark.parametrize("extra, fragment", [
    (["--target-macs", "0.5", "--steps", "2", "--method", "fine-grained"], "channel method"),
    (["--steps", "2"], "pass --target-macs"),
    (["--recover-steps", "10"], "--steps 2 or more"),
    (["--target-macs", "0.5", "--steps", "2", "--method", "channel", "--confidence", "0.99"], "drop --confidence"),
])
def test_scan_steps_refuses_what_it_cannot_do_in_one_line(runner, one_error_line, extra, fragment):
    one_error_line(runner.invoke(cli, ["scan", "--out", "run", *extra]), fragment)


def test_recovery_on_the_builtin_digits_trains_on_the_training_split_never_on_the_scored_test_split(monkeypatch):
    from prunekit import datasets
    from prunekit.cli.inputs import recovery_batches

    model = load_model("digits-vgg")
    train, held, description = recovery_batches(model, "builtin", None, None, None, 10, 0)
    assert sum(len(batch) for batch in train + held) == len(datasets.digits_train_set()) == 1437
    assert "training split" in description and "never trained on" in description

    def no_scikit_learn():
        raise ImportError("no sklearn")

    monkeypatch.setattr(datasets, "digits_train_set", no_scikit_learn)
    train, held, description = recovery_batches(model, "builtin", None, None, None, 10, 0)
    assert sum(len(batch) for batch in train + held) == 360 and "pip install scikit-learn" in description


def test_a_speedup_budget_in_stages_is_timed_at_each_stage_and_multiplied(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 4, 1)).eval()
    batches = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))]
    run = prune_in_stages(model, batches, Budget(speedup=1.2, batch=2), 2, method="filter-norm", sparsities=LEVELS,
                          progress=False)
    first, second = run.stages
    assert first.budget["speedup"] == pytest.approx(1.2 ** 0.5)  # an equal share of the speed-up
    assert set(second.budget) <= {"speedup"} and first.speedup is not None
    if second.budget:  # what the first stage measured is what the second is asked to add
        assert second.budget["speedup"] == pytest.approx(1.2 / first.speedup)
    assert run.speedup == second.speedup and run.macs < 1.0
