import json
import pickle
import sys

import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from prunekit.layers import conv_layers
from prunekit.stats import (
    ChannelStats,
    collect_channel_stats,
    load_channel_stats,
    plot_channel_magnitudes,
    plot_channel_response,
    save_channel_stats,
)


def known_model() -> nn.Sequential:
    """1 input channel -> 3 channels through ReLU, then a conv with no activation.

    Channel 0 copies the input, channel 1 negates it (dead on non-negative
    inputs), channel 2 is the constant 2. The last conv outputs ch0 + ch2 - 3.
    """
    model = nn.Sequential(nn.Conv2d(1, 3, 1), nn.ReLU(), nn.Conv2d(3, 1, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, -1.0, 0.0]).view(3, 1, 1, 1))
        model[0].bias.copy_(torch.tensor([0.0, 0.0, 2.0]))
        model[2].weight.copy_(torch.tensor([1.0, 0.0, 1.0]).view(1, 3, 1, 1))
        model[2].bias.fill_(-3.0)
    return model


# Image 0: every pixel 3; image 1: all zero. Each is a 2x2 image (4 pixels).
KNOWN_BATCHES = [torch.full((1, 1, 2, 2), 3.0), torch.zeros(1, 1, 2, 2)]


@pytest.fixture(scope="module")
def vgg():
    """vgg11_bn with a small head: its 120M-parameter classifier is slow to initialise."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = torchvision.models.vgg11_bn(init_weights=False)
    model.features.to_empty(device="cpu")
    for module in model.features.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    model.classifier = nn.Linear(512 * 7 * 7, 10)
    return model


def test_known_weights_post_relu_values():
    stats = collect_channel_stats(known_model(), KNOWN_BATCHES)["0"]
    # ch0: norms sqrt(4 * 9) = 6 and 0; ch1: dead; ch2: sqrt(4 * 4) = 4 on both images.
    assert torch.allclose(stats.l2, torch.tensor([3.0, 0.0, 4.0]))
    assert torch.equal(stats.l0, torch.tensor([0.5, 0.0, 1.0]))
    assert stats.per_image_l0.dtype == torch.uint8
    assert stats.per_image_l0.tolist() == [[1, 0, 1], [0, 0, 1]]
    assert stats.num_images == 2 and stats.num_channels == 3


def test_conv_without_activation_measures_raw_output():
    stats = collect_channel_stats(known_model(), KNOWN_BATCHES, layers=["2"])
    assert list(stats) == ["2"]
    # Image 0: 3 + 2 - 3 = 2 per pixel, norm 4; image 1: 0 + 2 - 3 = -1, norm 2 (fires: non-zero).
    assert torch.allclose(stats["2"].l2, torch.tensor([3.0]))
    assert torch.equal(stats["2"].l0, torch.tensor([1.0]))


def test_vgg_bn_keys_are_conv_names_in_order(vgg):
    stats = collect_channel_stats(vgg, [torch.rand(2, 3, 32, 32)])
    assert list(stats) == list(conv_layers(vgg))
    assert list(stats)[:2] == ["features.0", "features.4"]
    for name, conv in conv_layers(vgg).items():
        assert stats[name].num_channels == conv.out_channels
        assert stats[name].num_images == 2


def test_vgg_bn_measures_after_batchnorm_and_relu(vgg):
    torch.manual_seed(1)
    images = torch.randn(2, 3, 32, 32)
    stats = collect_channel_stats(vgg, [images], layers=["features.4"])
    vgg.eval()
    with torch.no_grad():
        expected = vgg.features[:7](images)  # conv 4, BatchNorm 5, inplace ReLU 6
    expected_l2 = expected.flatten(2).norm(dim=2).mean(0)
    assert torch.allclose(stats["features.4"].l2, expected_l2, rtol=1e-5)


def test_inplace_relu_sees_activated_response():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(inplace=True), nn.Conv2d(6, 4, 3))
    images = torch.randn(3, 3, 10, 10)
    stats = collect_channel_stats(model, [images])
    with torch.no_grad():
        pre = model[0](images)
        post = torch.relu(pre)
    expected_l2 = post.flatten(2).norm(dim=2).mean(0)
    expected_l0 = (post.flatten(2) != 0).any(dim=2).float().mean(0)
    assert torch.allclose(stats["0"].l2, expected_l2, rtol=1e-5)
    assert torch.equal(stats["0"].l0, expected_l0)
    assert not torch.allclose(stats["0"].l2, pre.flatten(2).norm(dim=2).mean(0))


def test_mode_of_every_submodule_restored_and_eval_used(vgg):
    vgg.train()
    vgg.features[1].eval()
    before = {name: module.training for name, module in vgg.named_modules()}
    running_mean = vgg.features[1].running_mean.clone()
    collect_channel_stats(vgg, [torch.rand(2, 3, 32, 32)], layers=["features.0"])
    assert {name: module.training for name, module in vgg.named_modules()} == before
    # Eval mode during collection: BatchNorm running statistics untouched.
    assert torch.equal(vgg.features[1].running_mean, running_mean)


def test_hooks_removed_and_mode_restored_on_bad_batch(vgg):
    vgg.train()

    def batches():
        yield torch.rand(2, 3, 32, 32)
        yield {"image": torch.rand(2, 3, 32, 32)}

    with pytest.raises(TypeError, match="batch 1 is a dict"):
        collect_channel_stats(vgg, batches())
    assert all(not module._forward_hooks for module in vgg.modules())
    assert all(module.training for module in vgg.modules())


def test_hooks_removed_when_forward_fails():
    model = known_model()
    with pytest.raises(RuntimeError):
        collect_channel_stats(model, [torch.rand(1, 5, 2, 2)])  # wrong number of channels
    assert all(not module._forward_hooks for module in model.modules())


def test_unknown_layer_lists_conv_names():
    with pytest.raises(KeyError, match="unknown layer 'bad'; Conv2d, Linear or MultiheadAttention layers are: 0, 2"):
        collect_channel_stats(known_model(), KNOWN_BATCHES, layers=["bad"])


def test_input_target_batches_match_plain_tensors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU())
    images = [torch.randn(2, 3, 6, 6), torch.randn(3, 3, 6, 6)]
    plain = collect_channel_stats(model, images)["0"]
    tuples = collect_channel_stats(model, [(x, torch.zeros(len(x))) for x in images])["0"]
    lists = collect_channel_stats(model, [[x, 0, "extra"] for x in images])["0"]
    assert plain.num_images == tuples.num_images == lists.num_images == 5
    assert torch.equal(plain.l2, tuples.l2) and torch.equal(plain.l2, lists.l2)


def test_empty_data_raises_value_error():
    with pytest.raises(ValueError, match="no batches"):
        collect_channel_stats(known_model(), [])


def test_non_tensor_batch_raises_type_error():
    with pytest.raises(TypeError, match="batch 0 is a str"):
        collect_channel_stats(known_model(), ["image.png"])


def test_max_batches_limits_images():
    stats = collect_channel_stats(known_model(), KNOWN_BATCHES * 3, max_batches=2)
    assert stats["0"].num_images == 2
    with pytest.raises(ValueError, match="max_batches=0"):
        collect_channel_stats(known_model(), KNOWN_BATCHES, max_batches=0)


def test_shared_activation_module_is_rejected():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Conv2d(1, 2, 1), relu, nn.Conv2d(2, 2, 1), relu)
    with pytest.raises(RuntimeError, match="ran 2 times"):
        collect_channel_stats(model, [torch.rand(1, 1, 2, 2)])
    assert not relu._forward_hooks


def test_score_criteria():
    stats = collect_channel_stats(known_model(), KNOWN_BATCHES)["0"]
    assert torch.equal(stats.score("l2"), stats.l2)
    assert torch.equal(stats.score("l0"), stats.l0)
    with pytest.raises(ValueError, match="criterion='l1' is unknown; choose one of l2, l0"):
        stats.score("l1")


def test_inconsistent_fields_rejected():
    with pytest.raises(ValueError, match="per_image_l0 must have shape"):
        ChannelStats(torch.zeros(3), torch.zeros(3), torch.zeros(2, 4), num_images=2)


def test_dict_json_pickle_round_trips(tmp_path):
    stats = collect_channel_stats(known_model(), KNOWN_BATCHES)
    first = stats["0"]
    again = ChannelStats.from_dict(json.loads(json.dumps(first.to_dict())))
    unpickled = pickle.loads(pickle.dumps(first))
    for copy in (again, unpickled):
        assert torch.equal(copy.l2, first.l2) and torch.equal(copy.l0, first.l0)
        assert torch.equal(copy.per_image_l0, first.per_image_l0)
        assert copy.num_images == first.num_images
    save_channel_stats(stats, tmp_path / "stats.json")
    loaded = load_channel_stats(tmp_path / "stats.json")
    assert list(loaded) == ["0", "2"]
    assert torch.equal(loaded["2"].l2, stats["2"].l2)


def test_from_dict_missing_field():
    with pytest.raises(KeyError, match="missing per_image_l0"):
        ChannelStats.from_dict({"num_images": 1, "l2": [1.0], "l0": [1.0]})


def test_plots_write_png(tmp_path):
    stats = collect_channel_stats(known_model(), KNOWN_BATCHES)["0"]
    plot_channel_response(stats, tmp_path / "response.png")
    plot_channel_magnitudes({"a": stats, "b": stats}, tmp_path / "sub" / "magnitudes.png")
    for name in ("response.png", "sub/magnitudes.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.size[0] > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["response.png", "sub"]


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    stats = collect_channel_stats(known_model(), KNOWN_BATCHES)["0"]
    with pytest.raises(ImportError, match=r"pip install 'prunekit\[plots\]'"):
        plot_channel_response(stats, tmp_path / "response.png")
    assert not (tmp_path / "response.png").exists()
