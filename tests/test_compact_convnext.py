"""ConvNeXt: channels through permute, channels-last LayerNorm, LayerNorm2d and layer scale, compacted exactly."""

import pytest
import torch
import torchvision
from torch import nn

from prunekit.compact import UnsupportedGraphError, check_tolerance, compact
from prunekit.dependency import channel_groups, unit_masks
from prunekit.dependency.handlers.permute import permuted_layout
from prunekit.dependency.partial_layer_norm import PartialLayerNorm
from prunekit.sensitivity.metrics import relative_error
from prunekit.testing import randomize_layer_norms
from test_compact_groups import compact_exactly, mask_layer, mask_units, total_macs


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Norm affine pairs and biases away from their init, so removed channels carry non-zero constants."""
    return randomize_layer_norms(model, seed).eval()


def masked_tiny(seed: int, fraction: float):
    """A randomised TinyConvNeXt with ``fraction`` of every group masked, an input and the masked output."""
    torch.manual_seed(seed)
    model = randomized(TinyConvNeXt())
    mask_units(model, fraction)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        return model, x, model(x)


class TinyConvNeXt(nn.Module):
    """A stem with LayerNorm2d, one ConvNeXt block (permute, LayerNorm, MLP, layer scale), a LayerNorm2d head."""

    def __init__(self):
        super().__init__()
        self.net = torchvision.models.ConvNeXt(
            [torchvision.models.convnext.CNBlockConfig(8, 16, 1), torchvision.models.convnext.CNBlockConfig(16, None, 1)],
            num_classes=3,
        )

    def forward(self, x):
        return self.net(x)


def test_convnext_tiny_stem_and_stage_widths_are_removable_with_their_layer_norms():
    groups = {g.name: g for g in channel_groups(torchvision.models.convnext_tiny())}
    stem = groups["features.0.0"]
    assert len(stem.removable_units) == 96 and "features.1.2.block.5" in stem.members
    assert {"features.0.1", "features.1.0.block.2", "features.2.0"} <= set(stem.norms)
    assert len(groups["features.4.1"].removable_units) == 384
    assert "classifier.0" in groups["features.6.1"].norms


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_masked_convnext_compacts_exactly_in_each_dtype(dtype):
    model, x, expected = masked_tiny(0, 0.5)
    small = compact(model, x)
    with torch.no_grad():
        assert relative_error(small(x), expected) <= check_tolerance(torch.float32)
        if dtype != torch.float32:  # the compacted model keeps the masked one's outputs in half precision too
            reference = model.to(dtype)(x.to(dtype)).float()
            actual = small.to(dtype)(x.to(dtype)).float()
            assert relative_error(actual, reference) <= check_tolerance(dtype)
    assert total_macs(small, x.shape) < 0.5 * total_macs(model.float(), x.shape)
    block = small.net.features[1][0]
    assert isinstance(block.block[2], PartialLayerNorm) and block.block[2].removed_count == 4
    assert block.layer_scale.shape == (4, 1, 1) and block.block[5].out_features == 4
    assert isinstance(small.net.features[0][1], PartialLayerNorm) and small.net.features[0][1].channel_dim == 1


def test_compacting_a_compacted_convnext_again_stays_exact():
    model, x, expected = masked_tiny(1, 0.25)
    once = compact(model, x)
    with torch.no_grad():
        assert relative_error(once(x), expected) <= check_tolerance(torch.float32)
    mask_units(once, 0.5)
    with torch.no_grad():
        expected = once(x)
    twice = compact(once, x)
    with torch.no_grad():
        assert relative_error(twice(x), expected) <= check_tolerance(torch.float32)
    norm = twice.net.features[1][0].block[2]
    assert norm.channels == 3 and norm.removed_count == 5  # 8 channels: 2 removed, then 3 of the 6 left


def test_a_channel_masked_in_its_producers_but_not_its_layer_norm_is_refused_naming_the_norm():
    model = randomized(TinyConvNeXt())
    stem = next(g for g in channel_groups(model) if g.name == "net.features.0.0")
    for name, keep in unit_masks(model, stem, [0, 1]).items():
        if name not in stem.norms:
            mask_layer(model.get_submodule(name), keep)
    with pytest.raises(UnsupportedGraphError, match=r"LayerNorm2d 'net.features.0.1'.*weight is not 0"):
        compact(model, torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("channel_dim", [-1, 1])
def test_partial_layer_norm_normalises_kept_channels_as_the_whole_norm_did(channel_dim):
    torch.manual_seed(2)
    full = nn.LayerNorm(6)
    with torch.no_grad():
        full.weight.normal_(), full.bias.normal_()
    x = torch.randn(3, 5, 6) * 4 + 2
    constants = torch.tensor([0.7, -3.0])
    x[..., 4:] = constants
    part = PartialLayerNorm(4, removed_constants=constants, eps=full.eps, channel_dim=channel_dim)
    with torch.no_grad():
        part.weight.copy_(full.weight[:4]), part.bias.copy_(full.bias[:4])
        expected = full(x)[..., :4]
        kept = x[..., :4] if channel_dim == -1 else x[..., :4].permute(0, 2, 1)
        actual = part(kept) if channel_dim == -1 else part(kept).permute(0, 2, 1)
    torch.testing.assert_close(actual, expected)


def _whole_norm_reference(x: torch.Tensor, constants: torch.Tensor, eps: float) -> torch.Tensor:
    """The kept channels of a LayerNorm (no affine) over x's channels and the constant channels, in float64."""
    whole = torch.cat([x.double(), constants.double().expand(*x.shape[:-1], -1)], dim=-1)
    return torch.nn.functional.layer_norm(whole, whole.shape[-1:], eps=eps)[..., : x.shape[-1]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("affine", ["none", "weight", "weight and bias"])
def test_partial_layer_norm_matches_the_whole_norm_in_each_dtype_and_affine_form(dtype, affine):
    torch.manual_seed(3)
    constants = torch.randn(5) * 2 + 1
    x = (torch.randn(2, 3, 7) * 3 - 2).to(dtype)  # a mean far from 0 and from the constants' mean
    part = PartialLayerNorm(7, removed_constants=constants, elementwise_affine=affine != "none",
                            bias=affine == "weight and bias", eps=1e-6, dtype=dtype)
    expected = _whole_norm_reference(x, constants, 1e-6)
    if part.weight is not None:
        with torch.no_grad():
            part.weight.normal_()
            expected = expected * part.weight.double()
            if part.bias is not None:
                part.bias.normal_()
                expected = expected + part.bias.double()
    with torch.no_grad():
        actual = part(x)
    assert actual.dtype == dtype
    torch.testing.assert_close(actual, expected.to(dtype))  # torch's tolerances for the dtype


def test_partial_layer_norm_counts_removed_channels_added_in_steps_as_if_added_at_once():
    torch.manual_seed(4)
    constants = torch.randn(9) * 3 + 2
    at_once = PartialLayerNorm(4, removed_constants=constants)
    in_steps = PartialLayerNorm(4, removed_constants=constants[:2])
    in_steps.add_removed(constants[2:7])
    merged = PartialLayerNorm(4)
    merged.add_removed_statistics(in_steps.removed_count, in_steps.removed_mean, in_steps.removed_variance)
    merged.add_removed(constants[7:])
    assert merged.removed_count == at_once.removed_count == 9
    assert merged.removed_mean == pytest.approx(float(constants.double().mean()), rel=1e-12)
    assert merged.removed_variance == pytest.approx(float(constants.double().var(unbiased=False)), rel=1e-12)
    x = torch.randn(6, 4)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), at_once(x))
        torch.testing.assert_close(at_once(x).double(), _whole_norm_reference(x, constants, at_once.eps))


