"""Rounding a timed plan's widths up to what the machine runs as fast: the choice, the timer, the fit and the CLI."""

import math

import pytest
import torch
from torch import nn

import prunekit.planning.budget as budget_module
import prunekit.planning.latency as latency_module
import prunekit.planning.rounding as rounding_module
from prunekit.cli import cli
from prunekit.measure.timing import Speedup
from prunekit.planning.costs import Cost
from prunekit.methods.registry import get_method
from prunekit.planning import Budget, plan_costs
from prunekit.planning.budget import fit_budget
from prunekit.planning.latency import time_widths
from prunekit.planning.rounding import RoundedPlan, round_widths
from prunekit.sensitivity import OutputDistortion, scan

SIZE = (3, 16, 16)


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """Latency tables go to the test's own folder (never the user's cache)."""
    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path / "cache"))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 48, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(48, 8, 3, padding=1)).eval()


def _fake_timer(seconds_of):
    """A deterministic time_widths: each layer at (in, out) costs seconds_of(in, out); the calls are recorded."""
    calls = []

    def timer(model, input_size, widths, *, batch=1, repeats=9):
        calls.append({name: list(pairs) for name, pairs in widths.items()})
        return {name: {tuple(pair): seconds_of(*pair) for pair in pairs} for name, pairs in widths.items()}

    return timer, calls


def _staircase(step):
    return lambda kept_in, kept_out: math.ceil(kept_in / step) * math.ceil(kept_out / step)


@pytest.fixture
def costs():
    return plan_costs(_model(), get_method("filter-norm"), ["0", "2"], SIZE)


def test_a_staircase_rounds_each_group_up_to_its_step_and_no_further(monkeypatch, costs):
    timer, calls = _fake_timer(_staircase(8))
    monkeypatch.setattr(rounding_module, "time_widths", timer)
    rounded = round_widths(_model(), {"0": 39 / 64, "2": 11 / 48}, costs, SIZE)
    # 25 of 64 kept: 28 and 32 cost what 25 costs on a staircase of 8; 37 of 48: 40 does, 48 is a step up
    assert rounded.widths == {"0": (25, 32), "2": (37, 40)}
    assert rounded.plan == {"0": 32 / 64, "2": 8 / 48}
    assert rounded.changed == rounded.widths and "2 of 2 groups rounded up" in rounded.summary()
    assert "+10 channels kept" in rounded.summary()
    # group 0's channels pass through conv 0 (its outputs) and conv 2 (its inputs), each timed at every width
    first = calls[0]
    assert set(first) == {"0", "2"} and first["0"][0] == (3, 25) and first["2"][0] == (25, 37)


def test_a_time_that_grows_with_every_channel_keeps_the_fitted_widths(monkeypatch, costs):
    timer, _ = _fake_timer(lambda kept_in, kept_out: float(kept_in * kept_out))
    monkeypatch.setattr(rounding_module, "time_widths", timer)
    plan = {"0": 39 / 64, "2": 11 / 48}
    rounded = round_widths(_model(), plan, costs, SIZE)
    assert rounded.plan == plan and rounded.changed == {}
    assert rounded.widths == {"0": (25, 25), "2": (37, 37)} and "kept as fitted" in rounded.summary()


def test_the_slack_decides_how_much_slower_a_wider_width_may_be(monkeypatch, costs):
    # one channel more costs 2 % more time: within a 3 % slack one step of 4 fits no multiple, a 10 % slack does
    timer, _ = _fake_timer(lambda kept_in, kept_out: 1.02 ** (kept_in + kept_out))
    monkeypatch.setattr(rounding_module, "time_widths", timer)
    assert round_widths(_model(), {"0": 39 / 64}, costs, SIZE).widths == {"0": (25, 25)}
    assert round_widths(_model(), {"0": 39 / 64}, costs, SIZE, slack=0.10).widths == {"0": (25, 28)}


