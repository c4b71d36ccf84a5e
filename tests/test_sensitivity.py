"""The sensitivity scanner: exact restore, scores as apply_plan would give, prefix cache, resume, results."""

import json
import math

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import prune

import prunekit
from prunekit.layers import prunable_layers
from prunekit.methods.fine_grained import FineGrainedL1
from prunekit.methods.registry import METHODS, get_method
from prunekit.sensitivity import (
    Accuracy,
    OutputDistortion,
    SensitivityResult,
    check_sparsities,
    scan,
    select_sparsity,
)
from prunekit.sensitivity.graph_cut import trace
from prunekit.sensitivity.masks import Masker
from prunekit.sensitivity.scanner import SuffixFallbackWarning
from prunekit.testing import randomize_batchnorms

LEVELS = (0.3, 0.6, 0.9)


def small_vgg(batchnorm: bool = False) -> nn.Sequential:
    """Two conv blocks and a classifier, nested like torchvision's VGG."""

    def block(cin: int, cout: int) -> list:
        layers = [nn.Conv2d(cin, cout, 3, padding=1)]
        if batchnorm:
            layers.append(nn.BatchNorm2d(cout))
        return layers + [nn.ReLU(inplace=True)]

    features = nn.Sequential(*block(3, 8), nn.MaxPool2d(2), *block(8, 8), *block(8, 16), nn.MaxPool2d(2))
    return nn.Sequential(
        features, nn.Sequential(nn.Flatten(), nn.Linear(16 * 2 * 2, 5))
    )


def tiny_torchvision_vgg() -> nn.Module:
    """torchvision's VGG class with small features and head: its 4096-wide classifier is built on the meta
    device (no memory, no init: it is replaced at once), which took seconds before."""
    cfg = [8, "M", 8, 16, "M"]
    features = torchvision.models.vgg.make_layers(cfg, batch_norm=True)
    with torch.device("meta"):
        model = torchvision.models.vgg.VGG(nn.Sequential(), num_classes=4, init_weights=False)
    model.features = features
    model.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    model.classifier = nn.Sequential(nn.Linear(16, 12), nn.ReLU(inplace=True), nn.Dropout(), nn.Linear(12, 4))
    assert not any(p.is_meta for p in model.parameters())
    return model.eval()


