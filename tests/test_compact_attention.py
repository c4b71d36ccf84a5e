"""Attention heads: nn.MultiheadAttention's heads are channel units, removed exactly by compact."""

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import prune

from prunekit.compact import UnsupportedGraphError, check_tolerance, compact
from prunekit.dependency import channel_groups, group_of, unit_masks
from prunekit.dependency.pruned_attention import PrunedMultiheadAttention
from prunekit.io.compacted import compacted_checkpoint, rebuild_compacted
from prunekit.measure.error import relative_error

HEADS, HIDDEN = 4, 32


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=HEADS,
                                                 hidden_dim=HIDDEN, mlp_dim=64, num_classes=5).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-initialises the head
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(std=0.2)  # value biases a removed head leaves behind
    return model


def attention_groups(model: nn.Module):
    return [g for g in channel_groups(model) if g.name.endswith("self_attention")]


def mask_heads(model: nn.Module, heads, with_bias: bool = True) -> None:
    """Mask ``heads`` (unit indices) of every attention: their query, key and value rows (and biases)."""
    for group in attention_groups(model):
        for name, keep in unit_masks(model, group, list(heads)).items():
            attention = model.get_submodule(name)
            prune.custom_from_mask(attention, "in_proj_weight", keep[:, None].expand_as(attention.in_proj_weight))
            if with_bias:
                prune.custom_from_mask(attention, "in_proj_bias", keep)


