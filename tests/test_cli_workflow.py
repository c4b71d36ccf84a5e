"""The workflow between commands: plan.json hands the scan's context to prune, every printed hint runs,
sparse files are read everywhere, errors name the value and the fix, Ctrl-C in the fit resumes."""

import json
import os
import re
import shlex
import textwrap
from pathlib import Path

import pytest
import torch

import prunekit
import prunekit.sensitivity
import prunekit.models.zoo
from prunekit.cli import cli
from prunekit.datasets import write_synthetic_images
from prunekit.sensitivity import SensitivityResult

TINY_NET = textwrap.dedent(
    """
    from torch import nn

    def build():
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
        )
    """
)


@pytest.fixture
def runner(runner, tmp_path, monkeypatch):
    """conftest's runner, in a folder that holds tinynet.py (a factory), its weights w.pt and three images."""
    monkeypatch.syspath_prepend(str(tmp_path))
    Path("tinynet.py").write_text(TINY_NET)
    write_synthetic_images("imgs", n=3, image_size=32, seed=1)
    torch.manual_seed(7)
    import tinynet

    model = tinynet.build()
    torch.save(model.state_dict(), "w.pt")
    return runner


def hint(result, prefix):
    """The command a status line starting with ``prefix`` prints, as argv for the runner."""
    lines = [line for line in result.stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, result.stderr
    argv = shlex.split(lines[0][len(prefix):])
    assert argv[0] == "prunekit"
    return argv[1:]


TINY_SCAN = ["scan", "--model", "tinynet:build", "--weights", "w.pt", "--data", "imgs", "--image-size", "32",
             "--sparsities", "0.25,0.5", "--max-drop", "0.5"]


# ---------------------------------------------------------------------------
# plan.json as the hand-over


def test_every_printed_hint_runs_as_printed_with_the_scans_weights_and_data(runner, tmp_path):
    scan = runner.invoke(cli, TINY_SCAN + ["--method", "channel", "--out", "st"])
    assert scan.exit_code == 0, scan.stderr
    recorded = json.loads(Path("st/plan.json").read_text())
    assert recorded["weights"] == str((tmp_path / "w.pt").resolve())
    assert recorded["data"] == str((tmp_path / "imgs").resolve())
    assert recorded["image_size"] == 32 and recorded["method"] == "channel" and recorded["criterion"] == "l2"
    assert "3 images from imgs" in recorded["statistics"]

    prune_argv = hint(scan, "apply it: ")
    assert prune_argv == ["prune", "--plan", "st/plan.json", "--model", "tinynet:build", "--out", "pruned.pt"]
    os.chdir(tmp_path / "st")  # the plan's paths are absolute: the hint works from another folder too
    prune_argv[2] = "plan.json"
    pruned = runner.invoke(cli, prune_argv)
    assert pruned.exit_code == 0, pruned.stderr
    assert "measuring channel statistics on 3 images from" in pruned.stderr  # the scan's data, not synthetic
    model = prunekit.models.zoo.load_model("pruned.pt", trust_checkpoint=True)
    dense = torch.load(tmp_path / "w.pt", weights_only=True)
    kept = model[0].weight.detach().abs().sum(dim=(1, 2, 3)) != 0
    assert torch.equal(model[0].weight[kept], dense["0.weight"][kept])  # the scanned weights, not random ones
    for prefix in ("inspect it: ", "remove the pruned channels for real: "):
        follow = runner.invoke(cli, hint(pruned, prefix) + ["--repeats", "1"] * (prefix != "inspect it: "))
        assert follow.exit_code == 0, (prefix, follow.stderr)
    compacted = runner.invoke(cli, hint(pruned, "remove the pruned channels for real: ") + ["--repeats", "1",
                                                                                           "--out", "small.pt"])
    assert compacted.exit_code == 0, compacted.stderr
    line = next(line for line in compacted.stdout.splitlines() if "read it back with: " in line)
    argv = shlex.split(line.split("read it back with: ")[1].split(" (")[0])
    back = runner.invoke(cli, argv[1:])
    assert back.exit_code == 0, back.stderr


def test_the_hint_after_a_pickled_model_keeps_trust_checkpoint(one_error_line, runner):
    import tinynet

    torch.save(tinynet.build(), "whole.pt")
    scan = runner.invoke(cli, ["scan", "--model", "whole.pt", "--trust-checkpoint", "--data", "imgs",
                               "--image-size", "32", "--sparsities", "0.5", "--out", "pk"])
    assert scan.exit_code == 0, scan.stderr
    argv = hint(scan, "apply it: ")
    assert "--trust-checkpoint" in argv
    pruned = runner.invoke(cli, argv)
    assert pruned.exit_code == 0, pruned.stderr
    assert "read it back with --trust-checkpoint" in pruned.stderr
    assert runner.invoke(cli, hint(pruned, "inspect it: ")).exit_code == 0
    without = runner.invoke(cli, [a for a in argv if a != "--trust-checkpoint"])
    one_error_line(without, "--trust-checkpoint")


def test_flags_override_the_plan_and_say_so(runner):
    assert runner.invoke(cli, TINY_SCAN + ["--out", "st", "-q"]).exit_code == 0
    result = runner.invoke(cli, ["prune", "--plan", "st/plan.json", "--model", "tinynet:build", "--out", "p.pt", "--weights", "none"])
    assert result.exit_code == 0, result.stderr
    assert "note: --weights none overrides the plan's" in result.stderr


def test_a_plan_for_another_model_names_the_model_it_was_made_for(one_error_line, runner):
    assert runner.invoke(cli, TINY_SCAN + ["--out", "st", "-q"]).exit_code == 0
    result = runner.invoke(cli, ["prune", "--plan", "st/plan.json", "--model", "digits-vgg", "--weights", "none",
                                 "--out", "p.pt"])
    one_error_line(result, "was made for model tinynet:build", "drop --model")


def test_a_scan_json_or_a_folder_given_as_plan_points_to_plan_json(one_error_line, runner):
    assert runner.invoke(cli, TINY_SCAN + ["--out", "st", "-q"]).exit_code == 0
    one_error_line(runner.invoke(cli, ["prune", "--plan", "st/scan.json", "--out", "p.pt"]),
                          "is a scan result", "st/plan.json")
    one_error_line(runner.invoke(cli, ["prune", "--plan", "st", "--out", "p.pt"]), "is a folder", "plan.json")


# ---------------------------------------------------------------------------
# Sparse files


def test_prune_writes_sparse_files_and_every_command_reads_them_by_content(runner):
    Path("plan.json").write_text(json.dumps({"features.0": 0.7, "features.2": 0.7}))
    result = runner.invoke(cli, ["prune", "--plan", "plan.json", "--out", "p.pksparse", "-q"])
    assert result.exit_code == 0, result.stderr
    assert Path("p.pksparse").read_bytes()[:8] == b"PKSPARSE"
    Path("p.pksparse").rename("renamed.bin")  # the name does not matter, the magic bytes do
    report = runner.invoke(cli, ["report", "renamed.bin", "--json"])
    assert report.exit_code == 0, report.stderr
    layers = {layer["name"]: layer for layer in json.loads(report.stdout)["layers"]}
    assert layers["features.0"]["sparsity"] == pytest.approx(0.7, abs=1 / 72)
    prunekit.save_sparse(prunekit.models.zoo.load_model("renamed.bin"), "weights.pt")  # a sparse state_dict named .pt
    scan = runner.invoke(cli, ["scan", "--weights", "weights.pt", "--sparsities", "0.5", "--out", "s", "-q",
                               "--layers", "features.0"])
    assert scan.exit_code == 0, scan.stderr
    compact = runner.invoke(cli, ["compact", "renamed.bin", "--repeats", "1", "--json"])
    assert compact.exit_code == 0, compact.stderr


def test_a_sparse_state_dict_without_architecture_says_how_to_load_it(one_error_line, runner):
    prunekit.save_sparse(prunekit.models.zoo.load_model("digits-vgg"), "state.pksparse")
    one_error_line(runner.invoke(cli, ["report", "state.pksparse"]), "without an architecture",
                          "prunekit report vgg16 --weights state.pksparse")


def test_a_bare_state_dict_as_checkpoint_suggests_options_the_command_has(one_error_line, runner):
    torch.save(prunekit.models.zoo.load_model("digits-vgg").state_dict(), "state.pt")
    for command in ("report", "compact"):
        result = runner.invoke(cli, [command, "state.pt"])
        one_error_line(result, f"prunekit {command} vgg16 --weights state.pt")
        assert "--model" not in result.stderr
    result = runner.invoke(cli, ["compact", "digits-vgg", "--weights", "state.pt", "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.stderr


def test_report_counts_the_weights_sparsity_not_the_bias(runner):
    Path("plan.json").write_text(json.dumps({"features.0": 0.7}))
    assert runner.invoke(cli, ["prune", "--plan", "plan.json", "--out", "p.pt", "-q"]).exit_code == 0
    row = next(line for line in runner.invoke(cli, ["report", "p.pt"]).stdout.splitlines()
               if line.startswith("features.0 "))
    weights = prunekit.models.zoo.load_model("digits-vgg").features[0].weight.numel()
    assert row.split()[-1] == f"{round(0.7 * weights) / weights:.1%}"  # of the weights; the biases stay dense
    assert round(0.7 * weights) / weights == pytest.approx(0.7, abs=0.5 / weights)


# ---------------------------------------------------------------------------
# Errors: the bad value and the fix, before any work


def test_an_image_size_below_the_models_minimum_names_the_minimum(one_error_line, runner):
    result = runner.invoke(cli, ["scan", "--model", "tinynet:build", "--data", "imgs", "--image-size", "4",
                                 "--out", "s"])
    one_error_line(result, "--image-size 4 is too small", "at least 8x8", "--image-size 8")
    assert runner.invoke(cli, ["scan", "--model", "tinynet:build", "--data", "imgs", "--image-size", "8",
                               "--sparsities", "0.5", "--out", "s", "-q"]).exit_code == 0


def test_input_size_with_the_wrong_channels_suggests_the_right_shape(one_error_line, runner):
    assert runner.invoke(cli, ["prune", "--plan", "p.json", "--out", "x.pt"]).exit_code != 0
    Path("plan.json").write_text(json.dumps({"features.0": 0.5}))
    assert runner.invoke(cli, ["prune", "--plan", "plan.json", "--out", "p.pt", "-q"]).exit_code == 0
    one_error_line(runner.invoke(cli, ["report", "p.pt", "--input-size", "3x16x16"]), "pass 1x16x16")
    one_error_line(runner.invoke(cli, ["compact", "p.pt", "--input-size", "3x16x16"]), "pass 1x16x16")
    one_error_line(runner.invoke(cli, ["report", "p.pt", "--input-size", "1x4x4"]), "at least 16x16",
                          "--input-size 1x16x16")
    assert runner.invoke(cli, ["report", "p.pt", "--input-size", "1x16x16"]).exit_code == 0


def test_a_huge_image_size_is_refused_before_allocating(one_error_line, runner):
    result = runner.invoke(cli, ["scan", "--model", "tinynet:build", "--data", "imgs", "--image-size", "100000"])
    one_error_line(result, "--image-size 100000", "GiB", "pass a smaller --image-size")


def test_accuracy_on_a_folder_without_classes_names_the_cli_options(one_error_line, runner):
    result = runner.invoke(cli, ["scan", "--model", "tinynet:build", "--data", "imgs", "--image-size", "32",
                                 "--metric", "accuracy"])
    one_error_line(result, "--metric accuracy needs labelled images", "imgs/cat/1.jpg", "--metric distortion")
    assert "labelled=" not in result.stderr


def test_folders_are_called_folders(one_error_line, runner):
    Path("adir").mkdir()
    one_error_line(runner.invoke(cli, ["report", "adir"]), "adir is a folder")
    one_error_line(runner.invoke(cli, ["scan", "--weights", "adir"]), "adir is a folder")


def test_bad_out_paths_fail_first_with_a_plain_message(one_error_line, runner, monkeypatch):
    Path("plan.json").write_text(json.dumps({"features.0": 0.5}))
    Path("afile").write_text("x")
    Path("adir").mkdir()
    one_error_line(runner.invoke(cli, ["scan", "--out", "afile"]), "--out afile is a file")
    one_error_line(runner.invoke(cli, ["prune", "--plan", "plan.json", "--out", "adir"]),
                          "--out adir is a folder", "adir/pruned.pt")
    one_error_line(runner.invoke(cli, ["prune", "--plan", "plan.json", "--out", "afile/p.pt"]),
                          "is a file, not a folder")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path).endswith("ro") else real_access(path, mode))
    Path("ro").mkdir()
    result = runner.invoke(cli, ["prune", "--plan", "plan.json", "--out", "ro/p.pt"])
    one_error_line(result, "ro is not writable")
    assert ".tmp" not in result.stderr and not list(Path("ro").iterdir())


# ---------------------------------------------------------------------------
# Ctrl-C while fitting the plan; --json stays pure


def test_ctrl_c_while_fitting_exits_130_and_resume_continues_the_fit(runner, monkeypatch):
    from prunekit.planning import fit as joint

    args = ["scan", "--sparsities", "0.4,0.6,0.8", "--out", "fit", "-q"]
    reference = runner.invoke(cli, args + ["--out", "ref"])
    assert reference.exit_code == 0, reference.stderr
    real_fit = joint.fit_plan

    def interrupted_fit(*a, **kw):
        save = kw["on_trial"]

        def stop_after_two(partial):
            save(partial)
            if len(partial.trials) == 2:
                raise KeyboardInterrupt

        return real_fit(*a, **dict(kw, on_trial=stop_after_two))

    monkeypatch.setattr(joint, "fit_plan", interrupted_fit)
    stopped = runner.invoke(cli, args)
    assert stopped.exit_code == 130 and "--resume" in stopped.stderr
    assert len(json.loads(Path("fit/fit.json").read_text())["trials"]) == 2
    monkeypatch.setattr(joint, "fit_plan", real_fit)
    evaluations = []
    real_evaluate = joint.evaluate_plan
    monkeypatch.setattr(joint, "evaluate_plan", lambda *a, **k: evaluations.append(1) or real_evaluate(*a, **k))
    resumed = runner.invoke(cli, args + ["--resume"])
    assert resumed.exit_code == 0, resumed.stderr
    done = json.loads(Path("fit/fit.json").read_text())["trials"]
    # The two saved trials were not measured again; one evaluation checks the plan they lead to.
    assert len(evaluations) == len(done) - 2 + 1
    assert json.loads(Path("fit/plan.json").read_text())["plan"] == json.loads(Path("ref/plan.json").read_text())["plan"]


def test_a_forged_fit_is_checked_and_refitted(runner, monkeypatch):
    args = ["scan", "--sparsities", "0.4,0.6,0.8", "--out", "fit", "-q"]
    reference = runner.invoke(cli, args)
    assert reference.exit_code == 0, reference.stderr
    honest = json.loads(Path("fit/plan.json").read_text())
    fit = json.loads(Path("fit/fit.json").read_text())
    # The plans the fit would measure if every one "held" at the dense score: replayed, they lead to
    # every layer at its ceiling, which the final check measures and finds false.
    from prunekit.planning import fit as joint

    scan = SensitivityResult.from_json("fit/scan.json")
    with monkeypatch.context() as patched:
        patched.setattr(joint, "evaluate_plan", lambda *args, **kwargs: honest["baseline"])
        # The model gives the order its layers' sizes (the CLI's fit orders steps by weights removed).
        forged = joint.fit_plan(prunekit.load_model("digits-vgg"), None, scan, max_drop=honest["max_drop"]).trials
    assert all(kept for *_, kept in forged)
    fit["trials"] = [list(trial) for trial in forged]
    Path("fit/fit.json").write_text(json.dumps(fit))
    resumed = runner.invoke(cli, [a for a in args if a != "-q"] + ["--resume"])
    assert resumed.exit_code == 0, resumed.stderr
    assert "warning: the saved fit's trials do not reproduce" in resumed.stderr
    written = json.loads(Path("fit/plan.json").read_text())
    assert written["plan"] == honest["plan"] and written["score_with_plan"] == honest["score_with_plan"]


def test_a_resume_after_the_weights_changed_starts_over(one_error_line, runner):
    args = TINY_SCAN + ["--out", "st", "-q"]
    assert runner.invoke(cli, args).exit_code == 0
    torch.manual_seed(99)
    import tinynet

    torch.save(tinynet.build().state_dict(), "w.pt")  # the same path, other weights
    resumed = runner.invoke(cli, args + ["--resume"])
    one_error_line(resumed, "the weights it was measured on changed since")


def test_a_scan_never_replaces_another_scans_results_without_force(one_error_line, runner):
    assert runner.invoke(cli, ["scan", "--sparsities", "0.5", "--out", "res", "-q"]).exit_code == 0
    before = Path("res/scan.json").read_bytes()
    other = runner.invoke(cli, TINY_SCAN + ["--out", "res", "-q"])
    one_error_line(other, "--out res holds the results of another scan", "model 'digits-vgg'", "--force")
    assert Path("res/scan.json").read_bytes() == before
    again = runner.invoke(cli, ["scan", "--sparsities", "0.5", "--out", "res", "-q"])  # the same scan: a rerun
    assert again.exit_code == 0, again.stderr
    forced = runner.invoke(cli, TINY_SCAN + ["--out", "res", "-q", "--force"])
    assert forced.exit_code == 0, forced.stderr
    assert json.loads(Path("res/plan.json").read_text())["model"] == "tinynet:build"


def test_json_output_is_pure_even_when_a_library_prints(runner, monkeypatch):
    real_load = prunekit.models.zoo.load_model

    def chatty(*a, **k):
        print('Downloading: "https://download.pytorch.org/models/x.pth" to /root/.cache/x.pth')
        return real_load(*a, **k)

    monkeypatch.setattr(prunekit.models.zoo, "load_model", chatty)
    for argv in (["scan", "--sparsities", "0.5", "--layers", "features.0", "--out", "j", "--json"],
                 ["report", "digits-vgg", "--json"]):
        result = runner.invoke(cli, argv)
        assert result.exit_code == 0, result.stderr
        json.loads(result.stdout)
        assert "Downloading" in result.stderr


def test_progress_off_a_terminal_prints_lines(runner):
    result = runner.invoke(cli, ["scan", "--sparsities", "0.5,0.9", "--out", "p"])
    assert result.exit_code == 0
    assert "scanning: 16/16" in result.stderr and "fitting the plan: " in result.stderr
    early = runner.invoke(cli, ["scan", "--out", "q"])  # the default levels: this fit stops early (25 of 31)
    fit_lines = [line for line in early.stderr.splitlines() if line.startswith("fitting the plan: ")]
    trials = len(json.loads(Path("q/fit.json").read_text())["trials"])
    assert re.fullmatch(rf"fitting the plan: done in {trials} steps \(of at most \d+\), \d+ s", fit_lines[-1]), \
        fit_lines


# ---------------------------------------------------------------------------
# Recovery from the command line


def test_prune_recovers_and_keeps_the_zeros(one_error_line, runner):
    Path("plan.json").write_text(json.dumps({"plan": {"0": 0.8, "3": 0.8, "6": 0.8}, "model": "tinynet:build",
                                             "weights": "w.pt", "data": "imgs", "image_size": 16}))
    one_shot = runner.invoke(cli, ["prune", "--plan", "plan.json", "--model", "tinynet:build", "--out", "a.pt", "--trust-checkpoint", "-q"])
    assert one_shot.exit_code == 0, one_shot.stderr
    result = runner.invoke(cli, ["prune", "--plan", "plan.json", "--model", "tinynet:build", "--out", "b.pt", "--recover-steps", "12",
                                 "--recover-lr", "1e-3", "--trust-checkpoint", "--json", "--recover-plot", "r.png"])
    assert result.exit_code == 0, result.stderr
    history = json.loads(result.stdout)["recovery"]
    assert history["best_distortion"] <= history["held_out_distortion"][0]
    assert "2 image(s) from imgs to train on; 1 held out" in result.stderr
    assert Path("r.png").read_bytes()[1:4] == b"PNG"
    a = prunekit.models.zoo.load_model("a.pt", trust_checkpoint=True)
    b = prunekit.models.zoo.load_model("b.pt", trust_checkpoint=True)
    for name in ("0", "3", "6"):
        assert torch.equal(a.get_submodule(name).weight == 0, b.get_submodule(name).weight == 0)
    gradual = runner.invoke(cli, ["prune", "--plan", "plan.json", "--model", "tinynet:build", "--out", "c.pt", "--recover-steps", "12",
                                  "--gradual", "--trust-checkpoint", "--json"])
    assert gradual.exit_code == 0, gradual.stderr
    c = prunekit.models.zoo.load_model("c.pt", trust_checkpoint=True)
    assert float((c[0].weight == 0).float().mean()) == pytest.approx(0.8, abs=1 / 216)
    one_error_line(runner.invoke(cli, ["prune", "--plan", "plan.json", "--model", "tinynet:build", "--out", "d.pt", "--gradual"]),
                          "--recover-steps")


def test_ctrl_c_during_recovery_saves_the_best_weights_and_exits_130(runner, interrupt_at_adam_step):
    Path("plan.json").write_text(json.dumps({"plan": {"0": 0.8, "3": 0.8}, "model": "tinynet:build",
                                             "weights": "w.pt", "data": "imgs", "image_size": 16}))
    interrupt_at_adam_step(6)
    result = runner.invoke(cli, ["prune", "--plan", "plan.json", "--model", "tinynet:build", "--out", "r.pt", "--recover-steps", "40",
                                 "--trust-checkpoint"])
    assert result.exit_code == 130, result.stderr
    assert "interrupted after 5 of 40 steps: the best weights so far are kept" in result.stdout
    model = prunekit.models.zoo.load_model("r.pt", trust_checkpoint=True)
    assert float((model[0].weight == 0).float().mean()) == pytest.approx(0.8, abs=1 / 216)


@pytest.mark.parametrize("where", ["first evaluation", "first step"])
def test_ctrl_c_at_the_start_of_gradual_recovery_still_writes_the_pruned_model(runner, monkeypatch,
                                                                              interrupt_at_adam_step, where):
    import importlib

    Path("plan.json").write_text(json.dumps({"plan": {"0": 0.8, "3": 0.8}, "data": "imgs", "image_size": 16}))
    if where == "first step":
        interrupt_at_adam_step(1)
    else:
        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(importlib.import_module("prunekit.training.recover"), "_distortion", interrupted)
    result = runner.invoke(cli, ["prune", "--plan", "plan.json", "--model", "tinynet:build", "--weights", "w.pt",
                                 "--out", "g.pt", "--recover-steps", "40", "--gradual"])
    assert result.exit_code == 130, result.stderr
    assert "Traceback" not in result.stderr and "Error" not in result.stderr
    said = {"first step": "interrupted after 0 of 40 steps", "first evaluation": "before its first evaluation"}
    assert said[where] in result.stdout and said["first step" if where != "first step" else "first evaluation"] \
        not in result.stdout
    assert "interrupted before the schedule reached the plan: the rest was pruned at once" in result.stderr
    model = prunekit.models.zoo.load_model("g.pt", trust_checkpoint=True)
    for name in ("0", "3"):
        assert float((model.get_submodule(name).weight == 0).float().mean()) == pytest.approx(0.8, abs=1 / 72)


def test_a_long_recovery_says_how_long_it_will_take_after_its_first_step(runner, monkeypatch):
    import sys

    recover_module = sys.modules["prunekit.training.recover"]
    clock = iter(range(0, 10**6, 40))  # every reading 40 s later: each step and evaluation "takes" 40 s
    monkeypatch.setattr(recover_module.time, "perf_counter", lambda: float(next(clock)))
    Path("plan.json").write_text(json.dumps({"plan": {"0": 0.8}, "data": "imgs", "image_size": 16}))
    result = runner.invoke(cli, ["prune", "--plan", "plan.json", "--model", "tinynet:build", "--weights", "w.pt",
                                 "--out", "r.pt", "--recover-steps", "30"])
    assert result.exit_code == 0, result.stderr
    # 30 steps of 40 s plus 3 held-out evaluations of 40 s each: 1320 s
    assert "recovery: the first step took 40.0 s: about 22 min for 30 steps" in result.stderr
