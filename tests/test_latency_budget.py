"""Speed-up and latency budgets: the per-layer latency model, its cache, the timed check and its correction, bad budgets."""

import json

import pytest
import torch
from torch import nn

import prunekit.planning.budget as budget_module
import prunekit.planning.latency as latency_module
from prunekit.cli import cli
from prunekit.measure.timing import Speedup
from prunekit.methods.registry import get_method
from prunekit.planning import Budget, BudgetError, LatencyModel, fit_plan, measure_latency, plan_costs, run_scan
from prunekit.planning.budget import CORRECTIONS, SPEEDUP_TOLERANCE, fit_budget, timed_costs
from prunekit.planning.costs import Cost
from prunekit.planning.latency import GRID, LayerTiming
from prunekit.sensitivity import OutputDistortion, scan
from prunekit.testing import randomize_batchnorms

from tests.test_budget import SIZE, _convs, _model


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """Every test keeps its latency tables in its own folder (never the user's cache)."""
    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path / "cache"))


def _synthetic_latency(costs, dense_seconds=1.0, batch=1):
    """A latency model whose layers cost kept_in x kept_out (no timing: deterministic)."""
    tables = {}
    for name, (narrow_in, narrow_out) in costs.narrowable().items():
        layer = costs._layers[costs._layer_names.index(name)]
        ins, outs = (1, len(layer.in_units)), (1, len(layer.out_units))
        tables[name] = LayerTiming(ins, outs, tuple(tuple(float(i * o) for o in outs) for i in ins))
    total = sum(t.at(t.inputs[-1], t.outputs[-1]) for t in tables.values())
    return LatencyModel(dense_seconds, {"threads": 1, "batch": batch, "device": "cpu", "hardware": "test"},
                        {n: LayerTiming(t.inputs, t.outputs, tuple(tuple(v * dense_seconds / total for v in row)
                                                                  for row in t.seconds)) for n, t in tables.items()},
                        1.0, 0.0, {n: 1.0 for n in tables})


# ---------------------------------------------------------------------------------------------- the table


def test_a_layer_timing_interpolates_bilinearly_and_clamps_to_its_grid():
    timing = LayerTiming((2, 4), (10, 20), ((1.0, 2.0), (3.0, 6.0)))
    assert timing.at(2, 10) == 1.0 and timing.at(4, 20) == 6.0
    assert timing.at(3, 15) == pytest.approx((1.0 + 2.0 + 3.0 + 6.0) / 4)
    assert timing.at(1, 5) == 1.0 and timing.at(9, 99) == 6.0  # outside the grid: its ends
    assert LayerTiming.from_dict(timing.to_dict()) == timing


@pytest.mark.parametrize("entry", [
    None, [], {"inputs": [1], "outputs": [1]}, {"inputs": [1], "outputs": [1], "seconds": [[-1.0]]},
    {"inputs": [1], "outputs": [1], "seconds": [[float("nan")]]}, {"inputs": [0], "outputs": [1], "seconds": [[1.0]]},
    {"inputs": [1, 2], "outputs": [1], "seconds": [[1.0]]}, {"inputs": [1], "outputs": [1], "seconds": [["x"]]},
])
def test_a_malformed_cached_grid_is_refused(entry):
    with pytest.raises((ValueError, TypeError)):
        LayerTiming.from_dict(entry)


def test_every_layer_is_timed_depthwise_and_grouped_included_and_dense_is_the_measured_time():
    model = _model()
    costs = plan_costs(model, get_method("filter-norm"), _convs(model), SIZE)
    latency = measure_latency(model, SIZE, costs.narrowable(), repeats=1, dense_repeats=3, progress=False)
    assert set(latency.tables) == set(costs.narrowable())
    for name, (narrow_in, narrow_out) in costs.narrowable().items():
        table = latency.tables[name]
        dense_out = model.get_submodule(name).weight.shape[0]
        assert list(table.outputs) == sorted(set(table.outputs)) and table.outputs[-1] == dense_out, name
        narrowed = narrow_out or (narrow_in and name == "depthwise.0")  # depthwise: its inputs are its outputs
        assert (len(table.outputs) > 1) == narrowed and len(table.outputs) <= len(GRID), name
        assert all(v > 0 for row in table.seconds for v in row)
    timed = costs.timed(latency)
    assert timed.dense.seconds == pytest.approx(latency.dense_seconds, rel=1e-9)
    half = {key: 0.5 for key in timed.blocks}
    assert timed.of(half).seconds < timed.dense.seconds
    # the incremental tally counts the same seconds as a full count
    tally = timed.tally({})
    for key in half:
        tally.set(key, 0.5)
    assert tally.cost.seconds == pytest.approx(timed.of(half).seconds, rel=1e-9)