def snapshot(model: nn.Module) -> dict:
    return {
        "params": [(name, id(p), p.detach().clone()) for name, p in model.named_parameters()],
        "buffers": [(name, b.detach().clone()) for name, b in model.named_buffers()],
        "training": [(name, m.training) for name, m in model.named_modules()],
        "attrs": [(name, sorted(vars(m))) for name, m in model.named_modules()],
        "hooks": [
            (name, len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()
        ],
        "grads": [(name, p.grad) for name, p in model.named_parameters()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert [(n, i) for n, i, _ in after["params"]] == [(n, i) for n, i, _ in before["params"]]
    for (_, _, a), (_, _, b) in zip(after["params"], before["params"]):
        assert torch.equal(a, b)
    assert [n for n, _ in after["buffers"]] == [n for n, _ in before["buffers"]]
    for (_, a), (_, b) in zip(after["buffers"], before["buffers"]):
        assert torch.equal(a, b)
    assert after["training"] == before["training"]
    assert after["attrs"] == before["attrs"]
    assert after["hooks"] == before["hooks"]
    assert all(a is b for (_, a), (_, b) in zip(after["grads"], before["grads"]))
    assert not any(name.endswith(("_orig", "_mask")) for name, _ in model.state_dict().items())


def channel_stats(model: nn.Module) -> dict:
    return {name: torch.rand(conv.out_channels) for name, conv in prunekit.conv_layers(model).items()}


def labelled_batches(n_batches: int = 2) -> list:
    return [(torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))) for _ in range(n_batches)]


# ---------------------------------------------------------------------------
# Exact restore


@pytest.mark.parametrize("method", ["fine-grained", "channel"])
def test_scan_returns_model_bitwise_unchanged(method):
    model = randomize_batchnorms(small_vgg(batchnorm=True)).train()
    model[0][1].eval()  # mixed flags must come back as they were
    before = snapshot(model)
    stats = channel_stats(model) if method == "channel" else None
    scan(model, OutputDistortion(torch.randn(4, 3, 8, 8)), sparsities=LEVELS, method=method, stats=stats, progress=False)
    assert_unchanged(model, before)


@pytest.mark.parametrize("exception", [RuntimeError, KeyboardInterrupt])
def test_model_restored_when_evaluate_raises(exception):
    model = randomize_batchnorms(small_vgg(batchnorm=True))
    before = snapshot(model)
    calls = []

    def evaluate(m):
        calls.append(1)
        if len(calls) == 3:  # baseline, one point, then fail in the middle of the second point
            raise exception("stop")
        return float(m(torch.ones(1, 3, 8, 8)).sum().detach())

    with pytest.raises(exception):
        scan(model, evaluate, sparsities=LEVELS, progress=False)
    assert_unchanged(model, before)


def test_model_restored_when_evaluate_trains_the_model():
    model = randomize_batchnorms(small_vgg(batchnorm=True))
    before = snapshot(model)
    seen = []

    def evaluate(m):
        seen.append(float(m[0][1].running_mean.sum()))
        m.train()
        m(torch.randn(4, 3, 8, 8))  # updates BatchNorm running statistics
        return 0.0

    scan(model, evaluate, layers=["0.0", "0.4"], sparsities=LEVELS, progress=False)
    assert len(set(seen)) == 1  # every point saw the dense statistics
    assert_unchanged(model, before)


def test_evaluate_sees_one_layer_pruned_at_the_planned_sparsity():
    model = small_vgg()
    seen = []

    def evaluate(m):
        layers = prunable_layers(m, (nn.Conv2d, nn.Linear))
        seen.append({name: float((layer.weight == 0).float().mean()) for name, layer in layers.items()})
        assert m.training is False
        return 1.0

    result = scan(model, evaluate, sparsities=(0.5, 0.75), progress=False)
    assert result.layers == ["0.0", "0.3", "0.5", "1.1"]  # fine-grained scans the classifier's Linear too
    assert len(seen) == 1 + 4 * 2
    assert all(v == 0.0 for v in seen[0].values())
    pruned = [{k: v for k, v in point.items() if v > 0} for point in seen[1:]]
    expected = [{layer: level} for layer in result.layers for level in (0.5, 0.75)]
    for got, want in zip(pruned, expected):
        (layer, level), = want.items()
        assert list(got) == [layer] and got[layer] == pytest.approx(level, abs=0.01)


# ---------------------------------------------------------------------------
# Scores agree with apply_plan and with full forwards


@pytest.mark.parametrize("method", METHODS)
def test_scores_equal_apply_plan(method):
    model = randomize_batchnorms(small_vgg(batchnorm=True)).eval()
    metric = OutputDistortion(torch.randn(4, 3, 8, 8))
    pruning = get_method(method).prepare(model, [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))])
    levels = pruning.levels or LEVELS  # a fixed pattern (2:4) has its own
    result = scan(model, metric, sparsities=levels, method=pruning, progress=False)
    assert result.method == method and result.layers
    metric.prepare(model)
    for layer in result.layers:
        for level in levels:
            pruned = prunekit.apply_plan(prunekit.copy_model(model), {layer: level}, method=pruning)
            assert metric(pruned) == result.score(layer, level)


def test_fine_grained_masks_equal_compute_mask_with_ties():
    model = nn.Sequential(nn.Conv2d(4, 6, 3))
    conv = model[0]
    with torch.no_grad():
        conv.weight.copy_(torch.randint(-3, 4, conv.weight.shape).float())  # many equal magnitudes
    masker = Masker(get_method("fine-grained").blocks(model, ["0"]), get_method("fine-grained"), None)
    for level in (0.0, 0.25, 0.5, 0.9):
        (masked,) = masker.masked("0", [(conv, "weight")], level)
        count = round(level * conv.weight.numel())
        mask = FineGrainedL1(amount=count).compute_mask(conv.weight, torch.ones_like(conv.weight))
        assert torch.equal(masked, conv.weight.detach() * mask)