def test_each_head_of_a_vits_attention_is_one_removable_unit_of_its_query_key_and_value_rows():
    model = tiny_vit()
    groups = attention_groups(model)
    assert [g.name for g in groups] == [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(2)]
    head_dim = HIDDEN // HEADS
    for group in groups:
        assert len(group.units) == HEADS and len(group.removable_units) == HEADS
        rows = group.units[1].channels[group.name]
        assert rows == tuple(part * HIDDEN + head_dim + d for part in range(3) for d in range(head_dim))
    # The residual stream (out_proj's outputs) stays, with the reason.
    stream = group_of(channel_groups(model), "encoder.layers.encoder_layer_0.mlp.3")
    assert not stream.removable_units


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias-masked", "value-bias-folded"])
def test_compact_removes_masked_heads_exactly_and_the_attention_keeps_its_embed_dim(with_bias):
    model, x = tiny_vit(), torch.randn(3, 3, 32, 32)
    mask_heads(model, [0, 2], with_bias=with_bias)
    with torch.no_grad():
        expected = model(x)
    small = compact(model, x)
    for i in range(2):
        attention = small.get_submodule(f"encoder.layers.encoder_layer_{i}.self_attention")
        assert isinstance(attention, PrunedMultiheadAttention)
        assert (attention.embed_dim, attention.num_heads, attention.head_dim) == (HIDDEN, 2, HIDDEN // HEADS)
        assert tuple(attention.in_proj_weight.shape) == (3 * 16, HIDDEN) and attention.out_proj.in_features == 16
    with torch.no_grad():
        error = relative_error(small(x), expected)
    assert error <= check_tolerance(torch.float32)
    assert isinstance(model.encoder.layers[0].self_attention, nn.MultiheadAttention)  # the input is unchanged
    # Compacted again, with more heads gone.
    mask_heads(small, [0], with_bias=with_bias)
    with torch.no_grad():
        again_expected = small(x)
    smaller = compact(small, x)
    assert smaller.encoder.layers[1].self_attention.num_heads == 1
    with torch.no_grad():
        assert relative_error(smaller(x), again_expected) <= check_tolerance(torch.float32)


def test_a_head_masked_in_part_is_refused_naming_the_attention():
    model = tiny_vit()
    attention = model.encoder.layers[0].self_attention
    keep = torch.ones(3 * HIDDEN, dtype=torch.bool)
    keep[2 * HIDDEN: 2 * HIDDEN + HIDDEN // HEADS] = False  # head 0's value rows only
    prune.custom_from_mask(attention, "in_proj_weight", keep[:, None].expand_as(attention.in_proj_weight))
    with pytest.raises(UnsupportedGraphError, match="encoder_layer_0.self_attention.*not dead"):
        compact(model)


class Attending(nn.Module):
    """A query Linear into an attention: cross-attention, kdim/vdim, or bias_k/bias_v."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.query, self.memory = nn.Linear(8, 8), nn.Linear(8, 4 if kind == "kdim" else 8)
        options = {"kdim": {"kdim": 4, "vdim": 4}, "bias_kv": {"add_bias_kv": True}}.get(kind, {})
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True, **options)

    def forward(self, x):
        q = self.query(x)
        if self.kind == "bias_kv":
            return self.attention(q, q, q)[0]
        memory = self.memory(x)
        return self.attention(q, memory, memory)[0]


@pytest.mark.parametrize("kind, reason", [
    ("cross", "attends to another tensor than its query"),
    ("kdim", "separate query, key and value weights"),
    ("bias_kv", "adds bias_k/bias_v"),
])
def test_attentions_prunekit_does_not_follow_keep_their_heads_with_the_reason(kind, reason):
    groups = channel_groups(Attending(kind))
    assert "attention" not in [g.name for g in groups]  # no heads offered
    query = group_of(groups, "query")
    assert not query.removable_units and any(reason in r for r in query.fixed_reasons), query.fixed_reasons


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal within the dtype's rounding: torch.testing's tolerances in float32; in fp16 / bf16 (two kernels round
    each step differently, so single near-zero outputs differ by an ulp of the output's scale) the relative L2
    error compact's self-check allows."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if expected.dtype == torch.float32:
        torch.testing.assert_close(actual, expected)
    else:
        assert relative_error(actual.float(), expected.float()) <= check_tolerance(expected.dtype)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pruned_attention_with_every_head_computes_what_multihead_attention_does(batch_first, dtype):
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    with torch.no_grad():
        reference.in_proj_bias.normal_()
        reference.out_proj.bias.normal_()
    from prunekit.dependency.handlers.attention import resize_attention

    pruned = resize_attention(reference, None, None).eval()
    reference, pruned = reference.to(dtype), pruned.to(dtype)
    x = torch.randn(2, 6, 16, dtype=dtype)
    if not batch_first:
        x = x.transpose(0, 1).contiguous()
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, -2:] = True
    causal = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)
    additive = torch.randn(8, 6, 6).masked_fill(causal, float("-inf")).to(dtype)
    additive_padding = torch.zeros(2, 6).masked_fill(padding, float("-inf")).to(dtype)
    with torch.no_grad():
        for kwargs in ({"need_weights": False}, {}, {"average_attn_weights": False},
                       {"key_padding_mask": padding, "need_weights": False}, {"attn_mask": causal},
                       {"attn_mask": additive, "key_padding_mask": additive_padding}):
            expected, expected_weights = reference(x, x, x, **kwargs)
            actual, weights = pruned(x, x, x, **kwargs)
            close(actual, expected)
            if expected_weights is None:
                assert weights is None
            else:
                close(weights, expected_weights)
        unbatched = x[0] if batch_first else x[:, 0]
        close(pruned(unbatched, unbatched, unbatched)[0], reference(unbatched, unbatched, unbatched)[0])


def test_a_vit_with_heads_removed_round_trips_through_a_compacted_checkpoint_and_exports():
    model, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    mask_heads(model, [1, 3], with_bias=False)
    small = compact(model, x)
    document = compacted_checkpoint(small, arch=None)
    record = document["layers"]["encoder.layers.encoder_layer_0.self_attention"]
    assert record == {"type": "PrunedMultiheadAttention", "arguments": {
        "embed_dim": HIDDEN, "num_heads": 2, "head_dim": HIDDEN // HEADS, "bias": True, "dropout": 0.0,
        "batch_first": True}}
    assert "encoder.layers.encoder_layer_0.self_attention.out_proj" not in document["layers"]
    rebuilt = rebuild_compacted(tiny_vit(), document, "vit.pt").eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), small(x))
    exported = torch.export.export(small, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), small(x))


def test_a_damaged_attention_record_is_refused_naming_it():
    model, x = tiny_vit(), torch.randn(1, 3, 32, 32)
    mask_heads(model, [0])
    document = compacted_checkpoint(compact(model, x), arch=None)
    document["layers"]["encoder.layers.encoder_layer_1.self_attention"]["arguments"]["dropout"] = 7.0
    with pytest.raises(ValueError, match="encoder_layer_1.self_attention.*dropout is 7.0"):
        rebuild_compacted(tiny_vit(), document, "vit.pt")


# --- channel methods over heads ---------------------------------------------------------------------------------


def _prepared(name: str, model: nn.Module, layers):
    from prunekit.methods.registry import get_method

    batches = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    return get_method(name).prepare(model, batches, layers=layers)


@pytest.mark.parametrize("method", ["filter-norm", "channel", "taylor"])
def test_a_plan_at_half_of_every_group_removes_half_of_every_attentions_heads_exactly(method):
    import prunekit

    model, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = prunekit.uniform_plan(model, 0.5, method)
    attentions = [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(2)]
    assert all(plan.get(name) == 0.5 for name in attentions), plan
    pruning = _prepared(method, model, list(plan))
    pruned = prunekit.apply_plan(prunekit.copy_model(model), plan, method=pruning)
    for name in attentions:
        attention = pruned.get_submodule(name)
        dead_rows = (attention.in_proj_weight == 0).all(1)
        assert int(dead_rows.sum()) == 3 * HIDDEN // 2 and torch.equal(attention.in_proj_bias == 0, dead_rows)
    with torch.no_grad():
        expected = pruned(x)
    small = compact(pruned, x)
    assert [small.get_submodule(name).num_heads for name in attentions] == [HEADS // 2] * 2
    with torch.no_grad():
        assert relative_error(small(x), expected) <= check_tolerance(torch.float32)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_an_attentions_channel_statistics_are_its_in_projections_per_image():
    from prunekit.stats import collect_channel_stats

    class SequenceFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.attention = nn.Linear(4, 8), nn.MultiheadAttention(8, 2)  # [tokens, batch, features]

        def forward(self, x):
            x = self.embed(x)
            return self.attention(x, x, x, need_weights=False)[0]

    torch.manual_seed(0)
    model = SequenceFirst().eval()
    x = torch.randn(5, 3, 4)  # 5 tokens of 3 images
    stats = collect_channel_stats(model, [x], layers=["attention"])["attention"]
    assert stats.num_images == 3 and stats.l2.shape == (24,)
    with torch.no_grad():
        rows = nn.functional.linear(model.embed(x), model.attention.in_proj_weight, model.attention.in_proj_bias)
    expected = rows.transpose(0, 1).norm(dim=1).mean(0)  # per image: the norm over its tokens
    torch.testing.assert_close(stats.l2, expected)
    assert list(prunekit_default_layers(model)) == ["attention"]


def prunekit_default_layers(model: nn.Module):
    from prunekit.methods.registry import get_method

    return get_method("channel").layers_of(model)


def test_a_channel_scan_of_a_vit_covers_its_heads_with_suffix_forwards():
    import warnings

    from prunekit.sensitivity import OutputDistortion, scan
    from prunekit.sensitivity.scanner import SuffixFallbackWarning

    model = tiny_vit()
    layers = [f"encoder.layers.encoder_layer_{i}.{part}" for i in range(2) for part in ("self_attention", "mlp.0")]
    pruning = _prepared("channel", model, layers)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SuffixFallbackWarning)
        result = scan(model, OutputDistortion(torch.randn(2, 3, 32, 32)), method=pruning, sparsities=[0.25, 0.75],
                      layers=layers, progress=False)
    attentions = [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(2)]
    assert [layer for layer in result.layers if layer in attentions] == attentions
    assert all(result.scores[name][1] > result.scores[name][0] > 0 for name in attentions), result.scores


def test_load_model_builds_a_vit_for_the_image_size_and_refuses_imagenet_weights_at_another():
    from prunekit.input_size import check_input_fits
    from prunekit.models.zoo import load_model

    model = load_model("vit_b_16", image_size=32, seed=0)
    assert model.image_size == 32 and model(torch.zeros(1, 3, 32, 32)).shape == (1, 1000)
    assert load_model("resnet18", image_size=32, seed=0).fc.out_features == 1000  # others ignore it
    with pytest.raises(ValueError, match="vit_b_16's ImageNet weights are for 224x224 inputs, not 64"):
        load_model("vit_b_16", "imagenet", image_size=64)
    with pytest.raises(ValueError, match="--image-size 64: VisionTransformer refuses an input of 3x64x64: Wrong image "
                                         "height! Expected 32 but got 64!; pass the size it was built for"):
        check_input_fits(model, (3, 64, 64), "--image-size", 64)


@pytest.mark.slow
def test_prunekit_scan_of_vit_b_16_scans_its_heads_at_the_image_size(tmp_path):
    from click.testing import CliRunner

    from prunekit.cli import cli

    result = CliRunner().invoke(cli, ["scan", "--model", "vit_b_16", "--method", "channel", "--image-size", "32",
                                      "--sparsities", "0.5", "--out", str(tmp_path / "scan"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "encoder.layers.encoder_layer_11.self_attention" in result.output
    assert "full forwards" not in result.output
