"""Compact AdaIN example: the AdaIN op, the mirrored decoder, resumable training, and the paper's claim
that channel + xor losses switch relu4_1 channels off for good, so removing them changes nothing."""

import importlib.util
import json

import pytest
import torch
from click.testing import CliRunner

from examples.style_transfer.adain import (
    AdaINNet,
    encoder_last_conv,
    encoder_output,
    adain,
    build_decoder,
    build_encoder,
    channel_mean_std,
)
from examples.style_transfer.adain_analysis import (
    compact_adain,
    consistently_inactive,
    encoder_stats,
    load_heldout,
    mask_weakest,
    scaled_counts,
)
from examples.style_transfer.quality import psnr, ssim
from examples.style_transfer.adain_cli import adain as adain_cli
from examples.style_transfer.adain_cli import write_real_data
from examples.style_transfer.adain_train import TrainConfig, _structure_config, load_checkpoint, read_log, train
from prunekit.datasets import write_synthetic_images


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adain_images")
    for offset, name in enumerate(("content", "style", "heldout")):
        write_synthetic_images(root / name, 16, 48, seed=100 + offset)
    return root


def _config(root, out, **settings):
    base = dict(
        mode="compact", weights="random", width=0.125, steps=4, batch_size=2, crop=16, load_size=24,
        lr_encoder=1e-4, lr_decoder=1e-3, log_every=1, probe_every=2, checkpoint_every=2, probe_images=4,
    )
    base.update(settings)
    return TrainConfig(str(root / "content"), str(root / "style"), str(out), **base)


def test_adain_gives_content_the_style_channel_statistics():
    content = torch.rand(2, 5, 8, 8)
    style = torch.rand(2, 5, 6, 6) * 3.0 + 1.0
    out_mean, out_std = channel_mean_std(adain(content, style))
    style_mean, style_std = channel_mean_std(style)
    torch.testing.assert_close(out_mean, style_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_std, style_std, rtol=1e-4, atol=1e-5)


def test_adain_keeps_a_channel_dead_in_content_and_style_exactly_zero():
    content, style = torch.rand(2, 4, 8, 8), torch.rand(2, 4, 8, 8)
    content[:, 1] = 0.0
    style[:, 1] = 0.0
    assert torch.count_nonzero(adain(content, style)[:, 1]) == 0


def test_decoder_mirrors_encoder_channels_and_restores_image_size():
    encoder = build_encoder("random", width=0.125)
    decoder = build_decoder(encoder)
    encoder_convs = [(m.in_channels, m.out_channels) for m in encoder if isinstance(m, torch.nn.Conv2d)]
    decoder_convs = [(m.out_channels, m.in_channels) for m in decoder if isinstance(m, torch.nn.Conv2d)]
    assert decoder_convs == encoder_convs[::-1]
    assert all(m.padding_mode == "reflect" for m in decoder if isinstance(m, torch.nn.Conv2d))
    images = torch.rand(2, 3, 40, 48)
    assert AdaINNet(encoder, decoder)(images, torch.rand(1, 3, 32, 32)).shape == images.shape


def test_pretrained_weights_at_reduced_width_are_refused():
    with pytest.raises(ValueError, match="width=1"):
        build_encoder("imagenet", width=0.5)


def test_resumed_training_continues_exactly_like_an_uninterrupted_run(image_folders, tmp_path):
    straight = train(_config(image_folders, tmp_path / "straight"), progress=False, plot=False)
    train(_config(image_folders, tmp_path / "split", steps=2), progress=False, plot=False)
    resumed = train(_config(image_folders, tmp_path / "split", steps=4), resume=True, progress=False, plot=False)
    assert resumed.step == straight.step == 4
    for key, value in straight.net.state_dict().items():
        assert torch.equal(value, resumed.net.state_dict()[key]), key
    assert read_log(tmp_path / "split" / "log.jsonl") == read_log(tmp_path / "straight" / "log.jsonl")
    assert torch.equal(
        load_checkpoint(tmp_path / "split" / "checkpoint.pt").net.decoder[0].weight, straight.net.decoder[0].weight
    )


