"""Reproductions from a new user's and an attacker's tries (issue 20), each fixed: outputs, hints, inputs, errors."""

import json
from pathlib import Path

import pytest
import torch

from prunekit.cli import cli


def one_error_line(result, *fragments):
    assert result.exit_code == 1, (result.exit_code, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: ") and sum(line.startswith("Error: ") for line in lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


def test_two_outputs_never_name_the_same_file(runner):
    Path("plan.json").write_text(json.dumps({"features.0": 0.5}))
    one_error_line(runner.invoke(cli, ["prune", "--plan", "plan.json", "--out", "a.pt", "--recover-steps", "2",
                                       "--recover-plot", "./a.pt"]),
                   "--recover-plot ./a.pt and --out a.pt name the same file")
    assert not Path("a.pt").exists()
    assert runner.invoke(cli, ["prune", "--plan", "plan.json", "--out", "p.pt", "-q"]).exit_code == 0
    one_error_line(runner.invoke(cli, ["compact", "p.pt", "--out", "d.bin", "--exported", "d.bin"]),
                   "--exported d.bin and --out d.bin name the same file")
    assert not Path("d.bin").exists()


def test_a_pipe_in_a_data_folder_is_skipped_not_waited_on(runner):
    import os

    from prunekit.datasets import write_synthetic_images

    write_synthetic_images("imgs", n=2, image_size=32, seed=0)
    os.mkfifo("imgs/a.jpg")
    result = runner.invoke(cli, ["scan", "--model", "vgg11", "--data", "imgs", "--image-size", "32",
                                 "--layers", "features.0", "--sparsities", "0.5", "--out", "s", "-q"])
    assert result.exit_code == 0, result.stderr
    assert "skipping" in result.stderr and "a.jpg" in result.stderr and "not a regular file" in result.stderr


@pytest.mark.parametrize("root", ["/", "/proc", "/usr"])
def test_a_system_folder_is_refused_as_data(runner, root):
    Path("plan.json").write_text(json.dumps({"plan": {"features.0": 0.5}, "model": "vgg11", "data": root}))
    result = runner.invoke(cli, ["prune", "--plan", "plan.json", "--method", "channel", "--out", "p.pt"])
    one_error_line(result, f"is the system folder {root}")


def test_the_process_group_waits_at_most_the_timeout(monkeypatch):
    import datetime

    from prunekit.cli.session import DEFAULT_TIMEOUT, process_group

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: None)
    with process_group(torch.device("cpu"), 5):
        pass
    with process_group(torch.device("cpu")):
        pass
    assert calls == [("gloo", {"timeout": datetime.timedelta(seconds=5)}),
                     ("gloo", {"timeout": datetime.timedelta(seconds=DEFAULT_TIMEOUT)})]
    assert DEFAULT_TIMEOUT <= 600  # torch's own default is 30 minutes


