"""Settling scans: points stop once their verdict is settled, and agree with the exact scan."""

import json
import random

import pytest
import torch
from click.testing import CliRunner

import prunekit
from prunekit.cli import cli
from prunekit.datasets import digits_test_set, make_loader
from prunekit.sensitivity import Accuracy, OutputDistortion, SensitivityResult, scan
from prunekit.sensitivity.settle import Settler, score_interval


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    model = prunekit.load_model("digits-vgg")
    inputs = [batch[0] for batch in make_loader(digits_test_set(), 4)]  # 90 batches
    random.Random(0).shuffle(inputs)
    return model, inputs


def test_looks_double_and_share_the_error_budget():
    settler = Settler(Accuracy([]), 0.9, True, 0.01, confidence=0.99, total_batches=100)
    assert settler.looks == [8, 16, 32, 64]
    assert settler.delta == pytest.approx(0.01 / 4)
    assert Settler(Accuracy([]), 0.9, True, 0.01, 0.99, total_batches=8).looks == []  # nothing to save
    with pytest.raises(ValueError, match="confidence=1.0 must be in"):
        Settler(Accuracy([]), 0.9, True, 0.01, confidence=1.0, total_batches=10)


def test_no_error_seen_still_leaves_room_for_errors():
    """A bootstrap of 16 perfect batches says [1, 1]; the Bernstein bound on 512 images does not."""
    low, high = score_interval(Accuracy([]), torch.tensor([[32.0, 32.0]] * 16), delta=0.0025)
    assert high == 1.0 and 0.95 < low < 0.99
    verdict = Settler(Accuracy([]), 1.0, True, max_drop=0.01, confidence=0.99, total_batches=64).verdict(
        torch.tensor([[32.0, 32.0]] * 16))
    assert verdict is None  # a 1 % tolerance cannot be confirmed from 512 images


def test_few_batches_widen_the_interval_like_students_t():
    per_batch = torch.tensor([[1.0 + 0.1 * k, 10.0] for k in range(8)], dtype=torch.float64)
    metric = OutputDistortion(torch.zeros(1, 1, 1, 1))
    narrow_low, narrow_high = score_interval(metric, per_batch.repeat(8, 1), delta=0.01)
    low, high = score_interval(metric, per_batch, delta=0.01)
    assert high - low > 2 * (narrow_high - narrow_low)  # 8 batches: wider than the same spread over 64


def test_settled_verdicts_agree_with_the_exact_scan_on_a_fraction_of_the_batches(digits):
    model, inputs = digits
    exact = scan(model, OutputDistortion(inputs), sparsities=(0.4, 0.6, 0.8), progress=False)
    settled = scan(model, OutputDistortion(inputs), sparsities=(0.4, 0.6, 0.8), progress=False,
                   confidence=0.99, max_drop=0.1)
    assert settled.num_estimated >= len(settled.layers) * 2
    used = 0
    for layer in exact.layers:
        for index in range(3):
            estimate = settled.estimate(layer, index)
            if estimate is None:
                used += len(inputs)
                assert settled.scores[layer][index] == exact.scores[layer][index]
                continue
            used += estimate["batches"]
            assert estimate["within"] == (exact.scores[layer][index] <= 0.1)
            assert estimate["low"] <= exact.scores[layer][index] <= estimate["high"]
    assert used < 0.25 * len(inputs) * len(exact.layers) * 3
    assert settled.plan(0.1) == exact.plan(0.1)
    assert "~ estimated" in settled.table(max_drop=0.1) and "~*" in settled.table(max_drop=0.1)
    again = SensitivityResult.from_json(settled.to_json())
    assert again.estimates == settled.estimates and again.num_estimated == settled.num_estimated


def test_settling_needs_a_tolerance_and_a_metric_with_batches(digits):
    model, inputs = digits
    with pytest.raises(ValueError, match="confidence needs max_drop"):
        scan(model, OutputDistortion(inputs[:2]), progress=False, confidence=0.99)
    with pytest.raises(ValueError, match="confidence needs a ForwardMetric"):
        scan(model, lambda m: 0.0, progress=False, confidence=0.99, max_drop=0.1)
    with pytest.raises(ValueError, match=r"confidence=1.5 must be in \[0.5, 1\)"):
        scan(model, OutputDistortion(inputs[:2]), progress=False, confidence=1.5, max_drop=0.1)

    class Stream(Accuracy):
        def num_batches(self):
            return None

    with pytest.raises(ValueError, match="how many batches Stream has"):
        scan(model, Stream([]), progress=False, confidence=0.99, max_drop=0.1)


