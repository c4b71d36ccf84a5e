"""Plans fitted to a budget: costs counted on what compact builds, the budget met, bad budgets refused."""

import json
import math
import random

import pytest
import torch
from torch import nn

import prunekit
from prunekit.cli import cli
from prunekit.planning import Budget, BudgetError, BudgetFit, fit_plan, plan_costs, run_scan
from prunekit.planning.budget import fit_budget
from prunekit.planning.costs import measured_costs
from prunekit.methods.registry import get_method
from prunekit.sensitivity import OutputDistortion, SensitivityResult, scan
from prunekit.testing import randomize_batchnorms


class Residual(nn.Module):
    """A residual stream (through a grouped conv), BatchNorms, a depthwise conv and its gate, a cat, a Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.depthwise = nn.Sequential(nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.BatchNorm2d(24), nn.ReLU())
        self.squeeze, self.excite = nn.Conv2d(24, 8, 1), nn.Conv2d(8, 24, 1)
        self.b = nn.Conv2d(24, 16, 1)
        self.side = nn.Sequential(nn.Conv2d(16, 12, 3, padding=1, stride=2), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, stride=2, groups=4), nn.ReLU())
        self.fc = nn.Linear(28, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.depthwise(self.a(x))
        gate = torch.sigmoid(self.excite(torch.relu(self.squeeze(y.mean((2, 3), keepdim=True)))))
        x = torch.relu(x + self.b(y * gate))
        joined = torch.cat([self.side(x), self.grouped(x)], dim=1)
        return self.fc(joined.mean((2, 3)))


SIZE = (3, 12, 12)


def _model():
    torch.manual_seed(0)
    return randomize_batchnorms(Residual()).eval()


def _convs(model):
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def _compacted_cost(model, plan, method):
    pruned = prunekit.apply_plan(prunekit.copy_model(model), plan, method=method)
    return measured_costs(prunekit.compact(pruned, torch.randn(1, *SIZE)), SIZE)


def test_channel_costs_are_those_of_the_compacted_model_for_any_plan():
    model = _model()
    method = get_method("filter-norm")
    blocks = method.blocks(model, _convs(model))
    keys = [k for k, block in blocks.items() if method.max_sparsity(block) > 0]
    # a residual stream joined by a grouped conv (units of 4 channels), a depthwise conv and its gate, a cat
    assert set(keys) == {"stem.0", "a.0", "squeeze", "side.0"}
    assert method.block_layers(blocks["stem.0"]) == ["stem.0", "b", "grouped.0"] and len(blocks["stem.0"].units) == 4
    costs = plan_costs(model, method, keys, SIZE)
    assert costs.dense == measured_costs(model, SIZE)
    rng = random.Random(0)
    for _ in range(6):
        plan = {key: rng.choice([0.0, 0.25, 0.5, 0.75]) for key in keys}
        plan = {key: min(level, method.max_sparsity(blocks[key])) for key, level in plan.items()}
        assert costs.of(plan) == _compacted_cost(model, plan, method), plan


def test_a_linear_after_a_flatten_loses_a_block_of_features_per_channel():
    torch.manual_seed(0)
    model = randomize_batchnorms(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 10), nn.ReLU(), nn.Linear(10, 3),
    )).eval()
    method = get_method("filter-norm")
    costs = plan_costs(model, method, ["0", "4"], SIZE)
    for plan in ({"4": 0.5}, {"0": 0.25, "4": 0.5}):
        pruned = prunekit.apply_plan(prunekit.copy_model(model), plan, method=method)
        small = prunekit.compact(pruned, torch.randn(1, *SIZE))
        assert costs.of(plan) == measured_costs(small, SIZE), plan
    assert small[7].in_features == 3 * 36


def test_a_tally_counts_what_a_full_count_counts():
    model = _model()
    method = get_method("filter-norm")
    keys = list(method.blocks(model, _convs(model)))
    costs = plan_costs(model, method, keys, SIZE)
    tally = costs.tally({})
    rng = random.Random(1)
    for _ in range(20):
        key, level = rng.choice(keys), rng.choice([0.0, 0.25, 0.5])
        level = min(level, method.max_sparsity(method.blocks(model, [key])[key]))
        assert tally.trial(key, level) == costs.of(dict(tally.plan, **{key: level}))
        tally.set(key, level)
        assert tally.cost == costs.of(tally.plan)


def test_a_unit_compact_keeps_costs_nothing_off_the_budget():
    # The head's outputs reach the model's output: masked, compact keeps them.
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    method = get_method("filter-norm")
    costs = plan_costs(model, method, ["0", "2"], (3, 10, 10))
    assert costs.of({"2": 0.5}) == costs.dense
    assert costs.of({"0": 0.5}).macs < costs.dense.macs


@pytest.fixture(scope="module")
def scanned():
    model = _model()
    metric = OutputDistortion(torch.randn(4, *SIZE))
    result = scan(model, metric, method="filter-norm", sparsities=(0.25, 0.5, 0.75), progress=False)
    return model, metric, result


@pytest.mark.parametrize("budget", [Budget(macs=0.5), Budget(params=0.6), Budget(macs=0.7, params=0.7)])
def test_the_plan_meets_the_budget_within_two_percent_as_compacted(scanned, budget):
    model, metric, result = scanned
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit = fit_budget(model, metric, result, budget, method="filter-norm")
    assert isinstance(fit, BudgetFit) and fit.measured == fit.cost == _compacted_cost(model, fit.plan, "filter-norm")
    params, macs = fit.measured.fraction_of(fit.dense)
    for kind, target in budget.targets().items():
        value = {"macs": macs, "params": params}[kind]
        assert value <= target + 1e-9
    # the last step was narrowed to whole units: one unit fewer in some layer breaks the budget
    method = get_method("filter-norm")
    blocks = method.blocks(model, list(fit.plan))
    costs = plan_costs(model, method, list(fit.plan), SIZE)
    assert any(budget.excess(costs.of(dict(fit.plan, **{key: level - 1 / len(blocks[key].units)})), fit.dense) > 0
               for key, level in fit.plan.items())
    assert fit.score == pytest.approx(prunekit.evaluate_plan(model, metric, fit.plan, method="filter-norm"))
    assert fit.drop == pytest.approx(fit.score - result.baseline)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is left as it was
    assert not any(hasattr(m, "weight_orig") for m in model.modules())
    assert "MACs" in fit.summary() and "score drop" in fit.summary()


def test_the_budget_goes_where_the_scan_says_pruning_hurts_least():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    method = get_method("filter-norm")
    levels = (0.25, 0.5, 0.75)
    # Both middle convs cost the same MACs; "2" is fragile, "4" is not.
    scores = {"0": [0.5, 0.6, 0.7], "2": [0.3, 0.6, 0.9], "4": [0.01, 0.02, 0.03]}
    result = SensitivityResult("distortion", False, 0.0, levels, scores, method="filter-norm")
    metric = OutputDistortion(torch.randn(2, 3, 8, 8))
    fit = fit_budget(model, metric, result, Budget(macs=0.75), method=method, input_size=(3, 8, 8), compare=False)
    assert fit.plan.get("4", 0) > fit.plan.get("2", 0)
    assert fit.predicted_drop < 0.1 and (fit.shape, fit.candidates) == ("walk", 1)


def test_the_walk_is_compared_with_one_level_for_every_layer_and_the_best_joint_score_is_kept(scanned, monkeypatch):
    import prunekit.planning.budget as budget_module

    model, metric, result = scanned
    scored = []
    original = budget_module.evaluate_plan

    def recording(model_, metric_, plan, **kwargs):
        score = original(model_, metric_, plan, **kwargs)
        scored.append((dict(plan), float(score)))
        return score

    monkeypatch.setattr(budget_module, "evaluate_plan", recording)
    budget = Budget(macs=0.4)
    fit = fit_budget(model, metric, result, budget, method="filter-norm")
    walk_only = fit_budget(model, metric, result, budget, method="filter-norm", compare=False)
    assert fit.candidates == len(scored) - 1 >= 2  # the candidates, then the walk alone
    assert fit.score == min(score for _, score in scored[:-1])  # distortion: lower is better
    assert fit.score <= walk_only.score and walk_only.plan == scored[-1][0]
    assert fit.shape in ("walk", "uniform", "walk + uniform")
    costs = plan_costs(model, get_method("filter-norm"), result.layers, SIZE)
    units = {key: len(block.units) for key, block in costs.blocks.items()}
    ceilings = {key: get_method("filter-norm").max_sparsity(block) for key, block in costs.blocks.items()}

    def one_level(plan):  # every layer at one level, up to rounding to whole units and each layer's ceiling
        return len(plan) == len(result.layers) and any(
            all(abs(plan[key] - min(level, ceilings[key])) <= 0.5 / units[key] + 1e-6 for key in plan)
            for level in plan.values())

    uniform = [plan for plan, _ in scored[:-1] if one_level(plan)]
    assert uniform, "one level for every layer is among the candidates"
    for plan, _ in scored[:-1]:
        assert budget.excess(costs.of(plan), costs.dense) == 0  # every candidate meets the budget


def _mask_fingerprint(model):
    return tuple(int(m.weight_mask.sum()) for m in model.modules() if hasattr(m, "weight_mask"))


def test_with_recover_the_candidates_compete_after_recovery_on_copies(scanned):
    model, metric, result = scanned
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    plain = fit_budget(model, metric, result, Budget(macs=0.4), method="filter-norm",
                       recover=lambda pruned: seen.append(_mask_fingerprint(pruned)))
    assert plain.recovered and "pruned and recovered" in plain.summary()
    assert len(seen) == len(set(seen)) == plain.candidates >= 2  # each candidate recovered once, on its own copy
    chosen = _mask_fingerprint(prunekit.apply_plan(prunekit.copy_model(model), plain.plan, method="filter-norm"))
    assert chosen in seen
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(hasattr(m, "weight_orig") for m in model.modules())
    # A recovery that repairs another candidate best makes that one the plan.
    other = next(fingerprint for fingerprint in seen if fingerprint != chosen)

    def repairs_other(pruned):
        pruned.bonus = -1e3 if _mask_fingerprint(pruned) == other else 0.0

    def scored(pruned):
        return float(metric(pruned)) + getattr(pruned, "bonus", 0.0)

    fit = fit_budget(model, scored, result, Budget(macs=0.4), method="filter-norm", input_size=SIZE,
                     recover=repairs_other)
    assert _mask_fingerprint(prunekit.apply_plan(prunekit.copy_model(model), fit.plan, method="filter-norm")) == other
    assert fit.score < -900  # the recovered score is the one reported
    assert not fit_budget(model, metric, result, Budget(macs=0.4), method="filter-norm").recovered


def test_a_budget_beyond_max_drop_is_refused_saying_by_how_much(scanned):
    model, metric, result = scanned
    with pytest.raises(BudgetError, match=r"drops the score by [\d.e-]+ with every layer pruned, beyond max_drop=1e-06"):
        fit_budget(model, metric, result, Budget(macs=0.5), method="filter-norm", max_drop=1e-6)


def test_a_budget_no_scanned_plan_reaches_is_refused(scanned):
    model, metric, result = scanned
    with pytest.raises(BudgetError, match=r"out of reach: with every layer at its highest scanned level the plan keeps 0\.\d+ of the MACs"):
        fit_budget(model, metric, result, Budget(macs=0.01), method="filter-norm")


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, float("nan"), float("inf"), True, "0.5"])
def test_bad_budget_fractions_are_refused_naming_the_value(bad):
    with pytest.raises(ValueError, match=rf"macs={bad!r} is not a fraction of the dense model's MACs in \(0, 1\]"):
        Budget(macs=bad)
    with pytest.raises(ValueError, match="params="):
        Budget(params=bad)


def test_a_budget_names_at_least_one_limit():
    with pytest.raises(ValueError, match="needs macs, params .* speedup or latency"):
        Budget()
    assert str(Budget(macs=0.5, params=1)) == "MACs <= 0.5 of dense, parameters <= 1 of dense"


def test_fit_plan_takes_a_budget_and_needs_one_or_a_tolerance(scanned):
    model, metric, result = scanned
    fit = fit_plan(model, metric, result, budget=Budget(macs=0.6), method="filter-norm")
    assert isinstance(fit, BudgetFit) and fit.measured.macs <= 0.6 * fit.dense.macs
    with pytest.raises(TypeError, match="max_drop .* or budget"):
        fit_plan(model, metric, result)


def test_a_fine_grained_budget_counts_non_zero_weights_and_says_so():
    model = _model()
    metric = OutputDistortion(torch.randn(2, *SIZE))
    result = scan(model, metric, sparsities=(0.5, 0.9), progress=False)
    fit = fit_budget(model, metric, result, Budget(params=0.5))
    assert not fit.dense_hardware and "only hardware that skips zeros" in fit.summary()
    pruned = prunekit.apply_plan(prunekit.copy_model(model), fit.plan)
    zeros = sum(int((m.weight == 0).sum()) for m in pruned.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert fit.measured.params == fit.dense.params - zeros
    assert 0.48 <= fit.measured.params / fit.dense.params <= 0.5


def test_run_scan_refuses_an_unreachable_budget_before_scanning(monkeypatch):
    import prunekit.sensitivity as sensitivity

    monkeypatch.setattr(sensitivity, "scan", lambda *a, **k: pytest.fail("scanned first"))
    with pytest.raises(BudgetError, match="with every layer at its highest level the plan keeps"):
        run_scan(_model(), [torch.randn(2, *SIZE)], method="filter-norm", sparsities=(0.25, 0.5),
                 budget=Budget(macs=0.05), progress=False)


def test_run_scan_with_a_budget_records_its_costs(tmp_path):
    from prunekit.sensitivity.folder import ScanFolder

    run = run_scan(_model(), [torch.randn(2, *SIZE)], method="filter-norm", sparsities=(0.25, 0.5, 0.75),
                   budget=Budget(macs=0.6), progress=False)
    costs = run.costs()
    assert costs["budget"] == {"macs": 0.6} and costs["measured"]["macs"] <= 0.6 * costs["dense"]["macs"]
    assert run.plan == run.fit.plan and run.score == run.fit.score
    run.write(ScanFolder(tmp_path), {"model": "mine"})
    assert json.loads((tmp_path / "plan.json").read_text())["budget"]["measured"] == costs["measured"]


# ---------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("args, fragment", [
    (["--target-macs", "0"], "--target-macs 0: pass the fraction of the dense model's MACs to keep, in (0, 1]"),
    (["--target-macs", "-1"], "--target-macs -1:"),
    (["--target-params", "1.5"], "--target-params 1.5: pass the fraction of the dense model's parameters"),
    (["--target-macs", "nan"], "--target-macs nan:"),
    (["--target-macs", "0.5", "--per-layer"], "drop --per-layer"),
])
def test_bad_budget_options_are_one_line_errors_before_any_work(runner, one_error_line, monkeypatch, args, fragment):
    import prunekit.models.zoo as zoo

    monkeypatch.setattr(zoo, "load_model", lambda *a, **k: pytest.fail("loaded a model first"))
    one_error_line(runner.invoke(cli, ["scan", "-q"] + args), fragment)


def test_an_unreachable_budget_is_a_one_line_error(runner, one_error_line):
    result = runner.invoke(cli, ["scan", "-q", "--sparsities", "0.4,0.5", "--target-macs", "0.05"])
    one_error_line(result, "out of reach", "--sparsities")


def test_help_explains_every_budget_option(runner):
    text = runner.invoke(cli, ["scan", "--help"]).output
    assert "--target-macs FRACTION" in text and "--target-params FRACTION" in text
    assert "compact" in text and "half" in text


def test_scan_to_a_macs_budget_from_the_command_line(runner):
    result = runner.invoke(cli, ["scan", "--method", "filter-norm", "--sparsities", "0.25,0.5,0.75",
                                 "--target-macs", "0.5", "--json"])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    costs = document["budget"]
    assert costs["budget"] == {"macs": 0.5}
    fraction = costs["measured"]["macs"] / costs["dense"]["macs"]
    assert 0.48 <= fraction <= 0.5
    text = runner.invoke(cli, ["scan", "--method", "filter-norm", "--sparsities", "0.25,0.5,0.75",
                               "--target-macs", "0.5", "--resume", "-q"]).output
    assert "plan fitted to the budget (MACs <= 0.5 of dense)" in text
    assert "plan, measured on the compacted model" in text
    assert math.isclose(float(text.split("plan, measured on the compacted model: ")[1].split("(")[1].split(")")[0]),
                        fraction, abs_tol=1e-3)


def test_the_readme_budget_recipe_with_activation_statistics():
    model = _model()
    batches = [torch.randn(4, *SIZE)]
    metric = OutputDistortion(batches)
    channel = get_method("channel").prepare(model, batches)
    result = scan(model, metric, method=channel, sparsities=(0.25, 0.5, 0.75), progress=False)
    fit = fit_plan(model, metric, result, budget=Budget(macs=0.5), method=channel)
    small = prunekit.compact(prunekit.apply_plan(prunekit.copy_model(model), fit.plan, method=channel),
                             torch.randn(1, *SIZE))
    assert measured_costs(small, SIZE) == fit.measured and fit.measured.macs <= 0.5 * fit.dense.macs


def test_the_readmes_budget_block_runs_as_written():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "Budget(macs=0.5)" in b]
    model = _model()
    images = [torch.randn(4, *SIZE)]
    namespace = {"prunekit": prunekit, "model": model, "images": images, "metric": OutputDistortion(images)}
    exec(block, namespace)
    fit, small = namespace["fit"], namespace["small"]
    assert isinstance(fit, BudgetFit) and measured_costs(small, SIZE) == fit.measured
    assert fit.measured.macs <= 0.5 * fit.dense.macs
