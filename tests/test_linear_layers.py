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


def test_channel_methods_still_plan_convs_only():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    with pytest.raises(KeyError, match="unknown layer '2'; conv layers are: 0"):
        prunekit.apply_plan(model, {"2": 0.5}, method="filter-norm")
    prunekit.apply_plan(model, {"2": 0.5})  # fine-grained prunes the Linear
    assert float((model[2].weight == 0).float().mean()) == pytest.approx(0.5)