def test_train_cli_resume_needs_no_folders_and_keeps_the_runs_threads(image_folders, tmp_path, monkeypatch):
    small = ["--mode", "compact", "--weights", "random", "--width", "0.125", "--batch-size", "2", "--crop", "16",
             "--load-size", "24", "--log-every", "1", "--probe-every", "2", "--checkpoint-every", "2", "--quiet"]
    out = str(tmp_path / "run")
    first = CliRunner().invoke(adain_cli, ["train", "--content", str(image_folders / "content"), "--style",
                                           str(image_folders / "style"), "--out", out, "--steps", "2",
                                           "--threads", "1", *small])
    assert first.exit_code == 0, first.output
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt").config.threads == 1
    seen = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.append(n) or real(n))
    resumed = CliRunner().invoke(adain_cli, ["train", "--out", out, "--steps", "4", "--resume", "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["step"] == 4
    assert seen and seen[0] == 1  # the run's recorded --threads, without repeating it
    missing = CliRunner().invoke(adain_cli, ["train", "--out", str(tmp_path / "new"), "--steps", "2", *small])
    assert missing.exit_code == 2 and "--content" in missing.output


def test_training_into_a_folder_with_a_checkpoint_needs_resume(image_folders, tmp_path):
    train(_config(image_folders, tmp_path, steps=1, checkpoint_every=1), progress=False, plot=False)
    with pytest.raises(ValueError, match="resume"):
        train(_config(image_folders, tmp_path, steps=2), progress=False, plot=False)


def test_ssim_and_psnr_rank_distortions():
    torch.manual_seed(0)
    image = torch.rand(2, 3, 32, 32) * 0.6 + 0.2
    assert ssim(image, image) == pytest.approx(1.0)
    assert psnr(image + 0.1, image) == pytest.approx(20.0, abs=1e-3)
    slight = ssim(image + 0.02 * torch.randn_like(image), image)
    strong = ssim(image + 0.2 * torch.randn_like(image), image)
    assert 1.0 > slight > strong


def test_reference_counts_scale_to_a_reduced_width():
    assert scaled_counts(512) == [0, 100, 200, 300, 400, 470, 490, 500]
    assert scaled_counts(64)[-1] < 64


def test_cli_rejects_a_checkpoint_without_a_label(image_folders, tmp_path):
    result = CliRunner().invoke(
        adain_cli,
        ["analyze", "--checkpoint", "run.pt", "--content", str(image_folders / "heldout"),
         "--style", str(image_folders / "heldout"), "--out", str(tmp_path)],
    )
    assert result.exit_code != 0
    assert "LABEL=PATH" in result.output


@pytest.mark.slow
def test_channel_and_xor_losses_switch_off_channels_that_compact_removes_exactly(image_folders, tmp_path):
    # Width 1/8 (64 relu4_1 channels), 32 px crops, a random-init encoder trained
    # at a much larger rate than the paper's 5e-6 so 30 steps suffice. All runs
    # start from the same weights and see the same batches. "trained" trains the
    # encoder too but without channel/xor loss: training alone kills a few
    # channels, the losses many more (seeds 0-5: baseline 0-3, trained 1-11,
    # channel+xor 37-54 of 64).
    settings = dict(steps=30, batch_size=4, crop=32, load_size=48, lr_encoder=1e-3, checkpoint_every=30,
                    probe_every=30, log_every=10)
    runs = {
        "baseline": dict(mode="baseline"),
        "trained": dict(channel_weight=0.0, xor_weight=0.0),
        "channel+xor": dict(),
    }
    heldout = load_heldout(image_folders / "heldout", 32)
    nets, dead = {}, {}
    for label, extra in runs.items():
        config = _config(image_folders, tmp_path / label.replace("+", "_"), **settings, **extra)
        nets[label] = train(config, progress=False, plot=False).net
        dead[label] = consistently_inactive(encoder_stats(nets[label], heldout))
    channels = 64
    assert dead["channel+xor"] >= dead["baseline"] + channels // 4, dead
    assert dead["channel+xor"] >= dead["trained"] + channels // 4, dead

    compact_net = nets["channel+xor"]
    compact_stats = encoder_stats(compact_net, heldout)
    dead_compact = dead["channel+xor"]

    count = min(dead_compact, channels - 1)
    compacted = compact_adain(mask_weakest(compact_net, compact_stats, count))
    assert compacted.encoder[19].out_channels == channels - count
    assert compacted.decoder[0].in_channels == channels - count
    content, style = heldout[:8], heldout[8:]
    with torch.no_grad():
        dense_output = compact_net(content, style)
        compact_output = compacted(content, style)
    error = (compact_output - dense_output).abs().max() / dense_output.abs().max()
    assert error < 1e-5


@pytest.mark.slow
def test_cli_trains_analyzes_and_sweeps(image_folders, tmp_path):
    runner = CliRunner()
    common = ["--content", str(image_folders / "content"), "--style", str(image_folders / "style"),
              "--weights", "random", "--width", "0.125", "--steps", "3", "--batch-size", "2", "--crop", "16",
              "--load-size", "24", "--quiet"]
    for mode in ("baseline", "compact"):
        result = runner.invoke(adain_cli, ["train", *common, "--mode", mode, "--out", str(tmp_path / mode)])
        assert result.exit_code == 0, result.output
    heldout = ["--content", str(image_folders / "heldout"), "--style", str(image_folders / "heldout"),
               "--size", "16", "--limit", "4"]
    result = runner.invoke(adain_cli, [
        "analyze", "--checkpoint", f"baseline={tmp_path / 'baseline' / 'checkpoint.pt'}",
        "--checkpoint", f"compact={tmp_path / 'compact' / 'checkpoint.pt'}", *heldout,
        "--out", str(tmp_path / "analysis"), "--json"])
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.output)["runs"]) == {"baseline", "compact"}
    result = runner.invoke(adain_cli, [
        "sweep", "--checkpoint", str(tmp_path / "compact" / "checkpoint.pt"), *heldout, "--counts", "0,8",
        "--repeats", "1", "--quiet", "--out", str(tmp_path / "sweep")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "sweep" / "report.json").read_text())
    assert [row["channels_left"] for row in report["rows"]] == [64, 56]
    assert (tmp_path / "sweep" / "grid.png").stat().st_size > 0