@pytest.mark.parametrize("build", [small_vgg, tiny_torchvision_vgg], ids=["nested-sequential", "torchvision-vgg"])
@pytest.mark.parametrize("which", ["distortion", "feature-distortion", "accuracy"])
def test_prefix_cache_scores_equal_full_forwards(build, which):
    model = randomize_batchnorms(build()).eval()
    assert trace(model) is not None
    if which == "distortion":
        metric = OutputDistortion([torch.randn(3, 3, 8, 8), torch.randn(2, 3, 8, 8)])
    elif which == "feature-distortion":
        convs = list(prunekit.conv_layers(model))
        metric = OutputDistortion(torch.randn(3, 3, 8, 8), layers=[convs[0], convs[2]])
    else:
        metric = Accuracy(labelled_batches())

    def full(m):  # the same metric, but opaque to the scanner: full forwards only
        return metric(m)

    cached = scan(model, metric, sparsities=LEVELS, progress=False, stack_levels=False)  # bitwise mode
    naive = scan(model, full, sparsities=LEVELS, progress=False)
    assert cached.baseline == naive.baseline
    assert cached.scores == naive.scores


def test_prefix_cache_runs_fewer_layers():
    model = small_vgg()
    calls = {name: 0 for name in prunekit.conv_layers(model)}
    for name, conv in prunekit.conv_layers(model).items():
        conv.register_forward_hook(lambda *args, name=name: calls.__setitem__(name, calls[name] + 1))
    # A hook on a leaf keeps the chain usable (the step still runs through __call__).
    scan(model, OutputDistortion(torch.randn(2, 3, 8, 8)), layers=list(calls), sparsities=LEVELS, progress=False,
         stack_levels=False)  # levels one by one: each runs the suffix once
    # prepare + baseline run everything; a conv then runs for the points of its own and earlier
    # layers, plus once to advance the cached input past it. A naive scan: 2 + 9 each.
    assert calls["0.0"] == 2 + len(LEVELS) + 1
    assert calls["0.3"] == 2 + 2 * len(LEVELS) + 1
    assert calls["0.5"] == 2 + 3 * len(LEVELS)


def test_streaming_without_a_cache_scores_like_the_cache():
    model = small_vgg()
    metric = OutputDistortion(torch.randn(2, 3, 8, 8))
    # Bitwise mode: stacked levels (the default where it pays) also need room in cache_limit.
    cached = scan(model, metric, sparsities=LEVELS, progress=False, stack_levels=False)
    limited = scan(model, metric, sparsities=LEVELS, progress=False, cache_limit=0, stack_levels=False)
    assert cached.scores == limited.scores


# ---------------------------------------------------------------------------
# Resume


def test_resume_skips_finished_points_and_matches_a_full_scan():
    model = small_vgg()
    metric = OutputDistortion(torch.randn(2, 3, 8, 8))
    # Bitwise mode: a plain callable (full forwards) resumes it to the very same scores.
    full = scan(model, metric, sparsities=LEVELS, progress=False, stack_levels=False)

    saved = []

    def stop_after_the_first_layer(result):
        saved.append(SensitivityResult.from_json(result.to_json()))
        if result.num_done == len(LEVELS):  # a ForwardMetric's points arrive a layer at a time
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        scan(model, metric, sparsities=LEVELS, progress=False, on_point=stop_after_the_first_layer, stack_levels=False)
    partial = saved[-1]
    assert not partial.complete and partial.num_done == len(LEVELS)

    # A partial layer (a file from a plain-callable scan, say) resumes too.
    partial.scores["0.3"][0] = full.scores["0.3"][0]
    calls = []

    def counting(m):
        calls.append(1)
        return metric(m)

    counting.name, counting.higher_is_better = metric.name, metric.higher_is_better
    resumed = scan(model, counting, sparsities=LEVELS, progress=False, resume_from=partial)
    assert len(calls) == 1 + (len(full.layers) * len(LEVELS) - len(LEVELS) - 1)  # baseline check + the missing points only
    assert resumed.complete and resumed.scores == full.scores
    streamed = scan(model, metric, sparsities=LEVELS, progress=False, resume_from=partial, stack_levels=False)
    assert streamed.scores == full.scores


