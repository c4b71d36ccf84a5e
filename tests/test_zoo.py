import json
import urllib.error

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import prune

from prunekit.datasets import digits_test_set
from prunekit.layers import conv_layers
from prunekit.models.zoo import (
    DEFAULT_MODEL,
    DIGITS_VGG_WEIGHTS,
    VGG_NAMES,
    WeightsUnavailableError,
    available_models,
    digits_vgg,
    load_model,
    load_weights,
    save_checkpoint,
)

DIGITS_CONVS = ["features.0", "features.2", "features.5", "features.7", "features.10", "features.12"]


def _accuracy(model):
    x, y = digits_test_set().tensors
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _same_outputs(a, b):
    x = digits_test_set().tensors[0][:16]
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_shipped_digits_model_reaches_its_recorded_accuracy():
    recorded = json.loads(DIGITS_VGG_WEIGHTS.with_suffix(".json").read_text())["test_accuracy"]
    accuracy = _accuracy(load_model(DEFAULT_MODEL))
    assert accuracy >= recorded - 0.005
    assert accuracy >= 0.95


def test_digits_vgg_has_vgg_layer_names_and_loads_weights_only():
    assert list(conv_layers(digits_vgg())) == DIGITS_CONVS
    state = torch.load(DIGITS_VGG_WEIGHTS, map_location="cpu", weights_only=True)
    assert set(state) == set(digits_vgg().state_dict())


def test_weights_none_gives_an_untrained_digits_model():
    torch.manual_seed(0)
    untrained = load_model("digits-vgg", weights="none")
    assert _accuracy(untrained) < 0.5


@pytest.mark.parametrize("name", VGG_NAMES)
def test_every_vgg_name_builds(name):
    # The meta device skips allocating and initialising ~140M parameters per model.
    with torch.device("meta"):
        model = load_model(name)
    depth = int(name[3:5])
    assert len(conv_layers(model)) == {11: 8, 13: 10, 16: 13, 19: 16}[depth]
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert has_bn == name.endswith("_bn")
    assert not model.training


def test_vgg_runs_a_forward_pass():
    torch.manual_seed(0)
    model = load_model("VGG11")
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


@pytest.mark.parametrize("spec", ["vgg20", "vgg19bn"])
def test_unknown_vgg_lists_valid_names(spec):
    with pytest.raises(ValueError, match=r"unknown VGG .*vgg11, vgg11_bn, .*vgg19_bn"):
        load_model(spec)


def test_unknown_model_and_missing_checkpoint():
    with pytest.raises(ValueError, match=r"unknown model 'resnet1' \(did you mean resnet18.*torchvision.models:resnet18"):
        load_model("resnet1")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_model("missing.pt")


def test_factory_spec_builds_the_model():
    model = load_model("prunekit.models.zoo:digits_vgg")
    assert list(conv_layers(model)) == DIGITS_CONVS


@pytest.mark.parametrize(
    "spec, error, message",
    [
        ("torch.nn:Identity", ValueError, "has no Conv2d layer"),
        ("no_such_package_xyz.models:net", ValueError, "cannot import 'no_such_package_xyz.models'"),
        ("prunekit.models.zoo:no_such_factory", ValueError, "has no attribute 'no_such_factory'.*digits_vgg"),
        ("prunekit.models.zoo:DEFAULT_MODEL", TypeError, "not a callable"),
        ("prunekit.models.zoo:available_models", TypeError, "returned list, expected an nn.Module"),
        ("prunekit.models.zoo:save_checkpoint", RuntimeError, "factory 'prunekit.models.zoo:save_checkpoint' failed"),
    ],
)
def test_factory_errors_name_the_problem(spec, error, message):
    with pytest.raises(error, match=message):
        load_model(spec)


def test_pickled_model_needs_trust_checkpoint(tmp_path):
    model = digits_vgg(pretrained=True)
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(ValueError, match=r"pickled.*--trust-checkpoint"):
        load_model(str(path))
    assert _same_outputs(load_model(str(path), trust_checkpoint=True), model)


def test_prunekit_checkpoint_round_trip(tmp_path):
    model = digits_vgg(pretrained=True)
    path = tmp_path / "digits.pt"
    save_checkpoint(model, path, "digits-vgg")
    assert torch.load(path, weights_only=True)["arch"] == "digits-vgg"
    assert _same_outputs(load_model(str(path)), model)


