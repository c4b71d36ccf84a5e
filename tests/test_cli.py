"""The prunekit command line (click's CliRunner): outputs, files, resume and errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit
import prunekit.sensitivity
import prunekit.models.zoo
from prunekit.cli import cli, parse_sparsities
from prunekit.datasets import write_synthetic_images
from prunekit.sensitivity import SensitivityResult

VGG_SCAN = [
    "scan", "--model", "vgg11", "--data", "imgs", "--image-size", "32",
    "--layers", "features.0,features.3", "--sparsities", "0.5,0.9", "--out", "vgg",
]


@pytest.fixture
def images(runner):
    write_synthetic_images("imgs", n=3, image_size=32, seed=1)
    return Path("imgs")


@pytest.fixture
def tiny(images):
    """Options scanning a tiny pickled RGB model (fast) on the image folder."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )
    torch.save(model, "tiny.pt")
    return [
        "scan", "--model", "tiny.pt", "--trust-checkpoint", "--data", "imgs", "--image-size", "32",
        "--sparsities", "0.5,0.9",
    ]


# ---------------------------------------------------------------------------
# scan


@pytest.mark.slow
def test_scan_with_no_options_scans_the_builtin_digits_model(runner):
    result = runner.invoke(cli, ["scan"])
    assert result.exit_code == 0, result.stderr
    assert "accuracy (higher is better)" in result.stdout
    for layer in prunekit.conv_layers(prunekit.models.zoo.load_model("digits-vgg")):
        assert layer in result.stdout
    assert "suggested plan" in result.stdout
    out = Path("prunekit-scan")
    scan = SensitivityResult.from_json(out / "scan.json")
    assert scan.complete and scan.metric == "accuracy" and scan.baseline > 0.9
    # Fine-grained: the six convs and the classifier's two Linear layers.
    assert scan.layers[-2:] == ["classifier.1", "classifier.3"] and len(scan.layers) == 8
    assert scan.sparsities == (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["joint"] and plan["per_layer_plan"] == scan.plan(0.01)
    assert all(plan["plan"][layer] <= level for layer, level in scan.plan(0.01).items())
    # the joint plan holds with every layer pruned at once; the per-layer one need not
    assert scan.baseline - plan["score_with_plan"] <= 0.01 + 1e-9
    assert any(plan["plan"].values())
    assert (out / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "scan.csv").read_text().startswith("layer,baseline,0.4,0.5,0.6,0.7,0.8,0.9\n")


def test_scan_vgg11_random_weights_on_an_image_folder(runner, images):
    result = runner.invoke(cli, VGG_SCAN)
    assert result.exit_code == 0, result.stderr
    assert "distortion (lower is better)" in result.stdout
    assert "features.0" in result.stdout and "features.3" in result.stdout
    scan = SensitivityResult.from_json("vgg/scan.json")
    assert scan.layers == ["features.0", "features.3"] and scan.sparsities == (0.5, 0.9)
    assert all(0 < s for values in scan.scores.values() for s in values)
    assert scan.meta["options"]["model"] == "vgg11"
    assert Path("vgg/plan.json").is_file() and Path("vgg/sensitivity.png").is_file()


def test_scan_json_prints_one_document(runner, tiny):
    result = runner.invoke(cli, tiny + ["--out", "j", "--json", "--quiet"])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert set(document["plan"]) == {"0", "3", "7"}  # the convs and the Linear head
    assert document["scan"]["complete"] is True
    assert document["files"]["scan"].endswith("scan.json")


def test_scan_json_says_what_the_plan_fit_measured(runner):
    result = runner.invoke(cli, ["scan", "--sparsities", "0.5,0.9", "--out", "d", "--json", "--quiet"])  # digits-vgg
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    fit = document["fit"]  # its saved trials, and the weights its plan removes
    assert fit["trials"] == len(json.loads(Path(document["files"]["fit"]).read_text())["trials"]) > 0
    weights = {name: prunekit.load_model("digits-vgg").get_submodule(name).weight.numel() for name in document["plan"]}
    removed = sum(level * weights[name] for name, level in document["plan"].items()) / sum(weights.values())
    assert fit["sparsity"] == pytest.approx(removed) and removed > 0
    assert 0 <= fit["left"] < 0.005  # the default min_gain


def test_scan_skips_unreadable_files_with_a_warning(runner, tiny, images):
    (images / "notes.txt").write_text("not an image")
    (images / "broken.png").write_bytes(b"garbage")
    result = runner.invoke(cli, tiny + ["--out", "w"])
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: skipping")]
    assert len(warnings) == 2 and any("broken.png" in w for w in warnings)


def test_interrupted_scan_resumes_to_the_same_result(runner, tiny, monkeypatch):
    args = tiny + ["--out", "r", "-q"]
    real_scan = prunekit.sensitivity.scan

    def interrupted_scan(*a, **kw):
        save = kw["on_point"]

        def stop_after_two(result):
            save(result)
            if result.num_done == 2:
                raise KeyboardInterrupt

        return real_scan(*a, **dict(kw, on_point=stop_after_two))

    monkeypatch.setattr(prunekit.sensitivity, "scan", interrupted_scan)
    stopped = runner.invoke(cli, args)
    assert stopped.exit_code == 130
    assert "--resume" in stopped.stderr
    partial = SensitivityResult.from_json("r/scan.json")
    assert not partial.complete and partial.num_done == 2

    monkeypatch.setattr(prunekit.sensitivity, "scan", real_scan)
    resumed = runner.invoke(cli, args + ["--resume"])
    assert resumed.exit_code == 0, resumed.stderr
    fresh = runner.invoke(cli, tiny + ["--out", "f", "-q"])
    assert fresh.exit_code == 0
    assert SensitivityResult.from_json("r/scan.json").scores == SensitivityResult.from_json("f/scan.json").scores


def test_resume_refuses_changed_options(one_error_line, runner, tiny):
    assert runner.invoke(cli, tiny + ["--out", "c", "-q"]).exit_code == 0
    changed = [a if a != "0.5,0.9" else "0.6,0.9" for a in tiny]
    result = runner.invoke(cli, changed + ["--out", "c", "--resume"])
    one_error_line(result, "--resume", "sparsities")


def test_resume_without_a_partial_scan(one_error_line, runner):
    one_error_line(runner.invoke(cli, ["scan", "--resume", "--out", "nothing"]), "--resume", "no partial scan")


@pytest.mark.parametrize(
    "sparsities, fragment",
    [
        ("0.5,1.2", "outside [0, 1)"),
        ("-0.1,0.5", "outside [0, 1)"),
        ("", "empty"),
        ("0.5,0.5", "listed twice"),
        ("0.7,0.5", "increasing order"),
        ("0.4:0.9", "start:stop:step"),
        ("a,b", "start:stop:step"),
        ("0.4:0.9:0", "step must be a positive"),
    ],
)
def test_bad_sparsities(one_error_line, runner, sparsities, fragment):
    one_error_line(runner.invoke(cli, ["scan", "--sparsities", sparsities]), "--sparsities", fragment)


def test_unknown_layer_lists_the_valid_ones(one_error_line, runner):
    result = runner.invoke(cli, ["scan", "--layers", "features.0,features.99"])
    one_error_line(result, "features.99", "Conv2d or Linear layers are: features.0, features.2")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--model", "missing.pt"], ["missing.pt", "not found"]),
        (["--model", "vgg11", "--data", "no-such-folder"], ["--data", "no-such-folder", "no such folder"]),
        (["--weights", "no-weights.pth"], ["no-weights.pth", "not found"]),
        (["--model", "vgg11", "--metric", "accuracy"], ["--metric accuracy needs labelled images"]),
        (["--image-size", "32"], ["built-in digits are 16x16"]),
        (["--max-drop", "-1"], ["--max-drop"]),
    ],
)
def test_errors_are_one_line(one_error_line, runner, args, fragments):
    one_error_line(runner.invoke(cli, ["scan"] + args), *fragments)