def test_a_resumed_scan_with_stacked_levels_scores_as_an_unbroken_one(monkeypatch):
    """Which layers stack depends on the batch's shapes alone, and a stacked batch always scores as stacked
    (the check against one-by-one levels only turns stacking off), so a resume changes no score."""
    from prunekit.sensitivity.graph_cut import GraphRunner

    stacked = GraphRunner.finish_stacked

    def rounded_otherwise(self, *args, **kwargs):  # stacking changes scores at float rounding: make sure it does
        results = stacked(self, *args, **kwargs)
        return None if results is None else [(output * (1 + 1e-6), {k: v * (1 + 1e-6) for k, v in captured.items()})
                                             for output, captured in results]

    monkeypatch.setattr(GraphRunner, "finish_stacked", rounded_otherwise)
    model = BigHeadVgg().eval()
    metric = OutputDistortion([torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)])
    rows = []
    handle = model.head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    unbroken = scan(model, metric, sparsities=LEVELS, progress=False)
    handle.remove()
    assert 2 * len(LEVELS) in rows  # the levels ran through the head stacked
    saved = []

    def stop_after_the_second_layer(result):
        saved.append(SensitivityResult.from_json(result.to_json()))
        if result.num_done == 2 * len(LEVELS):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        scan(model, metric, sparsities=LEVELS, progress=False, on_point=stop_after_the_second_layer)
    resumed = scan(model, metric, sparsities=LEVELS, progress=False, resume_from=saved[-1])
    assert resumed.scores == unbroken.scores


