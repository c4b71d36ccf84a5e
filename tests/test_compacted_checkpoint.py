"""Compacted checkpoints: a model compact built, saved without pickled code and loaded back exactly and safely."""

import pytest
import torch
from torch import nn

import prunekit
from prunekit.compact import compact
from prunekit.io.compacted import compacted_checkpoint, rebuild_compacted, save_compacted
from prunekit.dependency.border_bias import BorderBiasConv2d
from prunekit.methods.registry import get_method
from prunekit.models.zoo import load_model
from prunekit.plans import apply_plan, copy_model


def _half_of_every_group(model, method="filter-norm"):
    pruning = get_method(method)
    convs = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    return apply_plan(copy_model(model), {group: 0.5 for group in pruning.blocks(model, convs)}, method=pruning)


@pytest.fixture
def small_resnet():
    dense = load_model("digits-resnet").eval()
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    return dense, compact(_half_of_every_group(dense), x[:1]).eval(), x


def test_a_compacted_digits_resnet_loads_back_bit_for_bit_through_load_model(small_resnet, tmp_path):
    dense, small, x = small_resnet
    assert any(isinstance(m, BorderBiasConv2d) for m in small.modules())  # the folded constants are kept too
    path = tmp_path / "small.pt"
    save_compacted(small, path, "digits-resnet")
    loaded = load_model(str(path))
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in small.parameters())
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in dense.parameters()) / 2
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    assert torch.load(path, weights_only=True)["format"] == "prunekit-compacted-v1"  # plain data only


def test_a_compacted_model_can_be_pruned_and_compacted_again_exactly(small_resnet):
    # Masking a channel of a BorderBiasConv2d masks its border bias too, so the channel is dead and compact
    # removes it (it used to be refused: "coupled with ... which are not dead").
    _, small, x = small_resnet
    again = _half_of_every_group(small, method="filter-norm")
    smaller = compact(again, x[:1])
    with torch.no_grad():
        torch.testing.assert_close(smaller(x), again(x), rtol=1e-4, atol=1e-5)
    assert smaller.layer3[0].conv2.out_channels == small.layer3[0].conv2.out_channels // 2


def test_the_border_bias_is_not_cached_from_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    conv = BorderBiasConv2d(2, 3, 3, padding=1)
    with torch.no_grad():
        conv.border_weight.normal_()
    x = torch.randn(1, 2, 5, 5)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        conv(mode.from_tensor(x))
    with torch.no_grad():
        expected = conv._conv_forward(x, conv.weight, conv.bias) + conv.border_bias(x).float()
        torch.testing.assert_close(conv(x), expected)


def _document(small):
    return compacted_checkpoint(small, "digits-resnet")


@pytest.mark.parametrize("change, fragment", [
    (lambda d: d["layers"].update({"nowhere.conv": d["layers"]["stem.0"]}), "'nowhere.conv' is not a layer"),
    (lambda d: d["layers"]["stem.0"].update(type="Sequential"), "has type 'Sequential'"),
    (lambda d: d["layers"]["stem.0"]["arguments"].update(padding_mode="__import__('os')"), "not a padding"),
    (lambda d: d["layers"]["stem.0"]["arguments"].update(out_channels=1 << 40), "out of range"),
    (lambda d: d["layers"]["stem.0"]["arguments"].pop("groups"), "expected"),
    (lambda d: d["layers"]["stem.0"]["arguments"].update(out_channels=5), "do not fit"),
    (lambda d: d["state_dict"].pop("fc.bias"), "do not fit"),
])
def test_a_tampered_compacted_checkpoint_is_refused_naming_what_is_wrong(small_resnet, change, fragment):
    _, small, _ = small_resnet
    document = _document(small)
    change(document)
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        rebuild_compacted(load_model("digits-resnet", "none"), document, "bad.pt")


def test_a_recorded_layer_takes_no_memory_beyond_the_files_tensors(small_resnet):
    # A record asking for a huge layer is built on the meta device and fails on the shapes, never allocated.
    _, small, _ = small_resnet
    document = _document(small)
    document["layers"]["fc"]["arguments"].update(in_features=1 << 22, out_features=1 << 22)
    with pytest.raises(ValueError, match="do not fit"):
        rebuild_compacted(load_model("digits-resnet", "none"), document, "bad.pt")


def test_compacted_checkpoints_are_exported_at_the_top_level():
    assert prunekit.save_compacted is save_compacted