def test_permute_moves_the_channels_to_dim_one_or_last_and_nowhere_else():
    assert permuted_layout("conv", [0, 2, 3, 1]) == "last"
    assert permuted_layout("last", (0, 3, 1, 2)) == "conv"
    assert permuted_layout("conv", [0, 1, 3, 2]) == "conv"  # H and W swapped: channels stay
    assert permuted_layout("conv", [0, 2, 1, 3]) is None
    assert permuted_layout("conv", [1, 0, 2, 3]) is None  # the batch moved
    assert permuted_layout("flat", [0, 1]) is None

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.head(self.conv(x).permute(0, 2, 1, 3).permute(0, 2, 1, 3))

    group = channel_groups(Mixed())[0]
    assert not group.removable_units and "permute" in group.fixed_reasons[0]


class Scaled(nn.Module):
    def __init__(self, shared: bool = False):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1)
        self.gamma = nn.Parameter(torch.randn(4, 1, 1))
        self.shared = shared

    def forward(self, x):
        y = self.gamma * self.conv(x)
        return self.head(y + self.gamma if self.shared else y)


def test_a_layer_scale_goes_with_its_channels_and_a_shared_one_fixes_them():
    model = Scaled().eval()
    keep = torch.tensor([True, False, True, False])
    mask_layer(model.conv, keep)
    x = torch.randn(1, 3, 8, 8)
    small = compact(model, x)
    assert small.gamma.shape == (2, 1, 1) and small.gamma.requires_grad
    torch.testing.assert_close(small.gamma, model.gamma[keep])
    group = channel_groups(Scaled(shared=True))[0]
    assert not group.removable_units and "'gamma', which is used more than once" in group.fixed_reasons[0]