def test_checkpoint_of_a_pruned_model_folds_the_masks(tmp_path):
    model = digits_vgg(pretrained=True)
    prune.l1_unstructured(model.features[0], "weight", amount=0.5)
    path = tmp_path / "pruned.pt"
    save_checkpoint(model, path, "digits-vgg")
    loaded = load_model(str(path))
    assert not hasattr(loaded.features[0], "weight_orig")
    assert torch.equal(loaded.features[0].weight, model.features[0].weight)
    assert (loaded.features[0].weight == 0).sum().item() == 72


def test_checkpoint_naming_a_factory_needs_trust(tmp_path):
    path = tmp_path / "factory.pt"
    save_checkpoint(digits_vgg(pretrained=True), path, "prunekit.models.zoo:digits_vgg")
    with pytest.raises(ValueError, match="--trust-checkpoint"):
        load_model(str(path))
    assert len(conv_layers(load_model(str(path), trust_checkpoint=True))) == 6


def test_plain_state_dict_as_model_asks_for_an_architecture(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(digits_vgg().state_dict(), path)
    with pytest.raises(ValueError, match="without an architecture.*--model vgg16 --weights"):
        load_model(str(path))
    with pytest.raises(ValueError, match="carries its own weights"):
        load_model(str(path), weights="none")


def test_non_torch_file_is_reported(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    with pytest.raises(ValueError, match="not a readable PyTorch file"):
        load_model(str(path))


def test_weights_path_loads_into_the_named_architecture(tmp_path):
    trained = digits_vgg(pretrained=True)
    path = tmp_path / "w.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}, path)
    assert _same_outputs(load_model("digits-vgg", weights=str(path)), trained)


def test_strict_load_summarises_missing_unexpected_and_shapes(tmp_path):
    state = digits_vgg().state_dict()
    del state["features.0.bias"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        load_weights(digits_vgg(num_classes=5), path)
    message = str(info.value)
    assert "1 missing keys: features.0.bias" in message
    assert "1 unexpected keys: extra.weight" in message
    assert "2 shape mismatches: classifier.3.weight: file [10, 64] vs model [5, 64]" in message


def test_weights_file_holding_a_pickled_model_is_refused(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(digits_vgg(), path)
    with pytest.raises(ValueError, match="needs a state_dict"):
        load_model("digits-vgg", weights=str(path))


def test_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="imagenet, none or a state_dict path"):
        load_model("digits-vgg", weights=str(tmp_path / "absent.pt"))
    with pytest.raises(ValueError, match="imagenet is available for torchvision model names"):
        load_model("digits-vgg", weights="imagenet")


def test_imagenet_weights_offline_say_how_to_supply_them(monkeypatch):
    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("mocked: no network")

    monkeypatch.setattr(torchvision.models.VGG19_Weights, "get_state_dict", offline)
    with pytest.raises(WeightsUnavailableError) as info:
        load_model("vgg19", weights="imagenet")
    message = str(info.value)
    assert "VGG19_Weights.IMAGENET1K_V1" in message and "mocked: no network" in message
    assert str(torch.hub.get_dir()) in message
    assert "--weights PATH" in message and "vgg19-dcbb9e9d.pth" in message


@pytest.mark.parametrize("content", [bytes(range(256)) * 4, b'{"plan": {"features.0": 0.5}}'])
def test_damaged_or_foreign_file_is_not_called_a_pickled_model(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint") as info:
        load_model(str(path))
    assert "trust" not in str(info.value) and "weights_only=False" not in str(info.value)


def test_models_come_from_one_registry():
    from prunekit.models.zoo import register_model, unregister_model

    assert available_models()[:3] == ["digits-vgg", "digits-resnet", "hed"]
    calls = []

    @register_model("unit-test-net")
    def build(weights, progress):
        calls.append(weights)
        return nn.Sequential(nn.Conv2d(1, 2, 3))

    try:
        assert "unit-test-net" in available_models()
        load_model("unit-test-net")
        assert calls == [None]  # its own default weights
        with pytest.raises(ValueError, match="taken"):
            register_model("unit-test-net")
    finally:
        unregister_model("unit-test-net")
    assert "unit-test-net" not in available_models()
    with pytest.raises(ValueError, match="unknown model 'unit-test-net'"):
        load_model("unit-test-net")


def test_any_torchvision_classifier_by_name():
    model = load_model("resnet18")
    assert type(model).__name__ == "ResNet" and not model.training
    assert "conv1" in conv_layers(model)
    with pytest.raises(ValueError, match="imagenet is available for torchvision model names"):
        load_model("digits-vgg", weights="imagenet")