@pytest.mark.slow
def test_under_torchrun_rank_0_alone_prints_the_error(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "prunekit", "scan", "--model", "vgg11", "--data", "missing", "--out", "s"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert len(ours) == 1, done.stderr[-3000:]  # not one per rank (torchrun's own report follows)
    assert "missing" in done.stderr


@pytest.mark.parametrize("command", [["scan", "--out", "/proc/prunekit-x"],
                                     ["prune", "--plan", "plan.json", "--out", "/proc/x.pt"]])
def test_an_output_place_that_cannot_be_written_fails_before_any_work(runner, monkeypatch, command):
    import prunekit.models.zoo

    Path("plan.json").write_text(json.dumps({"features.0": 0.5}))
    monkeypatch.setattr(prunekit.models.zoo, "load_model", lambda *a, **k: pytest.fail("work started"))
    line = one_error_line(runner.invoke(cli, command), "cannot write in /proc", "choose a writable place")
    assert ".tmp" not in line


def test_a_missing_data_folder_is_called_missing(runner):
    one_error_line(runner.invoke(cli, ["scan", "--data", "./nonexist", "--out", "s"]),
                   "--data ./nonexist: no such folder")


def test_a_full_disk_names_the_file_and_the_way_on(runner, monkeypatch):
    import errno
    import os

    import prunekit.io.files

    real_fdopen = os.fdopen

    class Full:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prunekit.io.files.os, "fdopen", lambda *a, **k: Full(real_fdopen(*a, **k)))
    Path("plan.json").write_text(json.dumps({"features.0": 0.5}))
    line = one_error_line(runner.invoke(cli, ["prune", "--plan", "plan.json", "--out", "p.pt"]),
                          "cannot write 'p.pt': No space left on device", "free some space")
    assert ".tmp" not in line and "pos" not in line
    assert not any(name.endswith(".tmp") for name in os.listdir("."))
    monkeypatch.setattr(prunekit.io.files.os, "fdopen", real_fdopen)  # (undo() would also undo the fixture's chdir)
    Path("ch.json").write_text(json.dumps({"features.5": 0.5}))
    assert runner.invoke(cli, ["prune", "--plan", "ch.json", "--method", "channel", "--out", "ch.pt", "-q"]).exit_code == 0
    monkeypatch.setattr(prunekit.io.files.os, "fdopen", lambda *a, **k: Full(real_fdopen(*a, **k)))
    exported = runner.invoke(cli, ["compact", "ch.pt", "--repeats", "1", "--exported", "ch.pt2"])
    one_error_line(exported, "cannot write 'ch.pt2': No space left on device")  # not an abort in torch's writer


# ---------------------------------------------------------------------------
# Models with several outputs; NaN never passes silently


class TwoHeads(torch.nn.Module):
    def __init__(self, as_dict=False):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
                                            torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
        self.as_dict = as_dict

    def forward(self, x):
        features = self.features(x)
        logits = self.head(features)
        return {"logits": logits, "features": features} if self.as_dict else (logits, features)


@pytest.mark.parametrize("as_dict", [False, True])
def test_a_model_returning_several_outputs_is_scored_on_the_first(as_dict):
    from prunekit.sensitivity import Accuracy, OutputDistortion, scan

    torch.manual_seed(0)
    model = TwoHeads(as_dict)
    x = torch.randn(8, 1, 8, 8)
    labels = model(x)["logits" if as_dict else 0].argmax(1)
    accuracy = scan(model, Accuracy([(x, labels)]), sparsities=(0.5,), progress=False)
    assert accuracy.baseline == 1.0 and all(len(v) == 1 for v in accuracy.scores.values())
    distortion = scan(model, OutputDistortion(x), sparsities=(0.5,), progress=False)
    assert distortion.baseline == 0.0 and all(v[0] > 0 for v in distortion.scores.values())


def test_a_factory_returning_a_tuple_scans_from_the_cli(runner):
    source = __import__("inspect").getsource(TwoHeads)
    Path("heads.py").write_text(f"import torch\n{source}\ndef build():\n    return TwoHeads()\n")
    result = runner.invoke(cli, ["scan", "--model", "heads:build", "--sparsities", "0.5", "--out", "s", "-q"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(Path("s/plan.json").read_text())["baseline"] > 0.05  # digits accuracy, scored on the logits


def test_nan_inputs_are_refused_naming_the_batch():
    from prunekit.sensitivity import Accuracy, OutputDistortion, scan

    batches = [torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)]
    batches[1][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="input batch 1 holds NaN or Inf"):
        OutputDistortion(batches)
    model = TwoHeads()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="input batch 1 holds NaN or Inf"):
        scan(model, Accuracy([(b, torch.zeros(2, dtype=torch.long)) for b in batches]), progress=False)
    assert list(model.state_dict()) == list(before)  # no _orig/_mask left behind
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_metric_returning_nan_is_refused_naming_the_point():
    from prunekit.sensitivity import scan

    model = TwoHeads()
    with pytest.raises(ValueError, match="dense model scores nan"):
        scan(model, lambda m: float("nan"), progress=False)
    calls = []

    def nan_when_pruned(m):
        calls.append(1)
        return 1.0 if len(calls) == 1 else float("nan")

    with pytest.raises(ValueError, match=r"score of features\.0 at 40% sparsity is NaN"):
        scan(model, nan_when_pruned, progress=False)