NORM, LAYER_SCALE = "net.features.1.0.block.2", "net.features.1.0.layer_scale"


def _saved_compacted_tiny(tmp_path):
    from prunekit.io.compacted import save_compacted

    model, x, expected = masked_tiny(2, 0.5)
    small = compact(model, x)
    save_compacted(small, tmp_path / "small.pt", arch=None)
    return small, x, torch.load(tmp_path / "small.pt", weights_only=True)


def test_a_compacted_convnext_saves_its_partial_layer_norms_and_layer_scales_and_loads_back_bit_for_bit(tmp_path):
    from prunekit.io.compacted import rebuild_compacted

    small, x, document = _saved_compacted_tiny(tmp_path)
    assert document["layers"][NORM]["type"] == "PartialLayerNorm" and document["parameters"][LAYER_SCALE] == [4, 1, 1]
    rebuilt = rebuild_compacted(randomized(TinyConvNeXt()), document, tmp_path / "small.pt").eval()
    for name in (NORM, "net.features.0.1"):  # channels last, and a LayerNorm2d's channels at dim 1
        norm, again = small.get_submodule(name), rebuilt.get_submodule(name)
        assert isinstance(again, PartialLayerNorm) and not again.weight.is_meta
        assert ((again.channels, again.channel_dim, again.removed_count, again.removed_mean, again.removed_variance)
                == (norm.channels, norm.channel_dim, norm.removed_count, norm.removed_mean, norm.removed_variance))
    assert rebuilt.get_parameter(LAYER_SCALE).shape == (4, 1, 1)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), small(x))


@pytest.mark.parametrize("damage, message", [
    (lambda doc: doc["layers"][NORM]["arguments"].update(removed_variance=float("nan")), "not a finite mean"),
    (lambda doc: doc["layers"][NORM]["arguments"].update(removed_count=-1), "out of range"),
    (lambda doc: doc["parameters"].update({"net.features.1.0.nothing": [3]}), "'net.features.1.0.nothing' is not a parameter"),
    (lambda doc: doc["parameters"].update({LAYER_SCALE: [2, "x"]}), "not a list of at most 8 sizes"),
    (lambda doc: doc["parameters"].update({LAYER_SCALE: [5, 1, 1]}), "weights do not fit"),
    (lambda doc: doc.update(parameters=[LAYER_SCALE]), "not a mapping of names to shapes"),
])
def test_a_damaged_compacted_convnext_checkpoint_is_refused_naming_the_entry(tmp_path, damage, message):
    from prunekit.io.compacted import rebuild_compacted

    _, _, document = _saved_compacted_tiny(tmp_path)
    damage(document)
    fresh = randomized(TinyConvNeXt())
    with pytest.raises(ValueError, match=message):
        rebuild_compacted(fresh, document, tmp_path / "small.pt")