def test_a_settling_scan_does_not_resume_an_exact_one(digits):
    model, inputs = digits
    metric = OutputDistortion(inputs[:16])
    partial = scan(model, metric, layers=["features.0", "features.2"], sparsities=(0.5,), progress=False)
    partial.scores["features.2"][0] = None
    with pytest.raises(ValueError, match="settling"):
        scan(model, metric, layers=["features.0", "features.2"], sparsities=(0.5,), progress=False,
             resume_from=partial, confidence=0.99, max_drop=0.1)


def test_the_cli_settles_points_with_confidence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["scan", "--batch-size", "8", "--metric", "distortion", "--confidence", "0.99",
                                      "--sparsities", "0.5,0.9", "--out", "s", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "~ estimated:" in result.output
    document = json.loads((tmp_path / "s" / "scan.json").read_text())
    assert document["meta"]["settle"] == {"confidence": 0.99, "max_drop": 0.05, "relative": False}
    assert any(point for values in document["estimates"].values() for point in values)
    bad = CliRunner().invoke(cli, ["scan", "--confidence", "1", "--out", "t"])
    assert bad.exit_code != 0 and "--confidence 1.0: pass a probability in [0.5, 1)" in bad.output


def test_a_settling_fit_keeps_a_plan_that_holds_on_every_batch(digits):
    from prunekit.planning import fit_plan
    from prunekit.sensitivity import evaluate_plan

    model, inputs = digits
    metric = OutputDistortion(inputs)
    result = scan(model, metric, sparsities=(0.4, 0.6), progress=False, confidence=0.99, max_drop=0.1)
    fit = fit_plan(model, metric, result, max_drop=0.1, confidence=0.99)
    assert any(fit.plan.values())
    assert fit.score == pytest.approx(evaluate_plan(model, metric, fit.plan), rel=1e-12)  # measured in full
    assert fit.score <= 0.1
    with pytest.raises(ValueError, match="confidence needs a ForwardMetric whose batches can be counted"):
        fit_plan(model, lambda m: 0.0, result, max_drop=0.1, confidence=0.99)


def test_a_settled_plan_evaluation_stops_early_and_restores_the_model(digits):
    from prunekit.sensitivity import evaluate_plan
    from prunekit.sensitivity.settle import Estimate

    model, inputs = digits
    metric = OutputDistortion(inputs)
    metric.prepare(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settler = Settler(metric, 0.0, False, max_drop=0.05, confidence=0.99, total_batches=len(inputs))
    estimate = evaluate_plan(model, metric, {"features.0": 0.9}, settler=settler)
    assert isinstance(estimate, Estimate) and not estimate.within and estimate.batches == 8
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model.training and not any(m._forward_hooks for m in model.modules())


class Skips(torch.nn.Module):
    """A cut with a value crossing it (a skip), and optionally an op that mixes the batch at the end."""

    def __init__(self, mix: bool):
        super().__init__()
        self.mix = mix
        self.a, self.b = torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.Conv2d(6, 6, 3, padding=1)
        self.head = torch.nn.Linear(6, 4)

    def forward(self, x):
        y = torch.relu(self.a(x))
        z = torch.relu(self.b(y)) + y
        pooled = torch.nn.functional.adaptive_avg_pool2d(z, 1).flatten(1)
        out = self.head(pooled)
        return out - out.mean(0, keepdim=True) if self.mix else out


@pytest.mark.parametrize("mix", [False, True], ids=["stacked", "batch-mixing-falls-back"])
def test_stacked_levels_score_like_levels_run_one_by_one(mix):
    torch.manual_seed(0)
    model = Skips(mix).eval()
    metric = OutputDistortion([torch.randn(3, 3, 8, 8) for _ in range(3)])
    one_by_one = scan(model, metric, sparsities=(0.3, 0.6, 0.9), progress=False)
    stacked = scan(model, metric, sparsities=(0.3, 0.6, 0.9), progress=False, stack_levels=True)
    for layer in one_by_one.layers:
        assert stacked.scores[layer] == pytest.approx(one_by_one.scores[layer], rel=1e-5, abs=1e-7)
    channel = scan(model, metric, sparsities=(0.5,), method="filter-norm", progress=False, stack_levels=True)
    assert channel.scores == scan(model, metric, sparsities=(0.5,), method="filter-norm", progress=False).scores


def test_stacking_runs_the_later_layers_once_for_all_levels():
    torch.manual_seed(0)
    model = Skips(False).eval()
    calls = []
    model.head.register_forward_hook(lambda *args: calls.append(args[1][0].shape[0]))
    metric = OutputDistortion([torch.randn(3, 3, 8, 8)])
    scan(model, metric, layers=["a"], sparsities=(0.3, 0.6, 0.9), progress=False, stack_levels=True)
    assert 9 in calls  # one head call on the three levels' 3 images stacked


class BigHead(torch.nn.Module):
    """A small conv stack and a large linear head: for a few images its weights outweigh the activations."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
        self.head = torch.nn.Linear(8 * 8 * 8, 1024)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))).flatten(1))


def _head_rows(model, metric, **options):
    rows = []
    handle = model.head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    try:
        result = scan(model, metric, sparsities=(0.3, 0.6, 0.9), progress=False, **options)
    finally:
        handle.remove()
    return result, rows


def test_by_default_levels_are_stacked_where_the_later_weights_outweigh_the_activations():
    torch.manual_seed(0)
    model = BigHead().eval()
    few = OutputDistortion([torch.randn(2, 3, 8, 8)])  # 2 MiB of head weights, kilobytes of activations
    auto, rows = _head_rows(model, few)
    bitwise, plain_rows = _head_rows(model, few, stack_levels=False)
    assert 6 in rows and 6 not in plain_rows  # the head ran once on the three levels' 2 images
    for layer in bitwise.layers:
        assert auto.scores[layer] == pytest.approx(bitwise.scores[layer], rel=1e-5, abs=1e-7)
    many = OutputDistortion([torch.randn(512, 3, 8, 8)])  # now the activations outweigh the head
    auto, rows = _head_rows(model, many)
    assert set(rows) == {512} and auto.scores == _head_rows(model, many, stack_levels=False)[0].scores  # bitwise
    assert 3 * 512 in _head_rows(model, many, stack_levels=True)[1]  # stacking everywhere still can


def test_the_traffic_estimate_counts_weights_used_few_times_and_the_values_computed():
    from prunekit.sensitivity.graph_cut import FEW_USES, GraphRunner, trace

    model = BigHead().eval()
    traced = trace(model)
    runner = GraphRunner(traced)
    head, b = traced.position("head"), traced.position("b")
    head_bytes = 4 * (8 * 8 * 8 * 1024 + 1024)
    few = runner.suffix_traffic(torch.randn(2, 3, 8, 8))
    assert few[head][0] == few[b][0] == head_bytes  # 2 rows: the head is bound by its reads; b's 128 positions are not
    assert few[head][1] == 4 * 2 * 1024 and few[b][1] > few[head][1]  # the values computed from there on
    many = runner.suffix_traffic(torch.randn(FEW_USES, 3, 8, 8))
    assert many[head][0] == 0 and many[b][1] == 32 * few[b][1]
    assert runner.suffix_traffic(torch.randn(2, 3, 8, 8)) is few  # memoised per shape


def test_the_default_stacks_vgg11_for_four_images_and_neither_digits_vgg_nor_hed():
    """What scan()'s docstring and README say "auto" does on the models they name (shapes only: random weights)."""
    import torchvision

    from prunekit.models.hed import HED
    from prunekit.sensitivity.graph_cut import GraphRunner, trace
    from prunekit.sensitivity.scanner import _stacking_pays

    digits_batch = next(iter(make_loader(digits_test_set(), 360)))[0]
    cases = [(torchvision.models.vgg11(), torch.empty(4, 3, 64, 64), True),
             (prunekit.load_model("digits-vgg"), digits_batch, False),
             (HED(), torch.empty(3, 3, 224, 224), False)]
    for model, inputs, stacks in cases:
        traced = trace(model.eval())
        runner = GraphRunner(traced)
        convs = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Conv2d)]
        assert [_stacking_pays(runner, traced.position(name), inputs) for name in convs] == [stacks] * len(convs)


