"""apply_plan, finalize and copy_model on conv stacks and torchvision VGGs."""

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import prune

from prunekit import apply_plan, conv_layers, copy_model, finalize

VGGS = ["vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"]


def _stack():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 4, 3),
    )


def _weight_sparsity(conv):
    return float((conv.weight == 0).float().mean())


def test_plan_sets_final_sparsity():
    model = apply_plan(_stack(), {"0": 0.5, "3": 0.75})
    assert _weight_sparsity(model[0]) == pytest.approx(round(0.5 * 216) / 216)
    assert _weight_sparsity(model[3]) == pytest.approx(0.75)
    assert not prune.is_pruned(model[5])


def test_plan_applied_twice_does_not_compound():
    model = apply_plan(_stack(), {"3": 0.6})
    apply_plan(model, {"3": 0.6})
    assert _weight_sparsity(model[3]) == pytest.approx(round(0.6 * 1152) / 1152)


def test_new_plan_over_old_reaches_new_final_sparsity():
    model = apply_plan(_stack(), {"3": 0.5})
    kept_zeros = model[3].weight_mask == 0
    apply_plan(model, {"3": 0.8})
    assert _weight_sparsity(model[3]) == pytest.approx(0.8, abs=1e-3)
    assert torch.all(model[3].weight_mask[kept_zeros] == 0)


def test_lower_plan_over_higher_is_refused_and_model_unchanged():
    model = apply_plan(_stack(), {"3": 0.8, "0": 0.2})
    mask = model[3].weight_mask.clone()
    with pytest.raises(ValueError, match="cannot regrow"):
        apply_plan(model, {"0": 0.5, "3": 0.5})
    assert torch.equal(model[3].weight_mask, mask)
    assert _weight_sparsity(model[0]) == pytest.approx(round(0.2 * 216) / 216)


def test_plan_on_finalized_model_counts_existing_zeros():
    model = finalize(apply_plan(_stack(), {"3": 0.5}))
    apply_plan(model, {"3": 0.7})
    assert _weight_sparsity(model[3]) == pytest.approx(round(0.7 * 1152) / 1152)


def test_zero_sparsity_leaves_layer_dense():
    model = apply_plan(_stack(), {"0": 0.0})
    assert not prune.is_pruned(model)


def test_unknown_layer_lists_valid_ones():
    with pytest.raises(KeyError, match="Conv2d or Linear layers are: 0, 3, 5"):
        apply_plan(_stack(), {"features.99": 0.5})


@pytest.mark.parametrize("value", [1.5, -0.1])
def test_out_of_range_sparsity_is_rejected(value):
    model = _stack()
    with pytest.raises(ValueError, match="outside"):
        apply_plan(model, {"0": 0.3, "3": value})
    assert not prune.is_pruned(model)


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="channel, filter-norm, fine-grained"):
        apply_plan(_stack(), {"0": 0.5}, method="magnitude")


def test_channel_plan_needs_stats_for_every_layer():
    with pytest.raises(ValueError, match="collect_channel_stats"):
        apply_plan(_stack(), {"0": 0.5}, method="channel")
    with pytest.raises(KeyError, match="stats missing for layer '3'"):
        apply_plan(_stack(), {"0": 0.5, "3": 0.5}, method="channel", stats={"0": torch.ones(8)})


def test_channel_plan_masks_conv_and_following_batchnorm():
    model = _stack()
    stats = {"0": torch.arange(8.0), "3": torch.arange(16.0)}
    apply_plan(model, {"0": 0.25, "3": 0.5}, method="channel", stats=stats)
    assert model[0].bias_mask.tolist() == [0.0, 0.0] + [1.0] * 6
    assert model[1].weight_mask.tolist() == model[0].bias_mask.tolist()
    assert model[1].bias_mask.tolist() == model[0].bias_mask.tolist()
    assert int((model[3].bias_mask == 0).sum()) == 8
    apply_plan(model, {"0": 0.25, "3": 0.5}, method="channel", stats=stats)
    assert int((model[3].bias_mask == 0).sum()) == 8


def test_finalize_leaves_plain_parameters_loadable_into_fresh_model():
    model = apply_plan(_stack(), {"0": 0.5, "3": 0.9})
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    expected = model(x)
    finalize(model)
    assert not prune.is_pruned(model)
    assert all(not hook for module in model.modules() for hook in [module._forward_pre_hooks])
    fresh = _stack().eval()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), expected)


def test_copy_model_works_after_forward_with_autograd():
    model = apply_plan(_stack(), {"3": 0.5})
    model(torch.randn(1, 3, 8, 8)).sum().backward()
    twin = copy_model(model)
    assert torch.equal(twin[3].weight_mask, model[3].weight_mask)
    assert twin[3].weight_orig is not model[3].weight_orig
    model(torch.randn(1, 3, 8, 8)).sum().backward()  # the original still trains
    assert model[3].weight_orig.grad is not None


def vgg_with_a_small_head(arch):
    """torchvision's VGG ``arch`` with its real features and a small head; the 120M-weight classifier, which
    this test does not prune, is built on the meta device and replaced (the eight VGGs took 53 s)."""
    with torch.device("meta"):
        model = getattr(torchvision.models, arch)(num_classes=10)
    model.classifier = nn.Linear(512 * 7 * 7, 10)
    model.features.to_empty(device="cpu")
    torch.manual_seed(0)
    for module in model.features.modules():
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
            module.reset_parameters()
    assert not any(p.is_meta or b.is_meta for p in model.parameters() for b in model.buffers())
    return model.eval()


@pytest.mark.parametrize("arch", VGGS)
def test_vgg_plan_and_finalize(arch):
    model = vgg_with_a_small_head(arch)
    convs = list(conv_layers(model))
    assert convs[0] == "features.0"
    plan = {name: 0.5 for name in convs[1:3]}
    apply_plan(model, plan)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    finalize(model)
    for name in plan:
        conv = model.get_submodule(name)
        assert _weight_sparsity(conv) == pytest.approx(0.5, abs=1e-3)
    with torch.no_grad():
        assert torch.allclose(model(x), expected)


def test_channel_plan_completes_channels_emptied_by_fine_grained_pruning():
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, 0.01, 2.0, 0.02]).reshape(4, 1, 1, 1))
    apply_plan(model, {"0": 0.5})  # zeroes the whole weight of channels 1 and 3
    apply_plan(model, {"0": 0.5}, method="channel", stats={"0": torch.arange(4.0)})
    expected = [1.0, 0.0, 1.0, 0.0]
    assert model[0].bias_mask.tolist() == expected
    assert model[1].weight_mask.tolist() == expected and model[1].bias_mask.tolist() == expected
    model.eval()
    out = model(torch.randn(2, 1, 3, 3))
    assert torch.all(out[:, 1] == 0) and torch.all(out[:, 3] == 0)
