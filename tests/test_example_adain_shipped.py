"""The AdaIN networks the style-transfer example ships (HED's encoder, trained by stages on this CPU):
tensors-only files that stylise deterministically, and whose silent relu4_1 channels prune away exactly."""

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from examples.style_transfer.adain_analysis import encoder_stats
from examples.style_transfer.adain_cli import adain as adain_cli
from examples.style_transfer.adain_network import SHIPPED_NETWORKS, load_network, prune_weakest
from examples.style_transfer.samples import load_image_or_sample

pytest.importorskip("h5py", reason="the baseline network rebuilds HED's encoder: pip install h5py")


def _pair(size=64):
    """Held-out samples (never trained on), scaled to ``size`` x ``size``."""
    return tuple(F.interpolate(load_image_or_sample(name, size), size=(size, size), mode="bilinear",
                               align_corners=False).clamp(0, 1) for name in ("sample:hopper", "sample:waves"))


@pytest.mark.parametrize("name", ["baseline", "compact"])
def test_a_shipped_network_is_tensors_only_and_stylises_deterministically(name):
    path = SHIPPED_NETWORKS[name]
    assert path.is_file(), f"{path} should ship with the example"
    state = torch.load(path, map_location="cpu", weights_only=True)  # refuses anything but tensors and containers
    assert all(value.dtype == torch.float16 for value in state["decoder"].values())
    network = load_network(path)
    content, style = _pair()
    with torch.no_grad():
        first, second = network.net(content, style), network.net(content, style)
    assert torch.equal(first, second)
    assert first.shape == content.shape and float(first.clamp(0, 1).std()) > 0.02  # not a flat image


def test_the_compact_network_silences_most_channels_and_pruning_them_changes_nothing():
    network = load_network(SHIPPED_NETWORKS["compact"])
    baseline = load_network(SHIPPED_NETWORKS["baseline"])
    never = int((network.stats.l0 == 0).sum())
    assert never > 4 * int((baseline.stats.l0 == 0).sum()) and never >= 100
    content, style = _pair()
    images = torch.cat([content, style])
    here = encoder_stats(network.net, images)  # channels silent on these very images
    silent = int((here.l0 == 0).sum())
    assert silent >= never // 2
    pruned = prune_weakest(network.net, here, silent)
    with torch.no_grad():
        torch.testing.assert_close(pruned(content, style), network.net(content, style), rtol=1e-4, atol=1e-4)
    assert pruned.parameter_counts()["total"] < network.net.parameter_counts()["total"]


@pytest.mark.parametrize("flag", [[], ["--baseline"]])
def test_stylize_uses_the_shipped_network_without_a_checkpoint(tmp_path, flag):
    out = tmp_path / "out.png"
    result = CliRunner().invoke(adain_cli, ["stylize", "sample:hopper", "sample:waves", "-o", str(out), "--size", "64",
                                            "--threads", "1", *flag])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 0
