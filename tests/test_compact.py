"""prunekit.compact: physical channel removal keeps outputs equal, and refuses what it cannot resize."""

import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune
from torchvision.models.vgg import VGG, cfgs, make_layers

import prunekit
from prunekit.testing import randomize_batchnorms
from prunekit.compact import (
    BorderBiasConv2d,
    UnsupportedGraphError,
    compact,
    compact_chain,
    compaction_report,
)
from examples.style_transfer.adain import adain, build_decoder, build_encoder

VGG_CFGS = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}


def relative_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    return float((expected - actual).double().norm() / expected.double().norm())


def mask_channels(conv: nn.Conv2d, channels, batchnorm=None) -> None:
    """Mask output channels of ``conv`` (weight and bias), and of ``batchnorm`` when given."""
    keep = torch.ones(conv.out_channels)
    keep[torch.as_tensor(channels)] = 0
    prune.custom_from_mask(conv, "weight", keep.view(-1, 1, 1, 1).expand_as(conv.weight))
    if conv.bias is not None:
        prune.custom_from_mask(conv, "bias", keep)
    if batchnorm is not None:
        prune.custom_from_mask(batchnorm, "weight", keep)
        prune.custom_from_mask(batchnorm, "bias", keep)


def small_vgg(arch: str, batch_norm: bool, divisor: int = 8) -> VGG:
    """torchvision's VGG (its layer pattern and forward) with channels divided by ``divisor`` and a small classifier."""
    cfg = [v if v == "M" else v // divisor for v in cfgs[VGG_CFGS[arch]]]
    with torch.device("meta"):  # skip building torchvision's 100M-parameter classifier
        model = VGG(nn.Sequential(), num_classes=10, init_weights=False)
    model.features = make_layers(cfg, batch_norm=batch_norm)
    model.classifier = nn.Sequential(
        nn.Linear(cfg[-2] * 7 * 7, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 32), nn.ReLU(True),
        nn.Dropout(), nn.Linear(32, 10),
    )  # fmt: skip
    return model


def mask_half_of_every_conv(model: nn.Module, mask_batchnorm: bool) -> None:
    for name, conv in prunekit.conv_layers(model).items():
        block = prunekit.conv_block(model, name)
        channels = torch.randperm(conv.out_channels)[: conv.out_channels // 2]
        mask_channels(conv, channels, block.batchnorm if mask_batchnorm else None)


@pytest.mark.parametrize("arch", sorted(VGG_CFGS))
@pytest.mark.parametrize("variant", ["plain", "bn-masked", "bn-unmasked"])
def test_vgg_outputs_equal_after_compaction(arch, variant):
    torch.manual_seed(0)
    model = small_vgg(arch, batch_norm=variant != "plain")
    randomize_batchnorms(model)
    mask_half_of_every_conv(model, mask_batchnorm=variant == "bn-masked")
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    compacted = compact(model)
    with torch.no_grad():
        assert relative_error(model(x), compacted(x)) < 1e-5


def test_full_width_vgg_shrinks_every_layer():
    torch.manual_seed(0)
    model = small_vgg("vgg11", batch_norm=True, divisor=1)
    mask_half_of_every_conv(model, mask_batchnorm=True)
    model.eval()
    compacted = compact(model)
    widths = [m.out_channels for m in compacted.features if isinstance(m, nn.Conv2d)]
    assert widths == [32, 64, 128, 128, 256, 256, 256, 256]
    assert compacted.classifier[0].in_features == 256 * 7 * 7
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(model(x), compacted(x)) < 1e-5


def test_unmasked_batchnorm_constant_is_folded_exactly_under_zero_padding():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1)
    )
    randomize_batchnorms(model)
    mask_channels(model[0], [1, 4, 6])  # the BatchNorm is NOT masked: constant beta - gamma*mean/std
    model.eval()
    compacted = compact(model)
    x = torch.randn(2, 3, 9, 11)
    with torch.no_grad():
        expected = model(x)
        assert relative_error(expected, compacted(x)) < 1e-5
    # The border differs from the interior, so a plain bias could not be exact.
    assert isinstance(compacted[3], BorderBiasConv2d)
    assert compacted[3].border_bias(x).abs().amax() > 1e-3