def test_groups_at_a_multiple_or_unpruned_are_not_timed(monkeypatch, costs):
    timer, calls = _fake_timer(_staircase(8))
    monkeypatch.setattr(rounding_module, "time_widths", timer)
    rounded = round_widths(_model(), {"0": 0.5, "2": 0.0}, costs, SIZE, multiples=(32,))
    assert rounded.plan == {"0": 0.5, "2": 0.0} and rounded.widths == {} and calls == []


@pytest.mark.parametrize("kwargs, fragment", [({"slack": 1.0}, "slack=1.0"), ({"slack": -0.1}, "slack=-0.1"),
                                              ({"multiples": (1,)}, "multiples=(1,)"), ({"multiples": ()}, "multiples=()")])
def test_bad_rounding_settings_are_refused_naming_them(costs, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        round_widths(_model(), {"0": 0.5}, costs, SIZE, **kwargs)


def test_rounding_refuses_a_fine_grained_plan():
    with pytest.raises(TypeError, match="channel plans"):
        round_widths(_model(), {"0": 0.5}, plan_costs(_model(), get_method("fine-grained"), ["0"], SIZE), SIZE)


def test_time_widths_times_the_exact_widths_asked_and_leaves_the_model_as_it_was():
    model = _model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    times = time_widths(model, SIZE, {"2": [(64, 48), (25, 48), (25, 48)], "4": [(48, 8)]}, repeats=2)
    assert sorted(times["2"]) == [(25, 48), (64, 48)] and list(times["4"]) == [(48, 8)]
    assert all(value > 0 for table in times.values() for value in table.values())
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match=r"\(65, 48\) of '2' are not within its dense widths \(64, 48\)"):
        time_widths(model, SIZE, {"2": [(65, 48)]}, repeats=1)
    with pytest.raises(ValueError, match=r"\['1'\] are not convs"):
        time_widths(model, SIZE, {"1": [(64, 64)]}, repeats=1)


def _fit_with(monkeypatch, rounded_ratio, score_of, **budget):
    """A timed fit on fake clocks: the fitted plan measures 1.3x, any other plan ``rounded_ratio``; scores by ``score_of``."""
    model = _model()
    metric = OutputDistortion(torch.randn(2, *SIZE, generator=torch.Generator().manual_seed(1)))
    result = scan(model, metric, method="filter-norm", sparsities=(0.25, 0.5, 0.75), progress=False)
    timer, calls = _fake_timer(_staircase(16))
    monkeypatch.setattr(rounding_module, "time_widths", timer)
    # The fit's per-layer latency tables and dense time on the same fake clock: the fitted plan never depends on
    # this machine's load (it did: a different fit, at times one whose rounding changes nothing).
    monkeypatch.setattr(latency_module._Layer, "measure", lambda layer, repeats: latency_module.LayerTiming(
        *layer.grid(), tuple(tuple(1e-3 * _staircase(16)(i, o) for o in layer.grid()[1]) for i in layer.grid()[0])))
    monkeypatch.setattr(latency_module, "latency_samples", lambda models, *args, **kwargs: {
        name: [0.02] * 3 for name in models})
    timed = []

    def fake_timing(model_, plan, method, size, repeats, batch=1):
        ratio = 1.3 if not timed else rounded_ratio
        timed.append(dict(plan))
        return Cost(1, 1, 1 / ratio), Speedup(ratio, ratio * 0.99, ratio * 1.01, 0.95)

    monkeypatch.setattr(budget_module, "_built_and_timed", fake_timing)
    monkeypatch.setattr(budget_module, "evaluate_plan", lambda model_, evaluate, plan, method: score_of(plan))
    fit = fit_budget(model, metric, result, Budget(speedup=1.3, **budget), method="filter-norm", input_size=SIZE)
    return fit, timed, calls


def _removed(plan):
    return sum(plan.values())  # a distortion (lower is better) that falls as channels are kept