def test_cuda_device_without_cuda_is_one_line(one_error_line, runner, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine that has a GPU
    one_error_line(runner.invoke(cli, ["scan", "--device", "cuda:0"]), "use --device cpu")


def test_folder_without_images_fails(runner):
    Path("junk").mkdir()
    Path("junk/a.txt").write_text("x")
    result = runner.invoke(cli, ["scan", "--model", "vgg11", "--data", "junk"])
    assert result.exit_code != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: --data junk: no readable image")


def test_imagenet_weights_offline_say_how_to_pass_a_file(one_error_line, runner, monkeypatch):
    import torchvision

    def offline(self, *args, **kwargs):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    result = runner.invoke(cli, ["scan", "--model", "vgg11", "--weights", "imagenet"])
    one_error_line(result, "failed", "--weights PATH")


def test_parse_sparsities_range_includes_stop():
    assert parse_sparsities("0.4:0.9:0.1") == (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    assert parse_sparsities("0.5, 0.8") == (0.5, 0.8)


# ---------------------------------------------------------------------------
# prune and report


def test_prune_applies_a_plan_and_report_reads_the_checkpoint(runner):
    Path("plan.json").write_text(json.dumps({"plan": {"features.0": 0.5, "features.2": 0.75}, "method": "fine-grained"}))
    result = runner.invoke(cli, ["prune", "--plan", "plan.json", "--out", "pruned.pt"])
    assert result.exit_code == 0, result.stderr
    model = prunekit.models.zoo.load_model("pruned.pt")
    assert not any(name.endswith(("_orig", "_mask")) for name in model.state_dict())
    assert float((model.features[2].weight == 0).float().mean()) == pytest.approx(0.75, abs=0.01)

    report = runner.invoke(cli, ["report", "pruned.pt", "--input-size", "1x16x16", "--json"])
    assert report.exit_code == 0, report.stderr
    layers = {layer["name"]: layer for layer in json.loads(report.stdout)["layers"]}
    assert layers["features.0"]["zeros"] == round(0.5 * model.features[0].weight.numel())  # bias stays dense
    assert layers["features.2"]["effective_macs"] < layers["features.2"]["macs"]
    text = runner.invoke(cli, ["report", "pruned.pt"])
    assert text.exit_code == 0 and "features.2" in text.stdout


def test_prune_accepts_a_bare_mapping(runner):
    Path("bare.json").write_text(json.dumps({"features.0": 0.5}))
    result = runner.invoke(cli, ["prune", "--plan", "bare.json", "--out", "p.pt", "-q"])
    assert result.exit_code == 0, result.stderr
    assert Path("p.pt").is_file()


def test_prune_errors(one_error_line, runner):
    one_error_line(runner.invoke(cli, ["prune", "--plan", "nope.json", "--out", "p.pt"]), "nope.json")
    Path("bad.json").write_text(json.dumps({"features.9": 0.5}))
    result = runner.invoke(cli, ["prune", "--plan", "bad.json", "--out", "p.pt"])
    one_error_line(result, "unknown layer 'features.9'")
    assert not Path("p.pt").exists()


def test_report_refuses_a_pickled_model_unless_trusted(one_error_line, runner):
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3)), "whole.pt")
    one_error_line(runner.invoke(cli, ["report", "whole.pt"]), "--trust-checkpoint")
    trusted = runner.invoke(cli, ["report", "whole.pt", "--trust-checkpoint"])
    assert trusted.exit_code == 0 and "Conv2d" in trusted.stdout


