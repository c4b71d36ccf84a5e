"""Channel groups: coupled channels (residual additions, concatenation, grouped convs, gates, MLPs) removed exactly."""

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import prune

import prunekit
from prunekit.compact import UnsupportedGraphError, check_tolerance, compact
from prunekit.dependency import channel_groups, group_of, unit_masks
from prunekit.measure.macs import count_macs
from prunekit.sensitivity.metrics import relative_error
from prunekit.testing import randomize_batchnorms, randomize_layer_norms


def mask_layer(layer: nn.Module, keep: torch.Tensor) -> None:
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    if isinstance(layer, nn.ConvTranspose2d):
        shape = (1, -1, 1, 1)  # its weight is [in, out, kh, kw]
    prune.custom_from_mask(layer, "weight", keep.view(shape).expand_as(layer.weight))
    if layer.bias is not None:
        prune.custom_from_mask(layer, "bias", keep)


def mask_units(model: nn.Module, fraction: float = 0.5) -> None:
    """Mask the lowest-L1 ``fraction`` of every group's removable units (all members at once)."""
    for group in channel_groups(model):
        removable = list(group.removable_units)
        count = int(len(removable) * fraction)
        if count == 0:
            continue
        scores = torch.tensor([
            sum(float(_out_weight(model.get_submodule(name))[list(ch)].abs().sum()) for name, ch in group.units[k].channels.items())
            for k in removable
        ])
        drop = [removable[i] for i in scores.argsort()[:count].tolist()]
        for name, keep in unit_masks(model, group, drop).items():
            mask_layer(model.get_submodule(name), keep)


def _out_weight(layer: nn.Module) -> torch.Tensor:
    weight = layer.weight.detach()
    return weight.transpose(0, 1) if isinstance(layer, nn.ConvTranspose2d) else weight


def total_macs(model: nn.Module, shape) -> int:
    return sum(dense for dense, _ in count_macs(model, shape).values())


def compact_exactly(masked: nn.Module, x: torch.Tensor) -> nn.Module:
    """``compact(masked, x)``, asserted to compute what ``masked`` computes on ``x`` within the dtype's tolerance."""
    with torch.no_grad():
        expected = masked(x)
    small = compact(masked, x)
    with torch.no_grad():
        assert relative_error(small(x), expected) <= check_tolerance(x.dtype)
    return small


def assert_compacts_exactly(model: nn.Module, x: torch.Tensor, fraction: float = 0.5) -> nn.Module:
    model.eval()
    mask_units(model, fraction)
    small = compact_exactly(model, x)
    assert total_macs(small, x.shape) < 0.8 * total_macs(model, x.shape)
    return small


class ResidualStream(nn.Module):
    """stem -> two residual blocks -> head: stem and both blocks' last convs share one channel set."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.a1, self.a2 = nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(6, 8, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(6, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.a2(torch.relu(self.a1(x))))
        x = x + self.b2(torch.relu(self.b1(x)))
        return self.head(self.bn(x))


def test_residual_stream_is_one_group_and_compacts_when_every_member_is_masked():
    torch.manual_seed(0)
    model = ResidualStream()
    randomize_batchnorms(model)
    stream = group_of(channel_groups(model), "stem.0")
    assert stream.members == ("stem.0", "a2", "b2")
    assert len(stream.units) == 8 and stream.units[3].channels == {"stem.0": (3,), "a2": (3,), "b2": (3,)}
    assert any("add" in node for node in stream.joined_by)
    small = assert_compacts_exactly(model, torch.randn(2, 3, 10, 10))
    assert small.stem[0].out_channels == small.a2.out_channels == small.head.in_channels == 4
    assert small.bn.num_features == 4 and small.a1.in_channels == 4


def test_residual_channels_masked_in_one_branch_only_are_refused_naming_both_sides():
    torch.manual_seed(0)
    model = ResidualStream().eval()
    keep = torch.ones(8, dtype=torch.bool)
    keep[[1, 2]] = False
    mask_layer(model.a2, keep)
    with pytest.raises(UnsupportedGraphError, match=r"dead 'a2' channels 1, 2.*add.*'stem.0' channels 1, 2.*not dead"):
        compact(model)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.left = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.right = nn.Conv2d(3, 5, 3)
        self.head = nn.Conv2d(9, 2, 1)

    def forward(self, x):
        return self.head(torch.cat([self.left(x), self.right(x)], dim=1))


def test_concatenation_keeps_each_producers_offsets_and_folds_its_constants():
    torch.manual_seed(0)
    model = Concat()
    randomize_batchnorms(model)
    groups = channel_groups(model)
    assert [g.members for g in groups] == [("left.0",), ("right",), ("head",)]
    model.eval()
    keep = torch.tensor([True, False, True, True])
    mask_layer(model.left[0], keep)
    mask_layer(model.right, torch.tensor([True, True, False, True, False]))
    x = torch.randn(1, 3, 9, 9)
    with torch.no_grad():
        expected = model(x)
    small = compact(model, x)
    assert small.head.in_channels == 6 and small.left[1].num_features == 3
    torch.testing.assert_close(small(x), expected)


class Inverted(nn.Module):
    """MobileNet's expand -> depthwise -> squeeze-and-excitation -> project, with a residual."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(6, 12, 1), nn.BatchNorm2d(12), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.BatchNorm2d(12), nn.Hardswish())
        self.squeeze, self.excite = nn.Conv2d(12, 4, 1), nn.Conv2d(4, 12, 1)
        self.project = nn.Sequential(nn.Conv2d(12, 6, 1), nn.BatchNorm2d(6))

    def forward(self, x):
        y = self.depthwise(self.expand(x))
        gate = torch.sigmoid(self.excite(torch.relu(self.squeeze(nn.functional.adaptive_avg_pool2d(y, 1)))))
        return x + self.project(y * gate)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.block = Inverted()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.block(self.stem(x)), 1), 1))