def test_levels_run_one_by_one_where_shapes_cannot_be_propagated(monkeypatch):
    import torch.fx.passes.fake_tensor_prop as fake_tensor_prop

    def refuse(self, *args):
        raise RuntimeError("this model cannot run on fake tensors")

    monkeypatch.setattr(fake_tensor_prop.FakeTensorProp, "propagate", refuse)
    torch.manual_seed(0)
    model = BigHead().eval()
    metric = OutputDistortion([torch.randn(2, 3, 8, 8)])
    auto, rows = _head_rows(model, metric)
    assert set(rows) == {2} and auto.scores == _head_rows(model, metric, stack_levels=False)[0].scores
    with pytest.raises(ValueError, match="stack_levels='sometimes' is not one of 'auto', True, False"):
        scan(model, metric, progress=False, stack_levels="sometimes")


def test_an_interrupted_settling_scan_resumes_to_the_same_estimates(digits):
    model, inputs = digits
    metric = OutputDistortion(inputs)
    options = dict(layers=["features.0", "features.2"], sparsities=(0.4, 0.8), progress=False,
                   confidence=0.99, max_drop=0.1)
    full = scan(model, metric, **options)
    saved = []

    def stop_after_the_first_layer(result):
        saved.append(SensitivityResult.from_json(result.to_json()))
        if result.num_done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        scan(model, metric, on_point=stop_after_the_first_layer, **options)
    partial = saved[-1]
    assert partial.num_done == 2 and partial.estimates["features.0"] == full.estimates["features.0"]
    resumed = scan(model, metric, resume_from=partial, **options)
    assert resumed.scores == full.scores and resumed.estimates == full.estimates


