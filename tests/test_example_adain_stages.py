"""AdaIN trained by stages: the decoder first inverts relu4_1 alone, then style enters on a ramp
while a held-out "content kept" distance is watched (examples/style_transfer/adain_train.py)."""

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from examples.style_transfer.adain_cli import adain as adain_cli
from examples.style_transfer.adain_content import blurred, content_distance, content_references, flat
from examples.style_transfer.adain_train import TrainConfig, load_checkpoint, read_log, train
from prunekit.datasets import write_synthetic_images


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adain_stage_images")
    for offset, name in enumerate(("content", "style", "heldout", "heldout_style")):
        write_synthetic_images(root / name, 8, 48, seed=300 + offset)
    return root


def _config(root, out, **settings):
    base = dict(
        mode="baseline", weights="random", width=0.125, steps=4, batch_size=2, crop=16, load_size=24,
        lr_decoder=1e-3, lr_decay=0.0, log_every=1, probe_every=2, checkpoint_every=2, probe_images=4,
        probe_dir=str(root / "heldout"), seed=0,
    )
    base.update(settings)
    return TrainConfig(str(root / "content"), str(root / "style"), str(out), **base)


def _invert(root, out, **settings):
    settings = {"stage": "invert", "pixel_weight": 1.0, **settings}
    return train(_config(root, out, **settings), progress=False, plot=False)


def test_flat_and_blurred_references_keep_colour_and_lose_detail():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(flat(images).mean(dim=(2, 3)), images.mean(dim=(2, 3)))
    assert flat(images).std(dim=(2, 3)).max() == 0
    torch.testing.assert_close(blurred(images, factor=1), images)
    assert blurred(images).std() < images.std()
    with pytest.raises(ValueError, match="factor=0"):
        blurred(images, factor=0)


def test_content_distance_is_zero_for_the_content_and_refuses_mismatched_shapes():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    images = torch.rand(3, 3, 16, 16)
    assert content_distance(net, images, images) == 0.0
    references = content_references(net, images)
    assert references["flat"] > 0 and references["blurred"] > 0
    # Chunking does not change the mean.
    noisy = images + 0.1 * torch.randn_like(images)
    assert content_distance(net, noisy, images, batch_size=1) == pytest.approx(content_distance(net, noisy, images))
    with pytest.raises(ValueError, match="differ in shape"):
        content_distance(net, images[:2], images)


def test_the_structure_distance_ignores_what_adain_changes_and_sees_the_layout():
    torch.manual_seed(0)
    identity = nn.Identity()  # relu4_1 := the image itself, so the maps are known
    images = F.interpolate(torch.rand(2, 3, 4, 4), size=(32, 32), mode="bilinear", align_corners=False)  # smooth
    restyled = images * torch.tensor([2.0, 0.5, 3.0])[:, None, None] + 0.3  # each channel's mean and std changed
    assert content_distance(identity, restyled, images) > 0.1
    assert content_distance(identity, restyled, images, normalize=True) < 1e-6
    shuffled = images[:, :, torch.randperm(32)]
    assert content_distance(identity, shuffled, images, normalize=True) > 0.5
    references = content_references(identity, images, normalize=True)
    assert references["blurred"] < references["flat"]


def test_the_invert_stage_trains_the_decoder_alone_towards_the_content(image_folders, tmp_path):
    start = load_checkpoint_after(image_folders, tmp_path / "start", steps=1)
    result = _invert(image_folders, tmp_path / "run", steps=40, probe_every=10)
    for key, value in start.net.encoder.state_dict().items():
        assert torch.equal(value, result.net.encoder.state_dict()[key]), key  # the encoder is frozen
    probes = [entry for entry in read_log(tmp_path / "run" / "log.jsonl") if "probe_content" in entry]
    assert [entry["step"] for entry in probes] == [10, 20, 30, 40]
    assert all("pixel" in entry and "style" not in entry for entry in probes)
    # The references are the same held-out images every time; the reconstructions get closer.
    assert len({entry["probe_content_flat"] for entry in probes}) == 1
    assert probes[-1]["probe_content"] < probes[0]["probe_content"]