def test_constant_folds_into_plain_bias_without_zero_padding():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1, padding_mode="reflect"), nn.ReLU(), nn.Conv2d(6, 4, 3),
    )  # fmt: skip
    randomize_batchnorms(model)
    mask_channels(model[0], [0, 5])
    model.eval()
    compacted = compact(model)
    assert type(compacted[3]) is nn.Conv2d and compacted[3].in_channels == 6
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        assert relative_error(model(x), compacted(x)) < 1e-5


def test_zero_weight_channel_with_live_bias_is_removed_and_its_bias_folded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    with torch.no_grad():
        model[0].weight[2] = 0
        model[0].bias[2] = 0.7
    compacted = compact(model)
    assert compacted[2].in_channels == 7
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert relative_error(model(x), compacted(x)) < 1e-5


def test_finalized_model_compacts_like_the_masked_one():
    torch.manual_seed(0)
    model = small_vgg("vgg11", batch_norm=True)
    mask_half_of_every_conv(model, mask_batchnorm=True)
    model.eval()
    finalized = prunekit.finalize(prunekit.copy_model(model))
    from_masked, from_finalized = compact(model), compact(finalized)
    for key, value in from_masked.state_dict().items():
        assert torch.equal(value, from_finalized.state_dict()[key]), key


def test_input_model_is_left_untouched():
    torch.manual_seed(0)
    model = small_vgg("vgg11", batch_norm=True)
    mask_half_of_every_conv(model, mask_batchnorm=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compact(model, torch.randn(1, 3, 32, 32))
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert hasattr(model.features[0], "weight_mask") and model.training


def test_output_channels_are_kept_unless_asked():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(), nn.MaxPool2d(2))
    mask_channels(model[0], [0, 1])
    mask_channels(model[2], [2, 3])
    x = torch.randn(2, 3, 12, 12)
    kept = compact(model)
    assert (kept[0].out_channels, kept[2].out_channels) == (6, 6)
    pruned = compact(model, x, prune_output_channels=True)
    assert pruned[2].out_channels == 4
    with torch.no_grad():
        expected = model(x)
        assert kept(x).shape == expected.shape and relative_error(expected, kept(x)) < 1e-5
        assert relative_error(expected[:, [0, 1, 4, 5]], pruned(x)) < 1e-5


def test_all_channels_masked_keeps_one_and_stays_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    randomize_batchnorms(model)
    mask_channels(model[0], [0, 1, 2, 3])
    model.eval()
    compacted = compact(model)
    assert compacted[0].out_channels == 1
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert relative_error(model(x), compacted(x)) < 1e-5


class ViewHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(8 * 4, 5)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn(self.conv(x))))
        return self.fc(x.view(x.size(0), -1))


def test_view_flatten_before_linear_removes_feature_blocks():
    torch.manual_seed(0)
    model = ViewHead()
    randomize_batchnorms(model)
    mask_channels(model.conv, [1, 2, 7])
    model.eval()
    compacted = compact(model)
    assert compacted.fc.in_features == 5 * 4
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert relative_error(model(x), compacted(x)) < 1e-5