def test_the_cli_stacks_levels_on_request(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    plain = runner.invoke(cli, ["scan", "--sparsities", "0.5,0.9", "--out", "a", "--quiet", "--per-layer",
                                "--stack-levels", "off"])
    stacked = runner.invoke(cli, ["scan", "--sparsities", "0.5,0.9", "--out", "b", "--quiet", "--per-layer",
                                  "--stack-levels"])
    assert plain.exit_code == 0 and stacked.exit_code == 0, stacked.output
    first, second = (SensitivityResult.from_json(tmp_path / name / "scan.json") for name in ("a", "b"))
    for layer in first.layers:
        assert second.scores[layer] == pytest.approx(first.scores[layer], abs=1e-9)


def test_students_t_over_normal_matches_scipy():
    stats = pytest.importorskip("scipy.stats", reason="scipy (the examples' extra) checks the expansion")
    from prunekit.sensitivity.settle import _student_over_normal

    for dof in (7, 15, 31, 63):
        for delta in (0.0025, 0.01, 0.05):
            exact = stats.t.ppf(1 - delta / 2, dof) / stats.norm.ppf(1 - delta / 2)
            assert _student_over_normal(dof, delta) == pytest.approx(exact, rel=5e-3)


def test_the_chernoff_bound_with_no_event_is_the_exact_binomial_one():
    from prunekit.sensitivity.settle import _chernoff_bounds

    low, high = _chernoff_bounds(0, 500, 0.001)
    assert low == 0.0 and high == pytest.approx(1 - 0.001 ** (1 / 500), rel=1e-9)
    low, high = _chernoff_bounds(50, 500, 0.001)
    assert 0.05 < low < 0.1 < high < 0.16


def test_paired_flips_bound_the_accuracy_drop_only_after_prepare():
    from prunekit.sensitivity.settle import paired_score_interval

    metric = Accuracy([(torch.eye(2), torch.tensor([0, 1]))] * 500)  # 1000 samples, the dense model right on all
    rows = torch.tensor([[2.0, 2.0, 0.0, 0.0]] * 250)  # half the samples seen, no answer changed
    assert paired_score_interval(metric, rows, 1.0, True, 0.01) is None  # no dense answers recorded yet
    metric.prepare(torch.nn.Identity())
    low, high = paired_score_interval(metric, rows, 1.0, True, 0.01)
    assert high == 1.0 and 0.99 < low  # no flip in 500: under 1 % of the 500 left, so under 0.5 % in all
    unpaired_low, _ = score_interval(metric, rows[:, :2], 0.01)
    assert unpaired_low < low  # the accuracy alone knows less: the dense answers are not used
    lost = rows.clone()
    lost[:5, 0], lost[:5, 2] = 0.0, 2.0  # 10 samples lost in the first 5 batches
    low, high = paired_score_interval(metric, lost, 1.0, True, 0.01)
    assert low < 0.98 < high <= 0.99  # 10 of 1000 lost for sure; the 500 left bounded


def test_a_settling_accuracy_scan_stops_points_that_change_few_answers_with_the_exact_verdicts():
    """Accuracy within a 2 % tolerance: the paired flips settle it early, the accuracy alone could not."""
    model = prunekit.load_model("digits-vgg")
    loader = list(make_loader(digits_test_set(), 8))  # 45 batches
    random.Random(0).shuffle(loader)
    options = dict(layers=["features.7", "classifier.3"], sparsities=(0.4, 0.95), progress=False)
    exact = scan(model, Accuracy(loader), **options)
    settled = scan(model, Accuracy(loader), confidence=0.99, max_drop=0.02, **options)
    early_within = 0
    for layer in exact.layers:
        for index in range(2):
            estimate = settled.estimate(layer, index)
            truth = exact.scores[layer][index]
            if estimate is None:
                assert settled.scores[layer][index] == truth
                continue
            assert estimate["within"] == (exact.baseline - truth <= 0.02)
            assert estimate["low"] <= truth <= estimate["high"]
            early_within += estimate["within"] and estimate["batches"] < 45
    assert early_within >= 1
    assert settled.plan(0.02) == exact.plan(0.02)