def test_depthwise_conv_and_excitation_gate_join_the_channels_they_scale():
    torch.manual_seed(0)
    model = Net()
    randomize_batchnorms(model)
    groups = channel_groups(model)
    assert group_of(groups, "block.expand.0").members == ("block.expand.0", "block.depthwise.0", "block.excite")
    assert group_of(groups, "stem").members == ("stem", "block.project.0")
    small = assert_compacts_exactly(model, torch.randn(2, 3, 8, 8))
    assert small.block.depthwise[0].groups == small.block.depthwise[0].out_channels == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_coupled_groups_compact_within_each_dtypes_tolerance(dtype):
    torch.manual_seed(0)
    model = Net()
    randomize_batchnorms(model)
    assert_compacts_exactly(model.to(dtype), torch.randn(2, 3, 8, 8, dtype=dtype))


def test_grouped_conv_loses_whole_groups():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=4),
        nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1),
    )
    randomize_batchnorms(model)
    group = group_of(channel_groups(model), "0")
    assert group.members == ("0", "3") and len(group.units) == 4
    assert group.units[1].channels == {"0": (2, 3), "3": (2, 3)}
    small = assert_compacts_exactly(model, torch.randn(1, 3, 6, 6))
    assert small[3].groups == 2 and small[3].in_channels == small[3].out_channels == 4


def test_hidden_units_of_an_mlp_are_removed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    assert [g.members for g in channel_groups(model)] == [("1",), ("3",), ("5",)]
    assert channel_groups(model)[2].fixed_reasons == ("reaches the model output",)
    small = assert_compacts_exactly(model, torch.randn(4, 3, 2, 2))
    assert (small[1].out_features, small[3].in_features, small[3].out_features, small[5].in_features) == (8, 8, 8, 8)


