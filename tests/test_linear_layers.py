"""nn.Linear layers in fine-grained plans and scans: an MLP's and a ViT's weights."""

import pytest
import torch
import torchvision
from torch import nn

import prunekit
from prunekit.sensitivity import OutputDistortion, scan
from prunekit.sensitivity.scanner import SuffixFallbackWarning


def small_vit() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=4
    ).eval()


def test_a_vits_zero_initialised_head_is_warned_about():
    from prunekit.sensitivity.metrics import ZeroOutputWarning

    with pytest.warns(ZeroOutputWarning, match="zero-initialised head"):
        scan(small_vit(), OutputDistortion(torch.randn(2, 3, 32, 32)), layers=["conv_proj"], sparsities=[0.5],
             progress=False)


def test_a_fine_grained_scan_covers_a_vits_linear_layers_and_its_plan_applies():
    model = small_vit()
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-initialises the head
    metric = OutputDistortion(torch.randn(2, 3, 32, 32))
    # nn.MultiheadAttention reads out_proj's weight without calling it: no cut there, full forwards instead.
    with pytest.warns(SuffixFallbackWarning, match="out_proj.*its weight read directly"):
        result = scan(model, metric, sparsities=[0.5, 0.9], progress=False)
    layers = result.layers
    assert "conv_proj" in layers and "heads.head" in layers
    assert "encoder.layers.encoder_layer_0.mlp.0" in layers and "encoder.layers.encoder_layer_0.mlp.3" in layers
    assert all(result.scores[layer][1] > result.scores[layer][0] for layer in ("heads.head", "encoder.layers.encoder_layer_0.mlp.0"))
    pruned = prunekit.apply_plan(prunekit.copy_model(model), {"encoder.layers.encoder_layer_0.mlp.0": 0.75})
    weight = pruned.get_submodule("encoder.layers.encoder_layer_0.mlp.0").weight
    assert float((weight == 0).float().mean()) == pytest.approx(0.75)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def conv_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 6), nn.ReLU(), nn.Linear(6, 2)).eval()


def test_channel_methods_prune_a_named_linears_output_features_and_compact_removes_them():
    model, x = conv_mlp(), torch.randn(2, 3, 6, 6)
    prunekit.apply_plan(model, {"3": 0.5}, method="filter-norm")
    rows = (model[3].weight == 0).all(1)
    assert int(rows.sum()) == 3 and torch.equal(model[3].bias == 0, rows)
    with torch.no_grad():
        expected = model(x)
    small = prunekit.compact(model, x)
    assert (small[3].out_features, small[5].in_features) == (3, 3)
    with torch.no_grad():
        torch.testing.assert_close(small(x), expected)
    prunekit.apply_plan(model, {"5": 0.5})  # fine-grained prunes a Linear's weights
    assert float((model[5].weight == 0).float().mean()) == pytest.approx(0.5)


def test_channel_scans_cover_the_convs_unless_linears_are_named():
    from prunekit.methods.registry import get_method

    model, pruning = conv_mlp(), get_method("filter-norm")
    assert list(pruning.layers_of(model)) == ["0"]  # a classifier is never pruned unasked
    assert list(pruning.layers_of(model, ["3"])) == ["3"]
    assert pruning.data_layers(model) == ["0"]
    with pytest.raises(KeyError, match="unknown layer '1'; Conv2d, Linear or MultiheadAttention layers are: 0, 3, 5"):
        pruning.layers_of(model, ["1"])


def test_a_linears_channel_stats_read_every_token_of_an_image_after_its_activation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    x = torch.randn(6, 5, 3)  # 6 images of 5 tokens
    stats = prunekit.collect_channel_stats(model, [x[:4], x[4:]], layers=["0"])["0"]
    with torch.no_grad():
        response = model(x)  # [6, 5, 4]
    torch.testing.assert_close(stats.l2, response.norm(dim=1).mean(0))
    torch.testing.assert_close(stats.per_image_l0, (response != 0).any(dim=1).to(torch.uint8))
    with pytest.raises(ValueError, match=r"expected a batched \[N, \.\.\., 4\] response"):
        prunekit.collect_channel_stats(model, [x[0, 0]], layers=["0"])  # one unbatched token