def _every_group(model: nn.Module):
    """Every conv and each block's MLP hidden Linear (``block.3``): one member of every removable group."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Conv2d) or (isinstance(module, nn.Linear) and name.endswith("block.3"))]


@pytest.mark.parametrize("method", ["filter-norm", "channel", "taylor"])
def test_a_plan_at_half_of_every_group_masks_the_layer_norms_and_compacts_exactly(method):
    from prunekit.methods.registry import get_method
    from prunekit.plans import apply_plan

    torch.manual_seed(2)
    model = randomized(TinyConvNeXt())
    x = torch.randn(2, 3, 32, 32)
    layers = _every_group(model)
    pruning = get_method(method)
    if pruning.needs_data:
        pruning = pruning.prepare(model, [x], layers=layers)
    pruned = apply_plan(model, {layer: 0.5 for layer in layers}, method=pruning)
    stem_norm = pruned.net.features[0][1]  # LayerNorm2d after the stem: masked with the stem group's units
    assert int((stem_norm.weight == 0).sum()) == 4 and int((stem_norm.bias == 0).sum()) == 4
    assert torch.equal(stem_norm.weight == 0, (pruned.net.features[0][0].weight == 0).flatten(1).all(1))
    small = compact_exactly(pruned, x)
    assert total_macs(small, x.shape) < 0.5 * total_macs(model, x.shape)
    hidden = small.net.features[1][0].block[3]  # the MLP's hidden Linear (8 -> 32), named in the plan
    assert (hidden.in_features, hidden.out_features) == (4, 16)


def test_a_scan_masks_a_groups_layer_norms_as_apply_plan_does():
    from prunekit.methods.registry import get_method

    model = randomized(TinyConvNeXt())
    pruning = get_method("filter-norm")
    block = pruning.block(model, "net.features.0.0")
    assert [name for name, _ in block.norms][:2] == ["net.features.0.1", "net.features.1.0.block.2"]
    masks = pruning.mask_maker(block, pruning.scores(model, {block.name: block})[block.name])(0.5)
    targets = pruning.targets(block)
    assert len(masks) == len(targets)
    by_target = {(id(module), name): mask for (module, name), mask in zip(targets, masks)}
    norm = model.net.features[0][1]
    stem = model.net.features[0][0]
    assert torch.equal(by_target[(id(norm), "weight")] == 0, (by_target[(id(stem), "weight")] == 0).flatten(1).all(1))
    assert int((by_target[(id(norm), "bias")] == 0).sum()) == 4


def test_a_compacted_convnext_exports_with_its_partial_layer_norms(tmp_path):
    from prunekit.export import export_onnx, export_program

    model, x, expected = masked_tiny(5, 0.5)
    small = compact(model, x)
    assert any(isinstance(m, PartialLayerNorm) for m in small.modules())
    assert export_program(small, x, tmp_path / "c.pt2") <= check_tolerance(torch.float32)
    with torch.no_grad():
        reloaded = torch.export.load(str(tmp_path / "c.pt2")).module()(x)
    assert relative_error(reloaded, expected) <= check_tolerance(torch.float32)
    pytest.importorskip("onnxruntime", reason="pip install onnx onnxruntime onnxscript")
    assert export_onnx(small, x[:1], tmp_path / "c.onnx") < 1e-5


@pytest.mark.slow
def test_a_compacted_torchvision_convnext_loads_back_by_name_through_load_model(tmp_path):
    import prunekit
    from prunekit.io.compacted import save_compacted
    from prunekit.models.zoo import load_model

    torch.manual_seed(6)
    model = randomize_layer_norms(torchvision.models.convnext_tiny().eval(), seed=6)
    plan = prunekit.uniform_plan(model, 0.5, "filter-norm")
    x = torch.rand(1, 3, 64, 64)
    small = compact(prunekit.apply_plan(model, plan, method="filter-norm"), x)
    save_compacted(small, tmp_path / "convnext.pt", arch="convnext_tiny")
    loaded = load_model(str(tmp_path / "convnext.pt")).eval()
    assert loaded.features[1][0].layer_scale.shape == (48, 1, 1)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