class Split(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        left, right = self.stem(x).chunk(2, dim=1)
        return self.head(torch.cat([left, self.branch(right)], dim=1))


class Shuffle(nn.Module):
    """ShuffleNet's channel shuffle after a concatenation."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.branch(x)], dim=1)
        n, c, h, w = x.shape
        return self.head(x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w))


def test_a_split_and_a_channel_shuffle_fix_the_channels_they_touch_naming_the_node():
    torch.manual_seed(0)
    plain = group_of(channel_groups(Split()), "stem")
    # chunk() splits at a fixed size in the forward's code: removing a channel would move the split.
    assert plain.removable_units == () and "chunk() (graph node 'chunk')" in plain.fixed_reasons[0]
    shuffled = channel_groups(Shuffle())
    assert "tensor.view() (graph node 'view')" in group_of(shuffled, "branch.0").fixed_reasons[0]
    model = Shuffle().eval()
    mask_layer(model.branch[0], torch.tensor([False, True, True, True]))
    with pytest.raises(UnsupportedGraphError, match=r"'branch.0' channel 0: tensor.view\(\) \(graph node 'view'\) is not supported"):
        compact(model)


def test_unit_masks_refuse_a_fixed_unit_and_group_of_suggests_names():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    groups = channel_groups(model)
    with pytest.raises(ValueError, match="reaches the model output"):
        unit_masks(model, groups[1], [0])
    with pytest.raises(KeyError, match="did you mean '2'"):
        group_of(groups, "2.")
    assert prunekit.channel_groups(model)[0].members == ("0",)


def small_unet() -> nn.Module:
    class UNet(nn.Module):
        def __init__(self):
            super().__init__()

            self.enc1, self.enc2, self.mid = unet_block(3, 8), unet_block(8, 16), unet_block(16, 16)
            self.dec2, self.dec1 = unet_block(32, 8), unet_block(16, 8)
            self.out = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            e1 = self.enc1(x)
            e2 = self.enc2(nn.functional.max_pool2d(e1, 2))
            m = self.mid(nn.functional.max_pool2d(e2, 2))
            d2 = self.dec2(torch.cat([nn.functional.interpolate(m, size=e2.shape[-2:]), e2], 1))
            d1 = self.dec1(torch.cat([nn.functional.interpolate(d2, scale_factor=2.0), e1], 1))
            return self.out(d1)

    return UNet()


def unet_block(cin: int, cout: int) -> nn.Sequential:
    """A U-Net stage: 3x3 conv, BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class TransposedUNet(nn.Module):
    """A U-Net that upsamples with ConvTranspose2d (its BatchNorms masked with the convs: see the test)."""

    def __init__(self):
        super().__init__()

        self.enc1, self.enc2, self.mid = unet_block(3, 8), unet_block(8, 16), unet_block(16, 16)
        self.up2, self.up1 = nn.ConvTranspose2d(16, 16, 2, stride=2), nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.dec2, self.dec1 = unet_block(32, 8), unet_block(16, 8)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(nn.functional.max_pool2d(e1, 2))
        m = self.mid(nn.functional.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))
        return self.out(self.dec1(torch.cat([self.up1(d2), e1], 1)))


def test_a_unet_with_transposed_convs_compacts_once_its_constants_are_zero():
    torch.manual_seed(0)
    model = TransposedUNet()
    randomize_batchnorms(model)
    model.eval()
    plan = {name: 0.5 for name in prunekit.conv_layers(model) if name != "out"}
    masked = prunekit.apply_plan(prunekit.copy_model(model), plan, method="filter-norm")  # convs and their BatchNorms
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        expected = masked(x)
    small = compact(masked, x)
    assert small.up2.in_channels == 8 and small.up1.in_channels == 4 and small.mid[0].out_channels == 8
    torch.testing.assert_close(small(x), expected)
    # A transposed conv's own output channels go too (their constant, its bias, folds into the next conv).
    upsampled = prunekit.copy_model(model)
    keep = torch.ones(16, dtype=torch.bool)
    keep[[1, 5, 9]] = False
    mask_layer(upsampled.up2, keep)
    with torch.no_grad():
        expected = upsampled(x)
    small = compact(upsampled, x)
    assert small.up2.out_channels == 13 and small.dec2[0].in_channels == 29
    torch.testing.assert_close(small(x), expected)
    bn_kept = prunekit.copy_model(model)
    keep = torch.ones(16, dtype=torch.bool)
    keep[:4] = False
    mask_layer(bn_kept.mid[0], keep)  # the conv alone: its BatchNorm turns the dead channels into constants
    with pytest.raises(UnsupportedGraphError, match="ConvTranspose2d 'up2': they carry non-zero constants"):
        compact(bn_kept)


def _torchvision(name: str, **kwargs):
    return lambda: getattr(torchvision.models, name)(**kwargs)


def _vgg(name: str):
    """A torchvision VGG whose classifier keeps its shape (flatten -> Linear -> ReLU -> Dropout, three times) at
    64 hidden units instead of 4096: the features' channels still meet the flattened first Linear, without
    copying 120M classifier weights on every mask and compact."""

    def build() -> nn.Module:
        model = getattr(torchvision.models, name)()
        model.classifier[0] = nn.Linear(512 * 7 * 7, 64)
        model.classifier[3] = nn.Linear(64, 64)
        model.classifier[6] = nn.Linear(64, 10)
        return model

    return build


def _adain_pair():
    from examples.style_transfer.adain import build_decoder, build_encoder

    encoder = build_encoder("random", width=0.25)
    return nn.Sequential(encoder, build_decoder(encoder))