def test_training_off_a_terminal_prints_progress_lines(image_folders, tmp_path):
    result = CliRunner().invoke(adain_cli, [
        "train", "--content", str(image_folders / "content"), "--style", str(image_folders / "style"),
        "--weights", "random", "--width", "0.125", "--steps", "3", "--batch-size", "2", "--crop", "16",
        "--load-size", "24", "--mode", "baseline", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "training AdaIN: 0/3" in result.stderr and "training AdaIN: 3/3" in result.stderr


def test_vgg16_encoder_ends_at_its_own_relu4_1():
    encoder = build_encoder("random", width=0.125, arch="vgg16")
    assert len(encoder) == 19 and encoder_last_conv(encoder) == "17" and encoder_output(encoder) == "18"
    vgg19 = build_encoder("random", width=0.125)
    assert len(vgg19) == 21 and encoder_last_conv(vgg19) == "19"
    assert [m.out_channels for m in encoder if isinstance(m, torch.nn.Conv2d)] == [8, 8, 16, 16, 32, 32, 32, 64]


def test_training_a_vgg16_encoder_switches_its_relu4_1_channels(image_folders, tmp_path):
    result = train(_config(image_folders, tmp_path, arch="vgg16", steps=2), progress=False, plot=False)
    assert len(result.net.encoder) == 19
    log = read_log(tmp_path / "log.jsonl")
    assert log[-1]["channels"] == 64 and "channel" in log[-1]
    assert load_checkpoint(tmp_path / "checkpoint.pt").config.arch == "vgg16"


def test_hed_weights_imply_their_preprocessing_and_vgg16():
    config = TrainConfig("c", "s", "o", weights="hed")
    config.validate()
    assert config.preprocess is None and config.arch is None  # resolved when the network is built
    with pytest.raises(ValueError, match="--arch vgg16"):
        build_encoder("hed", arch="vgg19")
    # A checkpoint of a HED run is rebuilt (without reading the weights) as VGG-16 with HED's input.
    structure = _structure_config(config)
    assert (structure.weights, structure.arch, structure.preprocess) == ("random", "vgg16", "hed")


@pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="needs scikit-image: pip install scikit-image")
def test_real_data_never_holds_out_a_training_image(tmp_path):
    written = write_real_data(str(tmp_path), 32, textures=5)
    assert written == {"content": 13, "style": 8, "heldout-content": 3, "heldout-style": 3}
    names = {folder: {p.name for p in (tmp_path / folder).iterdir()} for folder in written}
    assert not (names["content"] | names["style"]) & (names["heldout-content"] | names["heldout-style"])
    images = load_heldout(str(tmp_path / "heldout-content"), 32)
    assert images.shape == (3, 3, 32, 32) and images.std() > 0.1