def test_dense_outputs_with_nan_are_refused_naming_the_batch():
    from prunekit.sensitivity import OutputDistortion, scan

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3))
    with torch.no_grad():
        model[0].bias[0] = float("inf")
    with pytest.raises(ValueError, match="dense model's output on batch 0 holds NaN or Inf"):
        scan(model, OutputDistortion(torch.randn(2, 1, 8, 8)), progress=False)


@pytest.mark.parametrize("name", ["scan", "prune", "report", "compact"])
def test_each_option_names_its_default_once(name):
    command = cli.commands[name]
    for param in command.params:
        if not isinstance(param, __import__("click").Option):
            continue
        text = (param.help or "").lower() + (" [default" if param.show_default else "")
        assert text.count("default") <= 1, (name, param.name, param.help)


def test_a_plan_that_prunes_nothing_says_so_and_offers_nothing_to_apply(runner):
    result = runner.invoke(cli, ["scan", "--sparsities", "0.9", "--max-drop", "0", "--out", "z"])
    assert result.exit_code == 0, result.stderr
    assert "no layer stays within the tolerance" in result.stdout
    assert "apply it" not in result.stderr
    assert "warning: fit_plan: no layer stays within max_drop=0" in result.stderr


def test_the_hint_for_a_checkpoint_naming_a_factory_runs_as_printed(runner):
    import shlex

    Path("plan.json").write_text(json.dumps({"plan": {"features.0": 0.5}}))
    pruned = runner.invoke(cli, ["prune", "--plan", "plan.json", "--model", "prunekit.models.zoo:digits_vgg", "--out",
                                 "v.pt", "-q"])
    assert pruned.exit_code == 0, pruned.stderr
    for command in ("report", "compact"):
        line = one_error_line(runner.invoke(cli, [command, "v.pt"]), "--trust-checkpoint", f"prunekit {command} ")
        printed = shlex.split(line.split("type the architecture yourself: ")[1])
        assert printed[:2] == ["prunekit", command] and "--model" not in printed
        extra = ["--input-size", "1x16x16"] + (["--repeats", "1"] if command == "compact" else [])
        followed = runner.invoke(cli, printed[1:] + extra)
        assert followed.exit_code == 0, (command, followed.stderr)


@pytest.mark.parametrize("recorded, fragments", [
    ({"seed": "abc"}, ["records seed 'abc'", "whole number"]),
    ({"seed": 1e30}, ["records seed 1e+30"]),
    ({"image_size": float("nan")}, ["records image_size nan"]),
    ({"image_size": -5}, ["records image_size -5"]),
    ({"model": 123}, ["records model 123, not a name or path"]),
    ({"data": 5}, ["records data 5"]),
    ({"plan": [0.5]}, ["must hold a mapping"]),
    ({"plan": {"features.0": 1.5}}, ["sparsity of 'features.0' is 1.5"]),
    ({"image_size": 3}, ["--image-size (as --plan plan.json records it) 3 is too small",
                         "pass --image-size to override"]),
])
def test_bad_plan_values_are_one_line_naming_the_file(runner, recorded, fragments):
    document = {"plan": {"features.0": 0.5}, "model": "vgg11", "data": "photos"}
    document.update(recorded)
    Path("plan.json").write_text(json.dumps(document))
    one_error_line(runner.invoke(cli, ["prune", "--plan", "plan.json", "--method", "channel", "--out", "p.pt"]),
                   *fragments)