# ---------------------------------------------------------------------------
# The group


def test_version_and_help(runner):
    assert runner.invoke(cli, ["--version"]).stdout.strip() == f"prunekit {prunekit.__version__}"
    for command in ([], ["scan"], ["prune"], ["report"]):
        result = runner.invoke(cli, command + ["-h"])
        assert result.exit_code == 0
        lines = result.stdout.rstrip().splitlines()
        assert "Examples:" in result.stdout
        assert lines[-1].strip().startswith(" ".join(["prunekit"] + command))  # help ends with an example


def test_python_dash_m_runs_the_cli():
    done = subprocess.run(
        [sys.executable, "-m", "prunekit", "--version"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == f"prunekit {prunekit.__version__}"


def test_per_layer_flag_writes_each_layers_own_level(runner, tiny):
    result = runner.invoke(cli, tiny + ["--out", "pl", "--per-layer", "--quiet"])
    assert result.exit_code == 0, result.stderr
    plan = json.loads(Path("pl/plan.json").read_text())
    scan = SensitivityResult.from_json("pl/scan.json")
    assert plan["joint"] is False and plan["plan"] == scan.plan(plan["max_drop"])


def _channel_pruned_digits(runner):
    plan = {"features.5": 0.5, "features.10": 0.25}
    Path("plan.json").write_text(json.dumps(plan))
    result = runner.invoke(cli, ["prune", "--plan", "plan.json", "--method", "channel", "--out", "ch.pt", "--quiet"])
    assert result.exit_code == 0, result.stderr
    return plan


def test_compact_removes_channel_pruned_channels_and_times_both(runner):
    _channel_pruned_digits(runner)
    result = runner.invoke(cli, ["compact", "ch.pt", "--repeats", "2", "--json", "--out", "small.pt"])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    rows = {row["layer"]: row for row in document["report"]["layers"]}
    assert rows["features.5"]["out_channels_after"] == 16 and rows["features.10"]["out_channels_after"] == 48
    assert set(document["seconds"]) == {"pruned", "compact"} and document["removed"]
    low, high = document["speedup_interval"]
    assert low <= document["speedup"] <= high
    assert document["within_noise"] == (low <= 1.0 <= high)
    for name, (q1, q3) in document["seconds_iqr"].items():
        assert q1 <= document["seconds"][name] <= q3
    small = prunekit.models.zoo.load_model("small.pt")  # a compacted checkpoint: no pickled code to trust
    assert small.features[5].out_channels == 16
    report = runner.invoke(cli, ["report", "small.pt"])
    assert report.exit_code == 0 and "features.5" in report.stdout, report.stderr
    pruned = prunekit.models.zoo.load_model("ch.pt")
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(small(x), pruned(x))  # fp32 tolerances: logits near 7 differ in the last bits


def test_compact_says_nothing_to_remove_and_times_nothing_for_an_unpruned_model(runner, monkeypatch):
    import prunekit.measure.timing

    timed = []
    monkeypatch.setattr(prunekit.measure.timing, "latency_samples", lambda *a, **k: timed.append(1))
    Path("plan.json").write_text(json.dumps({"features.5": 0.5}))
    assert runner.invoke(cli, ["prune", "--plan", "plan.json", "--out", "fg.pt", "-q"]).exit_code == 0
    result = runner.invoke(cli, ["compact", "fg.pt"])
    assert result.exit_code == 0, result.stderr
    assert "nothing to remove" in result.stdout and "speed-up" not in result.stdout and not timed
    document = json.loads(runner.invoke(cli, ["compact", "fg.pt", "--json"]).stdout)
    assert document["removed"] is False and document["speedup"] is None


def test_compact_says_the_machine_is_busy_instead_of_an_interval_it_cannot_act_on(runner, monkeypatch):
    import prunekit.measure.timing

    # Rounds timed under load (the reported line: IQR 24.35-152.65 ms, "1.10x (95% interval 1.09-6.10x)").
    pruned = [0.025, 0.150, 0.030, 0.140, 0.027, 0.160, 0.024, 0.152, 0.026, 0.155]
    compact = [0.023, 0.024, 0.026, 0.025, 0.024, 0.026, 0.022, 0.025, 0.023, 0.024]
    monkeypatch.setattr(prunekit.measure.timing, "latency_samples",
                        lambda *a, **k: {"pruned": pruned, "compact": compact})
    _channel_pruned_digits(runner)
    result = runner.invoke(cli, ["compact", "ch.pt"])
    assert result.exit_code == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if "speed-up" in line)
    assert "the machine is busy" in line and "--threads 1" in line and "--repeats" in line
    assert "x (95% interval" not in line  # no speed-up figure stated as if it were one
    document = json.loads(runner.invoke(cli, ["compact", "ch.pt", "--json"]).stdout)
    assert document["too_noisy"] is True and document["speedup_interval"][1] > 1.5 * document["speedup_interval"][0]


def test_compact_refuses_pickled_model_without_trust(runner):
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3)), "whole.pt")
    result = runner.invoke(cli, ["compact", "whole.pt"])
    assert result.exit_code == 1 and "--trust-checkpoint" in result.stderr
    assert "Traceback" not in result.stderr


