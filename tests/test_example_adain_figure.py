"""The AdaIN pruning figure: held-out stylisations as the N weakest relu4_1 channels go, network beside network."""

import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from examples.style_transfer.adain_analysis import encoder_stats, load_heldout
from examples.style_transfer.adain_cli import adain as adain_cli
from examples.style_transfer.adain_figure import pruning_figure, stylisation_macs, training_ranking
from examples.style_transfer.adain_network import export_network, load_network
from examples.style_transfer.adain_train import TrainConfig, train
from prunekit.datasets import write_synthetic_images

COUNTS = [0, 8, 24, 40]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adain_figure")
    for offset, name in enumerate(("content", "style", "heldout_content", "heldout_style")):
        write_synthetic_images(root / name, 6, 40, seed=500 + offset)
    paths = {}
    for mode in ("baseline", "compact"):
        config = TrainConfig(
            str(root / "content"), str(root / "style"), str(root / mode), mode=mode, weights="random", width=0.125,
            arch="vgg16", steps=6, batch_size=2, crop=16, load_size=24, lr_encoder=3e-3, lr_decoder=1e-3,
            log_every=6, probe_every=6, checkpoint_every=6, probe_images=4,
        )
        train(config, progress=False, plot=False)
        paths[mode] = root / mode / "checkpoint.pt"
    return root, paths


def test_the_figure_measures_every_network_at_every_count(runs):
    root, paths = runs
    networks = {label: load_network(path) for label, path in paths.items()}
    content, style = load_heldout(root / "heldout_content", 16), load_heldout(root / "heldout_style", 16)
    rankings = {label: training_ranking(network, 16) for label, network in networks.items()}
    assert all(ranking.num_images == 12 for ranking in rankings.values())  # 6 training contents + 6 styles
    report = pruning_figure(networks, content, style, rankings, COUNTS, repeats=1)
    for label, network in networks.items():
        entry = report["networks"][label]
        rows = entry["rows"]
        assert [row["pruned"] for row in rows] == COUNTS
        assert rows[0]["params"] == network.net.parameter_counts()["total"]
        assert rows[0]["macs"] == stylisation_macs(network.net, content, style)
        # Each removed channel saves the same MACs (conv4_1 twice, the decoder's first conv once).
        saved = [(rows[0]["macs"] - row["macs"]) / row["pruned"] for row in rows[1:]]
        assert saved[0] > 0 and all(value == pytest.approx(saved[0]) for value in saved)
        assert all(a["params"] > b["params"] for a, b in zip(rows, rows[1:]))
        assert all(0 <= row["never_fire_pruned"] <= row["pruned"] for row in rows)
        assert entry["sorted_l2"] == sorted(entry["sorted_l2"], reverse=True) and len(entry["sorted_l2"]) == 64
        assert rows[0]["gram_distance"] > 0 and rows[0]["content_distance"] > 0
        assert set(report["outputs"][label]) == set(COUNTS)
    with pytest.raises(ValueError, match="same networks"):
        pruning_figure(networks, content, style, {"baseline": rankings["baseline"]}, COUNTS, repeats=1)


def test_a_network_file_is_ranked_by_its_own_training_statistics(runs, tmp_path):
    root, paths = runs
    file = tmp_path / "compact.pt"
    export_network(paths["compact"], file)
    network = load_network(file)
    assert training_ranking(network, 16) is network.stats
    checkpoint = load_network(paths["compact"])
    images = torch.cat([load_heldout(root / "content", 16), load_heldout(root / "style", 16)])
    torch.testing.assert_close(training_ranking(checkpoint, 16).l2, encoder_stats(checkpoint.net, images).l2)


def test_figure_cli_writes_the_picture_the_report_and_the_table(runs, tmp_path):
    root, paths = runs
    out = tmp_path / "figure"
    args = ["figure", "--checkpoint", f"baseline={paths['baseline']}", "--checkpoint", f"compact={paths['compact']}",
            "--content", str(root / "heldout_content"), "--style", str(root / "heldout_style"), "--size", "16",
            "--limit", "2", "--counts", ",".join(map(str, COUNTS)), "--repeats", "1", "--out", str(out), "--quiet",
            "--threads", "1"]
    result = CliRunner().invoke(adain_cli, args)
    assert result.exit_code == 0, result.output
    table = (out / "table.md").read_text().strip().splitlines()
    assert len(table) == 2 + 2 * len(COUNTS) and table[2].startswith("| baseline | 0 |")
    report = json.loads((out / "report.json").read_text())
    assert report["heldout"]["pairs"] == 2 and set(report["networks"]) == {"baseline", "compact"}
    with Image.open(out / "adain_pruning.png") as picture:
        assert picture.height > 4 * 16 and picture.width > (2 + len(COUNTS)) * 16  # 2 networks x 2 pairs
    too_many = CliRunner().invoke(adain_cli, args[:-8] + ["--counts", "0,64", "--repeats", "1", "--out", str(out),
                                                          "--quiet", "--threads", "1"])
    assert too_many.exit_code != 0 and "64" in too_many.output and "Traceback" not in too_many.output