def test_odd_plan_files_are_one_line(runner):
    import os

    Path("deep.json").write_text("[" * 100_000 + "]" * 100_000)
    one_error_line(runner.invoke(cli, ["prune", "--plan", "deep.json", "--out", "p.pt"]), "nested too deeply")
    os.mkfifo("fifo.json")
    one_error_line(runner.invoke(cli, ["prune", "--plan", "fifo.json", "--out", "p.pt"]), "not a regular file")
    with open("big.json", "wb") as handle:
        handle.truncate(65 * 2**20)  # sparse: no disk used
    one_error_line(runner.invoke(cli, ["prune", "--plan", "big.json", "--out", "p.pt"]), "65 MiB")


@pytest.mark.parametrize("fit", ['[1, 2]', '"text"', '{"format": "prunekit.fit/1", "key": null, "trials": [["a"]]}',
                                 '{"format": "prunekit.fit/1", "trials": [{"a": 1}]}'])
def test_a_malformed_fit_file_is_ignored_on_resume(runner, fit):
    assert runner.invoke(cli, ["scan", "--sparsities", "0.5", "--out", "f", "-q"]).exit_code == 0
    expected = json.loads(Path("f/plan.json").read_text())["plan"]
    Path("f/fit.json").write_text(fit)
    resumed = runner.invoke(cli, ["scan", "--sparsities", "0.5", "--out", "f", "-q", "--resume"])
    assert resumed.exit_code == 0, resumed.stderr
    assert json.loads(Path("f/plan.json").read_text())["plan"] == expected


def test_a_scan_json_with_odd_options_is_refused_on_resume(runner):
    assert runner.invoke(cli, ["scan", "--sparsities", "0.5", "--out", "f", "-q"]).exit_code == 0
    document = json.loads(Path("f/scan.json").read_text())
    document["meta"]["options"] = [1, 2]
    Path("f/scan.json").write_text(json.dumps(document))
    one_error_line(runner.invoke(cli, ["scan", "--sparsities", "0.5", "--out", "f", "--resume"]),
                   "records no options")


@pytest.mark.parametrize("argv", [["-h"], ["scan", "-h"], ["scan", "--sparsities", "2"],
                                  ["prune", "--plan", "missing.json", "--out", "p.pt"], ["compact", "-h"]])
def test_help_and_argument_errors_answer_before_torch_is_imported(tmp_path, argv):
    import subprocess
    import sys

    code = ("import sys\nfrom prunekit.cli import cli\ntry:\n    cli(sys.argv[1:], prog_name='prunekit')\n"
            "except SystemExit:\n    pass\nprint('torch imported' if 'torch' in sys.modules else 'no torch')")
    done = subprocess.run([sys.executable, "-c", code, *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.strip().splitlines()[-1] == "no torch", (done.stdout, done.stderr)


def test_a_rank_other_than_0_waits_for_rank_0_then_says_its_own_error(runner, monkeypatch):
    """torchrun stops every rank once one exits: a rank > 0 that exited at once could stop rank 0 before it
    printed why (seen under load); it waits, and if still running (rank 0 did not fail) it speaks itself."""
    import prunekit.cli.errors as errors

    waits = []
    monkeypatch.setattr(errors.time, "sleep", waits.append)
    monkeypatch.setenv("RANK", "1")
    done = runner.invoke(cli, ["scan", "--data", "missing-folder", "--out", "s"])
    assert done.exit_code == 1
    assert waits == [errors.RANK_GRACE_SECONDS] and errors.RANK_GRACE_SECONDS >= 5
    assert done.output.strip().splitlines()[-1].startswith("Error: rank 1: ") and "missing-folder" in done.output
    monkeypatch.setenv("RANK", "0")
    waits.clear()
    done = runner.invoke(cli, ["scan", "--data", "missing-folder", "--out", "s"])
    assert done.exit_code == 1 and waits == [] and "Error: rank" not in done.output