def test_a_timed_fit_keeps_its_plan_rounded_when_it_still_meets_the_target_and_scores_better(monkeypatch):
    fit, timed, calls = _fit_with(monkeypatch, 1.28, _removed)
    fitted, rounded = timed  # the plan met the target at once; then its rounded copy was timed
    assert calls and fit.plan == rounded != fitted and fit.speedup.ratio == 1.28
    units = {"0": 64, "2": 48}
    assert fit.widened
    for group, (before, kept) in fit.widened.items():
        assert kept > before and (kept % 16 == 0 or kept == units[group])
        assert fit.plan[group] == (units[group] - kept) / units[group] <= fitted[group]
    assert fit.widths.endswith("as fitted)") and "kept (1.28x" in fit.widths
    assert "rounded up to widths this machine runs as fast" in fit.summary()


@pytest.mark.parametrize("ratio, score_of, reason", [
    (1.1, _removed, "they ran 1.10x, short of the target"),  # slower than the target and than the plan as fitted
    (1.28, lambda plan: -_removed(plan), "they scored"),  # keeping channels scored worse
])
def test_a_rounded_plan_that_misses_the_target_or_scores_worse_is_not_kept(monkeypatch, ratio, score_of, reason):
    fit, timed, _ = _fit_with(monkeypatch, ratio, score_of)
    fitted, _rounded = timed
    assert fit.plan == fitted and fit.widened == {} and fit.speedup.ratio == 1.3
    assert reason in fit.widths and fit.widths.endswith("so the widths were kept as fitted")


def test_a_rounding_that_keeps_every_channel_is_not_timed_nor_kept(monkeypatch):
    """Rounded back to every group's full width, the plan is the dense model: a noisy clock must not keep it."""
    monkeypatch.setattr(budget_module, "round_widths", lambda model, plan, costs, size, batch=1: RoundedPlan(
        plan={name: 0.0 for name in plan}, widths={name: (10, 64) for name in plan}))
    fit, timed, _ = _fit_with(monkeypatch, 1.5, _removed)  # the dense model 'measures' 1.5x: it must not be believed
    assert len(timed) == 1 and fit.plan == timed[0] and any(fit.plan.values()) and fit.widened == {}
    assert fit.widths.endswith("that keeps every channel, so the widths were kept as fitted")


def test_exact_widths_times_no_rounded_plan(monkeypatch):
    fit, timed, calls = _fit_with(monkeypatch, 1.28, _removed, round_widths=False)
    assert calls == [] and len(timed) == 1 and fit.widened == {} and fit.widths == ""


def test_a_macs_budget_is_never_rounded(monkeypatch):
    model = _model()
    metric = OutputDistortion(torch.randn(2, *SIZE, generator=torch.Generator().manual_seed(1)))
    result = scan(model, metric, method="filter-norm", sparsities=(0.25, 0.5, 0.75), progress=False)
    monkeypatch.setattr(rounding_module, "time_widths", lambda *a, **k: pytest.fail("timed a MACs budget's widths"))
    fit = fit_budget(model, metric, result, Budget(macs=0.5), method="filter-norm", input_size=SIZE)
    assert fit.widened == {} and fit.measured.macs <= 0.5 * fit.dense.macs


def test_round_widths_must_be_a_bool():
    with pytest.raises(ValueError, match="round_widths='no' is not True or False"):
        Budget(speedup=2, round_widths="no")


def test_exact_widths_without_a_time_budget_is_a_one_line_error(runner, one_error_line):
    one_error_line(runner.invoke(cli, ["scan", "--target-macs", "0.5", "--exact-widths"]),
                   "--exact-widths keeps the widths a --target-speedup/--target-latency plan would round up")


def test_help_explains_exact_widths(runner):
    text = " ".join(runner.invoke(cli, ["scan", "--help"]).output.split())
    assert "--exact-widths" in text and "runs as fast" in text and "multiples of 4/8/16/32" in text


def test_rounded_plan_summary_counts_the_channels_kept():
    done = RoundedPlan({"a": 0.5}, widths={"a": (25, 32), "b": (8, 8)}, seconds={"a": (1.0, 1.0), "b": (1.0, 1.0)})
    assert done.changed == {"a": (25, 32)} and done.summary().startswith("widths: 1 of 2 groups rounded up")
