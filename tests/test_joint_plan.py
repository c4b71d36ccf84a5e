"""fit_plan: a plan whose layers, pruned together, stay within the tolerance."""

import pytest
import torch
from torch import nn

import prunekit
from prunekit.sensitivity import OutputDistortion, SensitivityResult, evaluate_plan, fit_plan, scan


def _model():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 4, 3, padding=1),
    ).eval()


@pytest.fixture(scope="module")
def scanned():
    torch.manual_seed(0)
    model = _model()
    metric = OutputDistortion(torch.randn(2, 3, 12, 12))
    return model, metric, scan(model, metric, progress=False)


def test_joint_score_is_within_tolerance_and_measured(scanned):
    model, metric, result = scanned
    fit = fit_plan(model, metric, result, max_drop=0.3)
    assert fit.score <= 0.3
    assert evaluate_plan(model, metric, fit.plan) == pytest.approx(fit.score)
    assert any(level > 0 for level in fit.plan.values())


def test_joint_plan_never_exceeds_each_layers_own_level(scanned):
    model, metric, result = scanned
    per_layer = result.plan(0.3)
    fit = fit_plan(model, metric, result, max_drop=0.3)
    assert all(fit.plan[layer] <= per_layer[layer] for layer in per_layer)


def additive_loss(model):
    """A score that adds up over layers: each conv's share of zero weights costs 0.2, so 0.9 alone is
    within 0.25 and every layer at 0.9 together is not (whatever the seed)."""
    return sum(0.2 * float((conv.weight == 0).float().mean()) for conv in prunekit.conv_layers(model).values())


def test_joint_plan_repairs_a_per_layer_plan_that_fails_together():
    model = _model()
    metric = additive_loss
    result = scan(model, metric, sparsities=(0.5, 0.9), higher_is_better=False, progress=False)
    tolerance = 0.25
    assert result.plan(tolerance) == {layer: 0.9 for layer in result.layers}  # each layer alone: 0.18
    together = evaluate_plan(model, metric, result.plan(tolerance))
    assert together == pytest.approx(0.72, abs=0.01) and together > tolerance  # the losses add up
    fit = fit_plan(model, metric, result, max_drop=tolerance)
    assert fit.score <= tolerance < together
    kept = [trial for trial in fit.trials if trial[3]]
    assert len(kept) == sum(result.sparsities.index(level) + 1 for level in fit.plan.values() if level > 0)


def test_zero_tolerance_on_sensitive_model_gives_dense_plan():
    result = SensitivityResult("accuracy", True, 0.9, (0.5, 0.9), {"0": [0.5, 0.1]})
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.warns(UserWarning, match="the plan prunes nothing"):
        fit = fit_plan(model, lambda m: 0.0, result, max_drop=0.01)
    assert fit.plan == {"0": 0.0} and fit.score == 0.9 and fit.trials == []


def test_incomplete_scan_is_refused():
    result = SensitivityResult("accuracy", True, 0.9, (0.5,), {"0": [None]})
    with pytest.raises(ValueError, match="not complete"):
        fit_plan(nn.Sequential(nn.Conv2d(3, 4, 3)), lambda m: 0.0, result, max_drop=0.1)


def test_evaluate_plan_accepts_what_apply_plan_accepts(scanned):
    model, metric, _ = scanned
    plan = {"0": 1.0, "2": 0.5}
    pruned = prunekit.apply_plan(prunekit.copy_model(model), plan)
    assert evaluate_plan(model, metric, plan) == pytest.approx(metric(pruned))
    with pytest.raises(ValueError, match="outside"):
        evaluate_plan(model, metric, {"0": 1.5})