def test_relative_with_distortion_fails_before_the_scan(one_error_line, runner, tiny, monkeypatch):
    monkeypatch.setattr(prunekit.sensitivity, "scan", lambda *a, **k: pytest.fail("scanned first"))
    result = runner.invoke(cli, tiny + ["--relative", "-q"])
    one_error_line(result, "--relative", "drop --relative")


def test_the_footnote_and_wording_follow_the_table(runner, tiny):
    result = runner.invoke(cli, tiny + ["--max-drop", "100", "-q"])  # nothing beyond the tolerance
    assert result.exit_code == 0
    assert "*" not in result.stdout and "every score within the tolerance" in result.stdout
    assert "max distortion rise 100" in result.stdout and "distortion drop" not in result.stdout


@pytest.mark.parametrize("command", ["scan", "prune", "report", "compact"])
def test_every_command_takes_threads(runner, command, monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.append(n))
    result = runner.invoke(cli, [command, "--threads", "1", "--help"])
    assert result.exit_code == 0 and "--threads" in result.stdout
    args = {"scan": ["scan", "--threads", "1", "--sparsities", "0.5", "--layers", "features.0", "-q", "--out", "t"],
            "prune": ["prune", "--threads", "1", "--plan", "missing.json", "--out", "p.pt"]}
    if command in args:
        runner.invoke(cli, args[command])
        assert seen == [1, 7]  # set for the command, and restored after it (after an error too)
    assert runner.invoke(cli, [command, "--threads", "0"]).exit_code == 2  # click's usage error, one line


def test_outputs_never_land_on_inputs(one_error_line, runner, images):
    Path("plan.json").write_text('{"features.0": 0.5}')
    one_error_line(runner.invoke(cli, ["prune", "--plan", "plan.json", "--out", "plan.json"]), "is the --plan file")
    assert Path("plan.json").read_text() == '{"features.0": 0.5}'
    result = runner.invoke(cli, ["scan", "--model", "vgg11", "--data", "imgs", "--out", "imgs/results"])
    one_error_line(result, "inside --data imgs")


def test_shared_options_have_one_definition_and_one_help():
    def option(command, name):
        return next(p for p in cli.commands[command].params if p.name == name)

    for name in ("weights", "trust_checkpoint"):
        assert option("compact", name).help == option("report", name).help  # CHECKPOINT commands: one wording
        assert option("scan", name).help == option("prune", name).help.replace(
            " Default (--plan's own value first, when it records one):", " Default:")  # --model commands
    for command in ("scan", "prune", "compact", "report"):
        assert "as one JSON document on stdout" in option(command, "as_json").help
