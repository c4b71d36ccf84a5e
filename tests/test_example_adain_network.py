"""AdaIN network files (export, load, prune, stylise), the generated style textures and crop augmentation."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from examples.style_transfer.adain_analysis import encoder_stats
from examples.style_transfer.adain_cli import adain as adain_cli
from examples.style_transfer.adain_network import (
    export_network,
    gram_distance,
    load_network,
    prune_weakest,
)
from examples.style_transfer.adain_train import (
    LossNetwork,
    PairedCropBatches,
    TrainConfig,
    augment_crop,
    list_images,
    load_checkpoint,
    train,
)
from examples.style_transfer.textures import TEXTURE_FAMILIES, generate_texture, texture_family
from prunekit.datasets import write_synthetic_images


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    """A tiny compact run and a tiny baseline run (random width-1/8 VGG-16 encoder), 6 steps each."""
    root = tmp_path_factory.mktemp("adain_network")
    for offset, name in enumerate(("content", "style")):
        write_synthetic_images(root / name, 8, 40, seed=300 + offset)
    runs = {}
    for mode in ("compact", "baseline"):
        config = TrainConfig(
            str(root / "content"), str(root / "style"), str(root / mode), mode=mode, weights="random",
            width=0.125, arch="vgg16", steps=6, batch_size=2, crop=16, load_size=24, lr_encoder=3e-3,
            lr_decoder=1e-3, log_every=6, probe_every=6, checkpoint_every=6, probe_images=4, augment=True,
        )
        train(config, progress=False, plot=False)
        runs[mode] = root / mode / "checkpoint.pt"
    return runs


def _images(seed, count=2, size=24):
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- textures and augmentation


def test_textures_are_a_pure_function_of_seed_and_size_and_cover_every_family():
    first = np.asarray(generate_texture(7, 48))
    assert np.array_equal(first, np.asarray(generate_texture(7, 48)))
    assert not np.array_equal(first, np.asarray(generate_texture(12, 48)))  # same family, other seed
    assert {texture_family(seed) for seed in range(10)} == set(TEXTURE_FAMILIES)
    for seed in range(len(TEXTURE_FAMILIES)):
        image = np.asarray(generate_texture(seed, 32)).astype(float)
        assert image.shape == (32, 32, 3) and image.std() > 5  # a texture, not a flat field
    with pytest.raises(ValueError, match="size=8"):
        generate_texture(0, 8)
    with pytest.raises(ValueError, match="seed=-1"):
        generate_texture(-1, 32)


def test_augmentation_keeps_grey_grey_and_is_a_pure_function_of_the_generator():
    grey = torch.rand(1, 12, 12).expand(3, 12, 12).clone()
    for seed in range(5):
        out = augment_crop(grey, torch.Generator().manual_seed(seed), hue_turn=0.5)
        torch.testing.assert_close(out[0], out[1], atol=1e-5, rtol=0)  # hue and saturation act on chroma only
        torch.testing.assert_close(out[1], out[2], atol=1e-5, rtol=0)
        assert 0 <= out.min() and out.max() <= 1
    colour = torch.rand(3, 12, 12, generator=torch.Generator().manual_seed(1))
    a = augment_crop(colour, torch.Generator().manual_seed(3))
    assert torch.equal(a, augment_crop(colour, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, augment_crop(colour, torch.Generator().manual_seed(4)))


def test_augmented_batches_are_a_pure_function_of_seed_and_step(tmp_path):
    write_synthetic_images(tmp_path / "c", 4, 40, seed=1)
    files = list_images(tmp_path / "c")
    plain = PairedCropBatches(files, files, 2, 16, 24, seed=0, steps=4)
    jittered = PairedCropBatches(files, files, 2, 16, 24, seed=0, steps=4, augment=True)
    again = PairedCropBatches(files, files, 2, 16, 24, seed=0, steps=4, augment=True)
    for step in range(3):
        assert all(torch.equal(x, y) for x, y in zip(jittered[step], again[step]))
    assert not torch.equal(jittered[0][0], plain[0][0])
    assert jittered[0][0].shape == plain[0][0].shape == (2, 3, 16, 16)


# --------------------------------------------------------------------------- network files


def test_a_float32_network_file_stylises_exactly_like_its_checkpoint(trained_runs, tmp_path):
    content, style = _images(0), _images(1)
    for mode, checkpoint in trained_runs.items():
        info = export_network(checkpoint, tmp_path / f"{mode}.pt", half=False)
        assert info["encoder_stored"]  # random weights cannot be rebuilt: stored even for a frozen encoder
        loaded = load_network(tmp_path / f"{mode}.pt")
        reference = load_checkpoint(checkpoint).net.eval()
        with torch.no_grad():
            assert torch.equal(loaded.net(content, style), reference(content, style)), mode
        assert loaded.step == 6 and loaded.config.mode == mode
        assert loaded.stats is not None and loaded.stats.num_images == 16 and loaded.stats.num_channels == 64


def test_a_float16_network_file_is_smaller_and_stylises_within_half_precision(trained_runs, tmp_path):
    checkpoint = trained_runs["compact"]
    full = export_network(checkpoint, tmp_path / "full.pt", half=False)
    half = export_network(checkpoint, tmp_path / "half.pt")
    assert half["dtype"] == "float16" and half["bytes"] < 0.6 * full["bytes"]
    content, style = _images(2), _images(3)
    with torch.no_grad():
        reference = load_network(tmp_path / "full.pt").net(content, style)
        output = load_network(tmp_path / "half.pt").net(content, style)
    assert output.dtype == torch.float32
    scale = reference.abs().max()
    assert (output - reference).abs().max() <= 2e-2 * scale  # float16 weights: ~3 significant digits
    assert not torch.equal(output, reference)


def test_a_frozen_encoder_with_named_weights_is_left_out_of_the_network_file(trained_runs, tmp_path):
    state = torch.load(trained_runs["baseline"], weights_only=True)
    state["config"]["weights"] = "imagenet"  # as if the frozen encoder were ImageNet's VGG: rebuilt on load
    torch.save(state, tmp_path / "checkpoint.pt")
    info = export_network(tmp_path / "checkpoint.pt", tmp_path / "net.pt", images=_images(9, 4, 32))
    assert not info["encoder_stored"] and info["ranking_images"] == 4
    assert torch.load(tmp_path / "net.pt", weights_only=True)["encoder"] is None
    compact = export_network(trained_runs["compact"], tmp_path / "compact.pt", images=_images(9, 4, 32))
    assert compact["encoder_stored"] and compact["bytes"] > info["bytes"]


def test_export_refuses_to_write_over_its_checkpoint_and_load_names_a_foreign_file(trained_runs, tmp_path):
    checkpoint = trained_runs["compact"]
    before = checkpoint.read_bytes()
    with pytest.raises(ValueError, match="over its checkpoint"):
        export_network(checkpoint, checkpoint)
    assert checkpoint.read_bytes() == before
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="adain export"):
        load_network(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_network(tmp_path / "missing.pt")
    loaded = load_network(checkpoint)  # a training checkpoint loads too, without a ranking
    assert loaded.stats is None and loaded.step == 6


def test_pruning_channels_that_never_fire_leaves_the_output_unchanged(trained_runs):
    net = load_checkpoint(trained_runs["compact"]).net.eval()
    content, style = _images(4, 4, 32), _images(5, 4, 32)
    stats = encoder_stats(net, torch.cat([content, style]))
    silent = int((stats.l0 == 0).sum())
    assert silent > 0  # the channel and xor losses switched channels off in 6 steps at this learning rate
    pruned = prune_weakest(net, stats, silent)
    with torch.no_grad():
        torch.testing.assert_close(pruned(content, style), net(content, style))
        assert prune_weakest(net, stats, 0) is net
    assert pruned.parameter_counts()["total"] < net.parameter_counts()["total"]
    with pytest.raises(ValueError, match="prune=64"):
        prune_weakest(net, stats, 64)


def test_gram_distance_is_zero_for_the_style_itself_and_grows_with_difference(trained_runs):
    loss_network = load_checkpoint(trained_runs["baseline"]).loss_network
    style = _images(6, 1, 32)
    assert gram_distance(loss_network, style, style) == 0
    near = gram_distance(loss_network, (style + 0.05 * _images(7, 1, 32)).clamp(0, 1), style)
    far = gram_distance(loss_network, _images(8, 1, 32), style)
    assert 0 < near < far
    assert isinstance(loss_network, LossNetwork)


# --------------------------------------------------------------------------- the stylize and export commands


def test_stylize_cli_prunes_reports_the_difference_and_never_writes_over_an_input(trained_runs, tmp_path):
    runner = CliRunner()
    network = tmp_path / "net.pt"
    result = runner.invoke(adain_cli, ["export", str(trained_runs["compact"]), "-o", str(network)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["ranking_images"] == 16
    out = tmp_path / "out.png"
    result = runner.invoke(adain_cli, ["stylize", "sample:hopper", "sample:waves", "-o", str(out), "--size", "36",
                                       "--prune", "8", "--checkpoint", str(network)])
    assert result.exit_code == 0, result.output
    assert "pruned 8 of 64 relu4_1 channels" in result.output and "PSNR" in result.output
    from PIL import Image

    with Image.open(out) as image:
        assert image.size == (24, 32)  # portrait 31 x 36 px cropped to multiples of 8
    photo = tmp_path / "photo.png"
    photo.write_bytes(out.read_bytes())
    before = photo.read_bytes()
    result = runner.invoke(adain_cli, ["stylize", str(photo), "sample:waves", "-o", str(photo), "--size", "32",
                                       "--checkpoint", str(network)])
    assert result.exit_code == 2 and "input image" in result.output and photo.read_bytes() == before
    result = runner.invoke(adain_cli, ["stylize", "sample:hopper", "sample:waves", "-o", str(out), "--prune", "64",
                                       "--size", "32", "--checkpoint", str(network)])
    assert result.exit_code == 1 and "prune=64" in result.output and "Traceback" not in result.output
    result = runner.invoke(adain_cli, ["stylize", "sample:hopper", "sample:nope", "-o", str(out),
                                       "--checkpoint", str(network)])
    assert result.exit_code == 1 and "nope" in result.output
    # --measure: a training checkpoint keeps its loss network; the style itself as content is at distance 0
    result = runner.invoke(adain_cli, ["stylize", "sample:waves", "sample:waves", "-o", str(out), "--size", "32",
                                       "--checkpoint", str(trained_runs["compact"]), "--measure"])
    assert result.exit_code == 0, result.output
    measured = json.loads(result.output.strip().splitlines()[-1])
    assert measured["gram_distance_content_to_style"] == 0 and measured["gram_distance_output_to_style"] > 0
    assert measured["relu4_1_mse_output_to_content"] > 0


def test_analyze_reads_network_files_and_sweep_needs_a_reproducible_loss_network(trained_runs, tmp_path):
    runner = CliRunner()
    write_synthetic_images(tmp_path / "heldout", 4, 24, seed=9)
    network = tmp_path / "net.pt"
    export_network(trained_runs["compact"], network)
    heldout = ["--content", str(tmp_path / "heldout"), "--style", str(tmp_path / "heldout"), "--size", "16"]
    result = runner.invoke(adain_cli, ["analyze", "--checkpoint", f"compact={network}", *heldout,
                                       "--out", str(tmp_path / "analysis"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["runs"]["compact"]["channels"] == 64
    result = runner.invoke(adain_cli, ["sweep", "--checkpoint", str(network), *heldout, "--counts", "0,8",
                                       "--repeats", "1", "--quiet", "--out", str(tmp_path / "sweep")])
    assert result.exit_code == 1 and "checkpoint.pt" in result.output and "Traceback" not in result.output



def test_stylize_without_a_shipped_network_says_how_to_get_one(tmp_path, monkeypatch):
    from examples.style_transfer import adain_network

    monkeypatch.setitem(adain_network.SHIPPED_NETWORKS, "compact", tmp_path / "absent.pt")
    result = CliRunner().invoke(adain_cli, ["stylize", "sample:hopper", "sample:waves", "-o", str(tmp_path / "o.png")])
    assert result.exit_code == 1 and "--checkpoint PATH" in result.output and "absent.pt" in result.output
    assert not (tmp_path / "o.png").exists()