class BigHeadVgg(nn.Module):
    """Three convs and a linear head large next to two images' activations: the default stacks levels."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                      nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8 * 8 * 8, 512)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def test_resume_refuses_other_options():
    model = small_vgg()
    metric = OutputDistortion(torch.randn(2, 3, 8, 8))
    partial = scan(model, metric, sparsities=LEVELS, layers=["0.0"], progress=False)
    with pytest.raises(ValueError, match="sparsities"):
        scan(model, metric, sparsities=(0.5,), layers=["0.0"], progress=False, resume_from=partial)
    with pytest.raises(ValueError, match="layers"):
        scan(model, metric, sparsities=LEVELS, progress=False, resume_from=partial)


def test_resume_refuses_a_changed_model():
    model = small_vgg()
    data = labelled_batches()
    partial = scan(model, Accuracy(data), sparsities=LEVELS, layers=["0.0"], progress=False)
    partial.baseline = partial.baseline + 0.25
    with pytest.raises(ValueError, match="changed"):
        scan(model, Accuracy(data), sparsities=LEVELS, layers=["0.0"], progress=False, resume_from=partial)


# ---------------------------------------------------------------------------
# Input checks


def test_unknown_layer_lists_valid_ones():
    with pytest.raises(KeyError, match="Conv2d or Linear layers are: 0.0, 0.3, 0.5, 1.1"):
        scan(small_vgg(), lambda m: 0.0, layers=["0.9"], progress=False)


@pytest.mark.parametrize(
    "levels, message",
    [((), "empty"), ((0.5, 1.0), "outside"), ((-0.1,), "outside"), ((0.5, 0.5), "twice"), ((0.6, 0.5), "order")],
)
def test_bad_sparsities_are_refused(levels, message):
    with pytest.raises(ValueError, match=message):
        scan(small_vgg(), lambda m: 0.0, sparsities=levels, progress=False)


def test_channel_scan_needs_stats():
    with pytest.raises(ValueError, match="collect_channel_stats"):
        scan(small_vgg(), lambda m: 0.0, method="channel", progress=False)


def test_already_pruned_layer_is_refused_untouched():
    model = small_vgg()
    prune.l1_unstructured(model[0][0], "weight", amount=0.5)
    keys = sorted(model.state_dict())
    with pytest.raises(ValueError, match="finalize"):
        scan(model, lambda m: 0.0, progress=False)
    assert sorted(model.state_dict()) == keys


def test_non_numeric_score_is_refused():
    with pytest.raises(TypeError, match="must return a number"):
        scan(small_vgg(), lambda m: "good", progress=False)


# ---------------------------------------------------------------------------
# Plan selection (pure)


def test_plan_higher_is_better_stops_at_first_failure():
    # 0.6 fails, 0.9 recovers by chance: still 0.3.
    assert select_sparsity([0.95, 0.80, 0.95], LEVELS, 0.96, True, max_drop=0.02) == 0.3


def test_plan_lower_is_better():
    assert select_sparsity([0.01, 0.04, 0.2], LEVELS, 0.0, False, max_drop=0.05) == 0.6


def test_plan_relative_tolerance():
    assert select_sparsity([1.9, 1.7, 1.0], LEVELS, 2.0, True, max_drop=0.1, relative=True) == 0.3
    assert select_sparsity([1.9, 1.7, 1.0], LEVELS, 2.0, True, max_drop=0.15, relative=True) == 0.6


def test_plan_is_zero_when_the_lowest_level_fails():
    assert select_sparsity([0.5, 0.4, 0.3], LEVELS, 0.9, True, max_drop=0.01) == 0.0


def test_plan_counts_a_drop_equal_to_the_tolerance_as_within():
    # 0.95 - 0.94 is 0.010000000000000009 in floating point.
    assert select_sparsity([0.94], [0.5], 0.95, True, max_drop=0.01) == 0.5


def test_plan_missing_or_nan_score_stops():
    assert select_sparsity([0.0, None, 0.0], LEVELS, 0.0, False, max_drop=0.1) == 0.3
    assert select_sparsity([0.0, math.nan, 0.0], LEVELS, 0.0, False, max_drop=0.1) == 0.3


def test_relative_plan_with_zero_baseline_is_refused():
    with pytest.raises(ValueError, match="absolute"):
        select_sparsity([0.1], [0.5], 0.0, False, max_drop=0.1, relative=True)


def test_result_plan_is_accepted_by_apply_plan():
    model = small_vgg()
    result = scan(model, OutputDistortion(torch.randn(2, 3, 8, 8)), sparsities=LEVELS, progress=False)
    plan = result.plan(max_drop=0.2)
    assert set(plan) == set(prunable_layers(model, (nn.Conv2d, nn.Linear)))
    pruned = prunekit.finalize(prunekit.apply_plan(model, plan))
    for layer, level in plan.items():
        weight = pruned.get_submodule(layer).weight
        assert float((weight == 0).float().mean()) == pytest.approx(level, abs=0.01)


# ---------------------------------------------------------------------------
# Result files


def example_result() -> SensitivityResult:
    return SensitivityResult(
        metric="accuracy",
        higher_is_better=True,
        baseline=0.9,
        sparsities=(0.4, 0.7),
        scores={"features.0": [0.9, math.nan], "features.2": [math.inf, None]},
        method="channel",
        meta={"model": "vgg11"},
    )


def test_json_round_trip(tmp_path):
    result = example_result()
    path = tmp_path / "scan.json"
    text = result.to_json(path)
    assert path.read_text() == text
    json.loads(text)  # strict JSON: NaN/Infinity are spelled as strings
    again = SensitivityResult.from_json(path)
    assert again.to_dict() == result.to_dict()
    assert math.isnan(again.scores["features.0"][1]) and again.scores["features.2"] == [math.inf, None]
    assert not again.complete


def test_from_json_names_a_bad_file(tmp_path):
    path = tmp_path / "scan.json"
    path.write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="scan.json"):
        SensitivityResult.from_json(path)


def test_csv_has_one_row_per_layer_the_baseline_and_one_column_per_sparsity():
    result = example_result()
    lines = result.to_csv().splitlines()
    assert lines[0] == "layer,baseline,0.4,0.7"
    assert [line.split(",")[0] for line in lines[1:]] == ["features.0", "features.2"]
    assert all(float(line.split(",")[1]) == result.baseline for line in lines[1:])
    assert lines[2].split(",")[3] == ""  # not measured


def test_table_plan_column_shows_the_plan_written_and_each_layer_alone():
    result = SensitivityResult("accuracy", True, 0.9, (0.4, 0.7), {"a": [0.9, 0.9], "b": [0.9, 0.89]})
    own = result.table(max_drop=0.02)
    assert own.splitlines()[1].split() == ["layer", "40%", "70%", "plan"]
    assert own.splitlines()[2].split()[-1] == "70%"
    joint = result.table(max_drop=0.02, plan={"a": 0.7, "b": 0.4})
    assert joint.splitlines()[1].split() == ["layer", "40%", "70%", "plan", "alone"]
    assert joint.splitlines()[3].split()[-2:] == ["40%", "70%"]  # b: written 40 %, alone 70 %
    assert "every score within the tolerance" in joint and "*" not in joint


def test_plot_marks_points_beyond_the_tolerance_and_a_plan_of_zero(tmp_path):
    pytest.importorskip("matplotlib")
    result = SensitivityResult("accuracy", True, 0.9, (0.4, 0.7), {"a": [0.9, 0.5], "b": [0.2, 0.1]})
    figure = result.plot(tmp_path / "s.png", max_drop=0.02, plan={"a": 0.4, "b": 0.0})
    axes = [ax for ax in figure.axes if ax.get_visible()]
    crosses = {ax.get_title(): [line for line in ax.lines if line.get_gid() == "beyond-tolerance"] for ax in axes}
    assert list(crosses["a"][0].get_xdata()) == [70.0]
    assert list(crosses["b"][0].get_xdata()) == [40.0, 70.0]
    plan_lines = {ax.get_title(): [l for l in ax.lines if l.get_gid() == "plan"] for ax in axes}
    assert list(plan_lines["b"][0].get_xdata()) == [0.0, 0.0]  # a plan of 0 is drawn, at 0 %
    assert list(plan_lines["a"][0].get_xdata()) == [40.0, 40.0]
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_table_shows_layers_levels_and_plan():
    result = SensitivityResult("accuracy", True, 0.9, (0.4, 0.7), {"conv": [0.89, 0.5]})
    table = result.table(max_drop=0.02)
    assert "40%" in table and "70%" in table and "conv" in table
    assert "0.5000*" in table  # beyond tolerance
    assert table.splitlines()[2].endswith("40%")  # the plan column


def test_check_sparsities_accepts_zero():
    assert check_sparsities([0, 0.5]) == (0.0, 0.5)


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    result = SensitivityResult("accuracy", True, 0.9, (0.4, 0.7), {f"c{i}": [0.89, 0.5] for i in range(5)})
    path = tmp_path / "curves.png"
    result.plot(path, max_drop=0.02)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prefix_cache_runs_a_shared_module_at_every_position():
    relu = nn.ReLU()
    conv = nn.Conv2d(8, 8, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), relu, conv, relu, conv, relu).eval()
    metric = OutputDistortion(torch.randn(2, 3, 12, 12))
    with pytest.warns(SuffixFallbackWarning, match="'2' with full forwards"):
        cached = scan(model, metric, sparsities=[0.5, 0.9], progress=False)

    def full_forwards(m):
        return metric(m)

    full_forwards.higher_is_better = False
    naive = scan(model, full_forwards, sparsities=[0.5, 0.9], progress=False)
    assert cached.layers == naive.layers == ["0", "2"]
    for layer in cached.layers:
        assert cached.scores[layer] == pytest.approx(naive.scores[layer], rel=1e-6)