FAST = {
    "resnet18": (_torchvision("resnet18"), 64),
    "mobilenet_v2": (_torchvision("mobilenet_v2"), 64),
    "efficientnet_b0": (_torchvision("efficientnet_b0"), 64),
    "densenet121": (_torchvision("densenet121"), 64),
    "squeezenet1_1": (_torchvision("squeezenet1_1"), 64),
    "shufflenet_v2_x0_5": (_torchvision("shufflenet_v2_x0_5"), 64),
    "hed": (prunekit.HED, 64),
    "adain-encoder-decoder": (_adain_pair, 32),
    "unet": (small_unet, 32),
}
SLOW = {
    "resnet34": (_torchvision("resnet34"), 64),
    "resnet50": (_torchvision("resnet50"), 64),
    "mobilenet_v3_large": (_torchvision("mobilenet_v3_large"), 64),
    "regnet_x_400mf": (_torchvision("regnet_x_400mf"), 64),
    "googlenet": (_torchvision("googlenet", aux_logits=False, init_weights=False), 64),
    **{name: (_vgg(name), 32) for name in ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")},
}


@pytest.mark.parametrize(
    "name",
    list(FAST) + [pytest.param(name, marks=pytest.mark.slow) for name in SLOW],
)
def test_every_common_cnn_compacts_exactly_with_half_of_each_groups_channels(name):
    build, size = {**FAST, **SLOW}[name]
    torch.manual_seed(0)
    model = build()
    randomize_batchnorms(model)
    assert_compacts_exactly(model, torch.rand(1, 3, size, size))


def assert_plan_compacts_exactly(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """``apply_plan`` at half of every removable group (``uniform_plan``), then ``compact``: exact and smaller."""
    model.eval()
    plan = prunekit.uniform_plan(model, 0.5, "filter-norm")
    assert plan, "no removable group"
    pruned = prunekit.apply_plan(prunekit.copy_model(model), plan, method="filter-norm")
    small = compact_exactly(pruned, x)
    assert total_macs(small, x.shape) < 0.8 * total_macs(model, x.shape)
    return small


NEWER = {
    "convnext_tiny": (_torchvision("convnext_tiny"), 64),
    "regnet_y_400mf": (_torchvision("regnet_y_400mf"), 64),
}
NEWER_SLOW = {
    "efficientnet_v2_s": (_torchvision("efficientnet_v2_s"), 64),
    "swin_t": (_torchvision("swin_t"), 64),  # its MLPs' hidden units; the stage widths wait for roll() and windows
    "vit_b_16": (lambda: _random_head(torchvision.models.vit_b_16(image_size=32)), 32),  # MLP units and heads
}


def _random_head(model: nn.Module) -> nn.Module:
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-initialises a ViT's head: its output would be 0
    return model


@pytest.mark.parametrize(
    "name",
    ["resnet18", "mobilenet_v2", "efficientnet_b0", "squeezenet1_1", "hed", "adain-encoder-decoder", "unet"]
    + list(NEWER) + [pytest.param(name, marks=pytest.mark.slow) for name in [*NEWER_SLOW, "densenet121", "googlenet",
                                                                             "mobilenet_v3_large", "vgg16_bn"]],
)
def test_a_plan_at_half_of_every_removable_group_compacts_exactly(name):
    build, size = {**FAST, **SLOW, **NEWER, **NEWER_SLOW}[name]
    torch.manual_seed(0)
    model = build()
    randomize_batchnorms(model)
    randomize_layer_norms(model, seed=0)
    assert_plan_compacts_exactly(model, torch.rand(1, 3, size, size))


def test_report_groups_lists_coupled_layers_and_what_is_fixed():
    import json

    from click.testing import CliRunner

    from prunekit.cli import cli

    result = CliRunner().invoke(cli, ["report", "resnet18", "--groups"])
    assert result.exit_code == 0, result.output
    assert "13 channel groups (4 coupling several layers)" in result.output
    assert "conv1: 3 layers, 64/64 units removable (conv1, layer1.0.conv2, layer1.1.conv2)" in result.output
    assert "fc: 1 layer, 0/1000 units removable; fixed: reaches the model output" in result.output
    as_json = json.loads(CliRunner().invoke(cli, ["report", "resnet18", "--groups", "--json"]).output)
    assert as_json["groups"][0]["members"] == ["conv1", "layer1.0.conv2", "layer1.1.conv2"]


class MeanPooled(nn.Module):
    """timm-style heads: global average pooling written as x.mean(...), with and without keepdim."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.squeeze, self.excite = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        x = x * torch.sigmoid(self.excite(torch.relu(self.squeeze(torch.mean(x, [2, 3], keepdim=True)))))
        return self.head(x.mean((2, 3)))


def test_global_average_pooling_written_as_a_mean_is_followed():
    torch.manual_seed(0)
    model = MeanPooled()
    randomize_batchnorms(model)
    assert group_of(channel_groups(model), "stem.0").members == ("stem.0", "excite")
    small = assert_compacts_exactly(model, torch.randn(2, 3, 8, 8))
    assert small.head.in_features == 4 and small.squeeze.in_channels == 4