def load_checkpoint_after(root, out, steps):
    train(_config(root, out, stage="invert", steps=steps, checkpoint_every=1), progress=False, plot=False)
    return load_checkpoint(out / "checkpoint.pt")


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(stage="invert", mode="compact"), "mode='baseline'"),
        (dict(stage="polish"), "stage='polish' is unknown"),
        (dict(pixel_weight=1.0), "stage='invert' only"),
        (dict(style_ramp=-1), "style_ramp=-1"),
        (dict(content_guard=float("nan")), "content_guard=nan"),
    ],
)
def test_bad_stage_settings_are_refused_naming_the_value(image_folders, tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        train(_config(image_folders, tmp_path, **settings), progress=False, plot=False)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_stylise_run_starts_from_the_invert_runs_decoder(image_folders, tmp_path):
    inverted = _invert(image_folders, tmp_path / "invert", steps=4)
    stylise = _config(image_folders, tmp_path / "stylise", steps=1, lr_decoder=0.0,
                      init_from=str(tmp_path / "invert" / "checkpoint.pt"))
    result = train(stylise, progress=False, plot=False)
    for key, value in inverted.net.decoder.state_dict().items():
        assert torch.equal(value, result.net.decoder.state_dict()[key]), key
    fresh = train(_config(image_folders, tmp_path / "fresh", steps=1, lr_decoder=0.0), progress=False, plot=False)
    assert not torch.equal(fresh.net.decoder[0].weight, result.net.decoder[0].weight)
    other = _config(image_folders, tmp_path / "other", width=0.25, init_from=str(tmp_path / "invert" / "checkpoint.pt"))
    with pytest.raises(ValueError, match="width=0.125.*width=0.25"):
        train(other, progress=False, plot=False)


def test_the_style_weight_ramps_up_and_the_content_guard_backs_it_off(image_folders, tmp_path):
    ramped = train(_config(image_folders, tmp_path / "ramp", steps=6, style_weight=8.0, style_ramp=4,
                           probe_every=100), progress=False, plot=False)
    weights = [entry["style_weight"] for entry in read_log(tmp_path / "ramp" / "log.jsonl")]
    assert weights == [2.0, 4.0, 6.0, 8.0, 8.0, 8.0]
    assert ramped.step == 6
    # A guard no output can pass halves the weight at every probe (steps 2 and 4).
    train(_config(image_folders, tmp_path / "guard", steps=6, style_weight=8.0, content_guard=1e-12,
                  probe_style_dir=str(image_folders / "heldout_style")), progress=False, plot=False)
    log = read_log(tmp_path / "guard" / "log.jsonl")
    assert [entry["style_weight"] for entry in log] == [8.0, 8.0, 4.0, 4.0, 2.0, 2.0]
    assert [entry.get("style_scale") for entry in log if "probe_content" in entry] == [0.5, 0.25, 0.125]


def test_a_resumed_staged_run_keeps_its_ramp_and_backed_off_style_weight(image_folders, tmp_path):
    _invert(image_folders, tmp_path / "invert", steps=2)
    settings = dict(style_weight=8.0, style_ramp=3, content_guard=1e-12, init_from=str(tmp_path / "invert" / "checkpoint.pt"))
    straight = train(_config(image_folders, tmp_path / "straight", steps=6, **settings), progress=False, plot=False)
    train(_config(image_folders, tmp_path / "split", steps=4, **settings), progress=False, plot=False)
    resumed = train(_config(image_folders, tmp_path / "split", steps=6, **settings), resume=True, progress=False,
                    plot=False)
    assert read_log(tmp_path / "split" / "log.jsonl") == read_log(tmp_path / "straight" / "log.jsonl")
    for key, value in straight.net.state_dict().items():
        assert torch.equal(value, resumed.net.state_dict()[key]), key


def test_train_cli_runs_both_stages_and_plots_the_content_distance(image_folders, tmp_path):
    small = ["--weights", "random", "--width", "0.125", "--batch-size", "2", "--crop", "16", "--load-size", "24",
             "--log-every", "1", "--probe-every", "2", "--checkpoint-every", "2", "--quiet", "--threads", "1",
             "--content", str(image_folders / "content"), "--style", str(image_folders / "style"),
             "--probe", str(image_folders / "heldout")]
    first = CliRunner().invoke(adain_cli, ["train", "--mode", "baseline", "--stage", "invert", "--pixel-weight", "1",
                                           "--out", str(tmp_path / "invert"), "--steps", "2", *small])
    assert first.exit_code == 0, first.output
    assert (tmp_path / "invert" / "log.png").stat().st_size > 0
    second = CliRunner().invoke(adain_cli, ["train", "--mode", "compact", "--init-from",
                                            str(tmp_path / "invert" / "checkpoint.pt"), "--style-ramp", "2",
                                            "--probe-style", str(image_folders / "heldout_style"),
                                            "--out", str(tmp_path / "compact"), "--steps", "2", *small])
    assert second.exit_code == 0, second.output
    assert json.loads(second.stdout.strip().splitlines()[-1])["step"] == 2
    config = json.loads((tmp_path / "compact" / "config.json").read_text())
    assert config["stage"] == "stylise" and config["style_ramp"] == 2 and config["init_from"].endswith("checkpoint.pt")
    wrong = CliRunner().invoke(adain_cli, ["train", "--mode", "compact", "--stage", "invert",
                                           "--out", str(tmp_path / "wrong"), "--steps", "2", *small])
    assert wrong.exit_code != 0 and "mode='baseline'" in wrong.output and "Traceback" not in wrong.output


def test_reconstruct_reports_each_decoder_beside_the_references_and_draws_them(image_folders, tmp_path):
    _invert(image_folders, tmp_path / "short", steps=2)
    _invert(image_folders, tmp_path / "long", steps=40)
    out = tmp_path / "recon.png"
    args = ["reconstruct", "--checkpoint", f"short={tmp_path / 'short' / 'checkpoint.pt'}",
            "--checkpoint", f"long={tmp_path / 'long' / 'checkpoint.pt'}", "--content", str(image_folders / "heldout"),
            "--size", "16", "-o", str(out), "--threads", "1"]
    result = CliRunner().invoke(adain_cli, args + ["--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["images"] == 8 and set(report["references"]) == {"flat", "blurred"}
    assert report["networks"]["long"]["step"] == 40 and report["networks"]["short"]["step"] == 2
    assert report["networks"]["long"]["distance"] < report["networks"]["short"]["distance"]
    assert len(report["networks"]["long"]["per_image"]) == 8
    assert report["networks"]["long"]["distance"] == pytest.approx(sum(report["networks"]["long"]["per_image"]) / 8)
    from PIL import Image

    with Image.open(out) as grid:
        assert grid.height > 6 * 16  # six rows drawn
    text = CliRunner().invoke(adain_cli, args)
    assert text.exit_code == 0 and "flat" in text.output and "long (step 40)" in text.output
    held_out = sorted((image_folders / "heldout").iterdir())[0]
    refused = CliRunner().invoke(adain_cli, args[:-4] + ["-o", str(held_out)])
    assert refused.exit_code == 2 and "held-out images" in refused.output