def test_the_cache_is_reused_and_keyed_by_the_threads(tmp_path, monkeypatch):
    model = _model()
    layers = plan_costs(model, get_method("filter-norm"), _convs(model), SIZE).narrowable()
    first = measure_latency(model, SIZE, layers, repeats=1, dense_repeats=1, progress=False)
    files = list((tmp_path / "cache").glob("latency-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["setting"]["threads"] == torch.get_num_threads()
    timed_models = []
    original = latency_module.latency_samples

    def counting(models, *args, **kwargs):
        timed_models.append(sorted(models))
        return original(models, *args, **kwargs)

    monkeypatch.setattr(latency_module, "latency_samples", counting)
    second = measure_latency(model, SIZE, layers, repeats=1, dense_repeats=1, progress=False)
    assert timed_models == [["dense"]] and second.tables == first.tables  # only the dense model timed again
    files[0].write_text("{not json")  # a damaged cache is measured again, not trusted
    timed_models.clear()
    measure_latency(model, SIZE, layers, repeats=1, dense_repeats=1, progress=False)
    assert len(timed_models) > 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads != 1 else 2)
    try:
        measure_latency(model, SIZE, layers, repeats=1, dense_repeats=1, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert len(list((tmp_path / "cache").glob("latency-*.json"))) == 2


def test_no_cache_writes_nothing(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    measure_latency(model, (3, 12, 12), {"0": (False, True), "2": (True, False)}, repeats=1, dense_repeats=1,
                    progress=False, cache=False)
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("kwargs, fragment", [
    ({"speedup": 1}, "speedup=1 is not a speed-up"), ({"speedup": 0.5}, "speedup=0.5"),
    ({"speedup": float("nan")}, "speedup=nan"), ({"speedup": True}, "speedup=True"),
    ({"latency": 0}, "latency=0 is not a time"), ({"latency": -0.01}, "latency=-0.01"),
    ({"latency": float("inf")}, "latency=inf"),
])
def test_bad_time_budgets_are_refused_naming_the_value(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        Budget(**kwargs)


def test_a_time_budget_is_the_tighter_of_its_limits():
    dense = Cost(100, 1000, 0.04)
    assert Budget(speedup=2).fractions(dense) == {"seconds": 0.5}
    assert Budget(speedup=2, latency=0.01).fractions(dense) == {"seconds": 0.25}
    assert Budget(macs=0.5, latency=0.03).fractions(dense) == {"macs": 0.5, "seconds": pytest.approx(0.75)}
    with pytest.raises(ValueError, match="latency model"):
        Budget(speedup=2).fractions(Cost(100, 1000))


def _scanned():
    model = _model()
    metric = OutputDistortion(torch.randn(2, *SIZE, generator=torch.Generator().manual_seed(1)))
    result = scan(model, metric, method="filter-norm", sparsities=(0.25, 0.5, 0.75), progress=False)
    return model, metric, result


@pytest.mark.parametrize("error", [1.0, 1.4, 0.7])
def test_the_timed_check_corrects_the_target_until_the_measured_speedup_meets_it(monkeypatch, error):
    """The compacted model 'measures' `error` times slower than the latency model predicts: the fit aims past it."""
    model, metric, result = _scanned()
    costs = plan_costs(model, get_method("filter-norm"), result.layers, SIZE)
    latency = _synthetic_latency(costs)
    timed = plan_costs(model, get_method("filter-norm"), result.layers, SIZE).timed(latency)
    measured = []

    def fake_timing(model_, plan, method, size, repeats, batch=1):
        ratio = timed.dense.seconds / (timed.of(plan).seconds * error)
        measured.append(ratio)
        return Cost(1, 1, timed.of(plan).seconds * error), Speedup(ratio, ratio * 0.99, ratio * 1.01, 0.95)

    monkeypatch.setattr(budget_module, "_built_and_timed", fake_timing)
    fit = fit_budget(model, metric, result, Budget(speedup=1.5, round_widths=False), method="filter-norm", input_size=SIZE,
                     latency=latency)
    assert fit.speedup.ratio == pytest.approx(min(measured, key=lambda r: abs(r / 1.5 - 1)))
    assert abs(fit.speedup.ratio / 1.5 - 1) <= SPEEDUP_TOLERANCE + 0.05  # whole units: the plan cannot land exactly
    assert fit.corrections == len(measured) - 1 <= CORRECTIONS
    assert (fit.corrections == 0) == (abs(measured[0] / 1.5 - 1) <= SPEEDUP_TOLERANCE)
    assert fit.cost.seconds == pytest.approx(timed.of(fit.plan).seconds)
    assert "runs 1." in fit.summary() and "faster" in fit.summary()


def test_a_timed_budget_fit_measures_the_compacted_copy_and_leaves_the_model_as_it_was():
    model, metric, result = _scanned()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # the plan is walked on a deterministic latency model (one measured here may, under load, put 1.2x out of
    # reach); its compacted copy is then timed for real beside the dense model
    latency = _synthetic_latency(plan_costs(model, get_method("filter-norm"), result.layers, SIZE))
    fit = fit_plan(model, metric, result, budget=Budget(speedup=1.2), method="filter-norm", input_size=SIZE,
                   latency=latency)
    assert isinstance(fit.speedup, Speedup) and fit.speedup.low <= fit.speedup.ratio <= fit.speedup.high
    assert fit.measured.seconds > 0 and fit.dense.seconds > 0 and fit.cost.seconds < fit.dense.seconds
    assert "thread(s), batch 1" in fit.timing
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_batch_budget_is_timed_at_its_batch_end_to_end():
    model, metric, result = _scanned()
    latency = _synthetic_latency(plan_costs(model, get_method("filter-norm"), result.layers, SIZE), batch=4)
    fit = fit_plan(model, metric, result, budget=Budget(speedup=1.2, batch=4), method="filter-norm", input_size=SIZE,
                   latency=latency)
    assert "thread(s), batch 4" in fit.timing and str(fit.budget) == "speed-up >= 1.2x at batch 4"
    one = measure_latency(model, SIZE, {name: (False, True) for name in result.layers}, repeats=1, dense_repeats=1,
                          progress=False, cache=False)
    with pytest.raises(ValueError, match="timed at batch 1, the budget asks for batch 4"):
        fit_budget(model, metric, result, Budget(speedup=1.2, batch=4), method="filter-norm", input_size=SIZE,
                   latency=one)


@pytest.mark.parametrize("arguments, fragment", [
    ({"speedup": 2, "batch": 0}, "batch=0 is not a batch size"), ({"speedup": 2, "batch": 2.5}, "batch=2.5"),
    ({"macs": 0.5, "batch": 8}, "a MACs or parameters budget counts per input"),
])
def test_a_bad_timing_batch_is_refused(arguments, fragment):
    with pytest.raises(ValueError, match=fragment):
        Budget(**arguments)


def test_timing_batch_without_a_time_budget_is_a_one_line_error(runner, one_error_line):
    one_error_line(runner.invoke(cli, ["scan", "--target-macs", "0.5", "--timing-batch", "8"]),
                   "--timing-batch 8 sets what --target-speedup/--target-latency are timed at")


def test_a_timed_fit_counts_with_the_cost_model_it_is_given_and_builds_none(monkeypatch):
    model, metric, result = _scanned()
    method = get_method("filter-norm")
    latency = _synthetic_latency(plan_costs(model, method, result.layers, SIZE))
    timed = plan_costs(model, method, result.layers, SIZE).timed(latency)
    monkeypatch.setattr(budget_module, "_built_and_timed", lambda model_, plan, method_, size, repeats, batch=1: (
        timed.of(plan), Speedup(timed.dense.seconds / timed.of(plan).seconds, 1.0, 9.0, 0.95)))
    expected = fit_budget(model, metric, result, Budget(speedup=1.5, round_widths=False), method=method, input_size=SIZE, latency=latency)
    monkeypatch.setattr(budget_module, "plan_costs", lambda *a, **k: pytest.fail("built a second cost model"))
    given = fit_budget(model, metric, result, Budget(speedup=1.5, round_widths=False), method=method, input_size=SIZE, costs=timed)
    assert given.plan == expected.plan and given.cost == expected.cost
    monkeypatch.undo()
    with pytest.raises(ValueError, match="needs seconds in its cost model"):
        fit_budget(model, metric, result, Budget(speedup=1.5), method=method, input_size=SIZE,
                   costs=plan_costs(model, method, result.layers, SIZE))
    with pytest.raises(ValueError, match="other layers than the scan's"):
        fit_budget(model, metric, result, Budget(macs=0.5), method=method, input_size=SIZE,
                   costs=plan_costs(model, method, result.layers[:1], SIZE))


def test_run_scan_traces_the_timed_cost_model_once(monkeypatch):
    built = []
    real = budget_module.plan_costs
    monkeypatch.setattr(budget_module, "plan_costs", lambda *a, **k: built.append(1) or real(*a, **k))
    model = randomize_batchnorms(_model())
    run = run_scan(model, [torch.randn(2, *SIZE)], method="filter-norm", sparsities=(0.25, 0.5),
                   budget=Budget(speedup=1.1), progress=False)
    assert run.fit is not None and run.fit.speedup is not None
    assert len(built) == 1  # timed_costs before the scan; the fit counts with that one


def test_a_fine_grained_method_cannot_take_a_time_budget():
    model = _model()
    with pytest.raises(BudgetError, match="runs as fast as the dense model .* channel method"):
        timed_costs(model, get_method("fine-grained"), _convs(model), SIZE)


def test_run_scan_refuses_an_unreachable_latency_before_scanning(monkeypatch):
    import prunekit.sensitivity as sensitivity

    monkeypatch.setattr(sensitivity, "scan", lambda *a, **k: pytest.fail("scanned first"))
    model = randomize_batchnorms(_model())
    with pytest.raises(BudgetError, match=r"out of reach: .* ms per forward \(dense .* ms, .*x faster\)"):
        run_scan(model, [torch.randn(2, *SIZE)], method="filter-norm", sparsities=(0.25, 0.5),
                 budget=Budget(latency=1e-9), progress=False)


# ---------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("args, fragment", [
    (["--target-speedup", "1"], "--target-speedup 1: pass how many times faster"),
    (["--target-speedup", "-2"], "--target-speedup -2:"),
    (["--target-speedup", "nan"], "--target-speedup nan:"),
    (["--target-latency", "20"], "--target-latency '20': pass a time per forward with its unit, e.g. 20ms"),
    (["--target-latency", "fast"], "--target-latency 'fast':"),
    (["--target-latency", "0ms"], "--target-latency '0ms': pass a time above 0"),
    (["--target-speedup", "2", "--per-layer"], "drop --per-layer"),
    (["--target-speedup", "2", "--method", "fine-grained"], "need a channel method"),
])
def test_bad_time_budget_options_are_one_line_errors_before_any_work(runner, one_error_line, monkeypatch, args,
                                                                      fragment):
    import prunekit.models.zoo as zoo

    monkeypatch.setattr(zoo, "load_model", lambda *a, **k: pytest.fail("loaded a model first"))
    one_error_line(runner.invoke(cli, ["scan", "-q"] + args), fragment)


def test_an_unreachable_latency_is_a_one_line_error(runner, one_error_line):
    result = runner.invoke(cli, ["scan", "-q", "--method", "filter-norm", "--sparsities", "0.4,0.5",
                                 "--target-latency", "1us"])
    one_error_line(result, "out of reach", "ms per forward")


def test_help_explains_the_time_budget_options(runner):
    text = runner.invoke(cli, ["scan", "--help"]).output
    assert "--target-speedup X" in text and "--target-latency TIME" in text
    assert "20ms" in text and "--timing-batch N" in text and "cached" in text


def test_scan_to_a_speedup_from_the_command_line_records_what_it_measured(runner):
    result = runner.invoke(cli, ["scan", "--method", "filter-norm", "--sparsities", "0.25,0.5,0.75",
                                 "--target-speedup", "1.2", "--threads", "1", "--json"])
    assert result.exit_code == 0, result.stderr
    costs = json.loads(result.stdout)["budget"]
    assert costs["budget"] == {"speedup": 1.2}
    low, high = costs["speedup"]["interval"]
    assert low <= costs["speedup"]["ratio"] <= high and 0 <= costs["corrections"] <= CORRECTIONS
    assert costs["measured"]["seconds"] > 0 and costs["plan"]["seconds"] < costs["dense"]["seconds"]
    assert costs["timing"].startswith("1 thread(s), batch 1")