class Functional(nn.Module):
    """Functional and method calls between the convs, as a hand-written forward would use them."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.c1(x))), 2)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = F.dropout(F.pad(x, (1, 1, 1, 1), mode="reflect"), 0.1, training=self.training)
        x = F.avg_pool2d(torch.sigmoid(x) * 2.0 - 0.5, 3, 1)
        x = F.adaptive_avg_pool2d(self.c2(x).relu(), 2)
        return self.fc(torch.flatten(x, 1))


def test_functional_ops_between_convs_are_followed():
    torch.manual_seed(0)
    model = Functional()
    randomize_batchnorms(model)
    mask_channels(model.c1, [1, 3])
    mask_channels(model.c2, [0, 5, 6])
    model.eval()
    compacted = compact(model)
    assert (compacted.c2.in_channels, compacted.c2.out_channels, compacted.fc.in_features) == (6, 5, 20)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert relative_error(model(x), compacted(x)) < 1e-5


def adain_pair():
    encoder = nn.Sequential(
        nn.Conv2d(3, 3, 1), nn.ReflectionPad2d(1), nn.Conv2d(3, 8, 3), nn.ReLU(),
        nn.MaxPool2d(2, 2, ceil_mode=True), nn.ReflectionPad2d(1), nn.Conv2d(8, 16, 3), nn.ReLU(),
    )  # fmt: skip
    decoder = nn.Sequential(
        nn.ReflectionPad2d(1), nn.Conv2d(16, 8, 3), nn.ReLU(), nn.Upsample(scale_factor=2, mode="nearest"),
        nn.ReflectionPad2d(1), nn.Conv2d(8, 3, 3),
    )  # fmt: skip
    return encoder, decoder


def stylise(encoder, decoder, content, style):
    with torch.no_grad():
        return decoder(adain(encoder(content), encoder(style)))


def test_adain_encoder_decoder_pair_compacts_across_the_boundary():
    torch.manual_seed(0)
    encoder, decoder = adain_pair()
    mask_channels(encoder[2], [0, 3])
    mask_channels(encoder[6], [1, 5, 9, 10])
    with torch.no_grad():  # a dead channel with a live bias: a non-zero constant crosses AdaIN
        encoder[6].weight_orig[12] = 0
        encoder[6].bias_orig[12] = 0.5
    mask_channels(decoder[1], [2])
    small_encoder, small_decoder = compact_chain(encoder, decoder)
    assert small_encoder[6].out_channels == 11 and small_decoder[1].in_channels == 11
    content, style = torch.rand(2, 3, 15, 15), torch.rand(2, 3, 12, 12)
    expected = stylise(encoder, decoder, content, style)
    assert relative_error(expected, stylise(small_encoder, small_decoder, content, style)) < 1e-5


def test_style_transfer_example_encoder_and_decoder_compact_together():
    torch.manual_seed(0)
    encoder = build_encoder("random", width=0.125)
    decoder = build_decoder(encoder)
    for name, conv in prunekit.conv_layers(encoder).items():
        mask_channels(conv, torch.randperm(conv.out_channels)[: conv.out_channels // 4])
    small_encoder, small_decoder = compact_chain(encoder, decoder)
    last = small_encoder[19]
    assert last.out_channels == 48 and small_decoder[0].in_channels == 48
    content, style = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    expected = stylise(encoder, decoder, content, style)
    assert relative_error(expected, stylise(small_encoder, small_decoder, content, style)) < 1e-5


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.conv1(x)))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.left = nn.Conv2d(3, 4, 3)
        self.right = nn.Conv2d(3, 4, 3)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(torch.cat([self.left(x), self.right(x)], dim=1))


def residual_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), Residual(), nn.Conv2d(4, 2, 1))


@pytest.mark.parametrize(
    "build, layer",
    [
        (residual_model, "1.conv2"),
        (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3, groups=2)), "0"),
        (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 2, 1)), "2"),
        (lambda: nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Conv2d(8, 2, 1)), "0"),
    ],
    ids=["residual-add", "grouped-consumer", "depthwise", "grouped-producer"],
)
def test_channels_masked_in_part_of_their_group_are_refused_naming_the_layer(build, layer):
    torch.manual_seed(0)
    model = build()
    conv = model.get_submodule(layer)
    mask_channels(conv, [0, 1])
    with pytest.raises(UnsupportedGraphError, match=f"'{layer}'"):
        compact(model)


def test_residual_block_inner_conv_is_compacted():
    torch.manual_seed(0)
    model = residual_model()
    mask_channels(model[1].conv1, [1, 2])  # conv1 -> relu -> conv2 stays inside the block
    compacted = compact(model)
    assert compacted[1].conv1.out_channels == 2 and compacted[1].conv2.in_channels == 2
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert relative_error(model(x), compacted(x)) < 1e-5


def test_zero_padding_average_pool_with_nonzero_constant_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AvgPool2d(3, 1, padding=1), nn.Conv2d(4, 2, 1)
    )
    randomize_batchnorms(model)
    mask_channels(model[0], [0])
    model.eval()
    with pytest.raises(UnsupportedGraphError, match="AvgPool2d '2'"):
        compact(model)


def test_shared_module_is_refused():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bn, nn.Conv2d(4, 4, 3, padding=1), bn, nn.Conv2d(4, 2, 1))
    mask_channels(model[0], [1])
    with pytest.raises(UnsupportedGraphError, match="called 2 times"):
        compact(model)


def test_wrong_rebuild_is_caught_by_the_example_input_check(monkeypatch):
    module = sys.modules["prunekit.dependency.handlers.conv"]  # the conv handler's resize
    real = module.resize_conv

    def broken(conv, keep_in, keep_out, fold=None):
        new = real(conv, keep_in, keep_out, fold)
        with torch.no_grad():
            new.weight.mul_(1.01)
        return new

    monkeypatch.setattr(module, "resize_conv", broken)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    mask_channels(model[0], [0])
    with pytest.raises(RuntimeError, match="differs"):
        compact(model, torch.randn(1, 3, 8, 8))


def test_training_mode_and_requires_grad_are_kept():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    mask_channels(model[0], [0])
    model[2].requires_grad_(False)
    compacted = compact(model)
    assert compacted.training and compacted[0].training
    assert compacted[0].weight.requires_grad and not compacted[2].weight.requires_grad


def test_compacted_state_dict_loads_into_a_second_compaction():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    randomize_batchnorms(model)
    with torch.no_grad():
        model[1].bias[3], model[1].running_mean[3] = 2.0, 0.0  # a positive constant survives the ReLU
    mask_channels(model[0], [3])
    model.eval()
    first, second = compact(model), compact(model)
    with torch.no_grad():
        second[3].border_weight.zero_()
    second.load_state_dict(first.state_dict())
    x = torch.randn(1, 3, 7, 7)
    with torch.no_grad():
        assert torch.equal(first(x), second(x))


def test_report_counts_params_and_macs_before_and_after():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    mask_channels(model[0], [0, 1, 2, 3])
    report = compaction_report(model, compact(model), (3, 10, 10))
    # 8x8 and 6x6 outputs: 3*9 MACs per output of conv 0, 8*9 (then 4*9) per output of conv 2.
    assert report.macs_before == 8 * 64 * 27 + 4 * 36 * 72
    assert report.macs_after == 4 * 64 * 27 + 4 * 36 * 36
    assert (report.params_before, report.params_after) == (8 * 28 + 4 * 73, 4 * 28 + 4 * 37)
    assert "total" in str(report) and report.to_dict()["macs_ratio"] == report.macs_ratio


def batchnorm_constant_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))
    with torch.no_grad():
        model[1].bias.fill_(1.0)  # masked channels leave the BatchNorm as relu(1.0 - ...) > 0
    mask_channels(model[0], [2])
    return model


def test_training_mode_with_batchnorm_constants_warns():
    with pytest.warns(UserWarning, match="eval mode"):
        compact(batchnorm_constant_model())


def test_eval_mode_or_masked_batchnorm_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compact(batchnorm_constant_model().eval())
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3))
        mask_channels(model[0], [2], batchnorm=model[1])
        compact(model)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_compaction_passes_its_own_check_and_a_wrong_one_does_not(dtype):
    import sys

    check = sys.modules["prunekit.compact"]._check_equal
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1),
    ).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    for name, conv in list(prunekit.conv_layers(model).items())[:2]:
        prunekit.channel_activation(conv, torch.rand(conv.out_channels), amount=0.5)
    model = model.to(dtype)
    x = torch.rand(2, 3, 24, 24, dtype=dtype)
    small = prunekit.compact(model, x)  # would raise "a prunekit bug" with float32's tolerance
    with torch.no_grad():
        expected, actual = model(x), small(x)
    rtol = sys.modules["prunekit.compact"].check_tolerance(dtype)
    assert float((expected.double() - actual.double()).norm() / expected.double().norm()) <= rtol
    with pytest.raises(RuntimeError, match=f"allowed .* in {dtype}"):
        check(expected, expected * (1 + 3 * rtol))


def _border_bias_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1)
    )
    randomize_batchnorms(model)
    mask_channels(model[0], [1, 4, 6])
    compacted = compact(model.eval())
    assert any(isinstance(m, BorderBiasConv2d) for m in compacted.modules())
    return model, compacted


def test_compacted_model_with_border_bias_exports_and_matches_at_other_sizes():
    model, compacted = _border_bias_model()
    x = torch.randn(2, 3, 9, 11)
    height, width = torch.export.Dim("height", min=4, max=64), torch.export.Dim("width", min=4, max=64)
    batch = torch.export.Dim("batch", min=2, max=8)
    exported = torch.export.export(compacted, (x,), dynamic_shapes=({0: batch, 2: height, 3: width},))
    for shape in [(2, 3, 9, 11), (2, 3, 16, 5), (3, 3, 7, 30)]:  # the border correction follows each size
        y = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(exported.module()(y), model(y))
    state_before = {k: v.clone() for k, v in compacted.state_dict().items()}
    with torch.no_grad():
        compacted(torch.randn(1, 3, 13, 7))
    assert all(torch.equal(v, state_before[k]) for k, v in compacted.state_dict().items())  # forward writes nothing
    assert "_border_cache" not in compacted[3].state_dict() and "_border_cache" not in str(exported.graph)


def test_the_kept_border_bias_follows_sizes_and_in_place_weight_changes():
    model, compacted = _border_bias_model()
    conv = compacted[3]
    for shape in [(1, 3, 9, 11), (1, 3, 12, 6), (1, 3, 9, 11)]:
        y = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(compacted(y), model(y))
    with torch.no_grad():
        conv.border_weight.mul_(2)  # an in-place change: the kept correction must not be reused
        y = torch.randn(1, 3, 9, 11)
        expected = torch.nn.Conv2d.forward(conv, compacted[:3](y)) + conv.border_bias(compacted[:3](y)).float()
        torch.testing.assert_close(compacted(y), expected)


def test_concurrent_forwards_of_a_compacted_model_agree():
    from concurrent.futures import ThreadPoolExecutor

    model, compacted = _border_bias_model()
    inputs = [torch.randn(1, 3, 8 + i % 5, 9 + i % 3) for i in range(24)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
        with ThreadPoolExecutor(max_workers=4) as pool:
            outputs = list(pool.map(compacted, inputs))
    for want, got in zip(expected, outputs):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "kwargs",
    [dict(padding=1), dict(padding=2, stride=2), dict(padding=(1, 2), dilation=(2, 1), stride=(1, 3)),
     dict(padding="same", dilation=2), dict(padding="same")],
    ids=["pad1", "stride2", "mixed", "same-dilated", "same"],
)
def test_border_bias_equals_the_constant_channels_response_at_every_position(kwargs):
    torch.manual_seed(0)
    conv = BorderBiasConv2d(2, 4, 3 if kwargs.get("padding") == "same" else (3, 4), **kwargs)
    with torch.no_grad():
        conv.border_weight.normal_()
    # What a constant 1 input channel with kernel border_weight contributes, minus its interior value.
    taps = conv.border_weight.double()
    full = torch.nn.functional.conv2d(torch.ones(1, 1, 9, 11, dtype=torch.float64), taps, None, conv.stride, conv.padding, conv.dilation)
    expected = full - taps.sum(dim=(1, 2, 3)).view(1, -1, 1, 1)
    torch.testing.assert_close(conv.border_bias(torch.zeros(1, 2, 9, 11)), expected, rtol=0, atol=1e-12)
