"""run_scan: the library does what `prunekit scan` does, and each command only parses, calls and reports."""

import ast
import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import prunekit
from prunekit.cli import cli
from prunekit.datasets import digits_test_set, make_loader
from prunekit.methods.registry import get_method
from prunekit.sensitivity.folder import ScanFolder
from prunekit.planning.pipeline import ScanInterrupted, run_scan

CLI = Path(prunekit.__file__).parent / "cli"


def digits_batches():
    return list(make_loader(digits_test_set(), 360))


def test_run_scan_gives_the_clis_plan_scores_and_fit_on_the_default_job(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    printed = CliRunner().invoke(cli, ["scan", "--method", "channel", "--sparsities", "0.25,0.5", "--out", "c",
                                       "-q", "--json"])
    assert printed.exit_code == 0, printed.stderr
    document = json.loads(printed.stdout)
    model = prunekit.load_model("digits-vgg")
    run = run_scan(model, digits_batches(), method="channel", sparsities=(0.25, 0.5), progress=False)
    assert run.plan == document["plan"] and run.per_layer_plan == document["per_layer_plan"]
    assert run.score == document["score_with_plan"] and run.per_layer_score == document["score_with_per_layer_plan"]
    assert run.result.scores == document["scan"]["scores"]
    assert len(run.fit.trials) == document["fit"]["trials"] and run.compaction_problem is None
    assert run.method.data is not None and run.method.options == {"criterion": "l2"}  # prepared on the batches


def test_the_model_is_left_as_it_was_and_bad_input_is_refused():
    model = prunekit.load_model("digits-vgg")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_scan(model, digits_batches(), method=get_method("taylor"), sparsities=(0.5,), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(hasattr(m, "weight_orig") for m in model.modules())
    x = [torch.randn(2, 3, 8, 8)]
    small = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match="a relative tolerance divides by the dense score"):
        run_scan(small, x, relative=True, progress=False)
    with pytest.raises(ValueError, match="batches is empty"):
        run_scan(small, [], progress=False)
    with pytest.raises(ValueError, match="metric='accuracy' needs labelled batches"):
        run_scan(small, x, metric="accuracy", progress=False)


def test_an_interrupted_run_says_where_and_resumes_from_its_folder_to_the_same_plan(tmp_path, monkeypatch):
    model = prunekit.load_model("digits-vgg")
    batches = digits_batches()
    whole = run_scan(model, batches, sparsities=(0.5, 0.8), progress=False)
    (tmp_path / "s").mkdir()
    folder = ScanFolder(tmp_path / "s")
    import prunekit.sensitivity as sensitivity

    real_scan = sensitivity.scan

    def stopped(*args, **kwargs):
        def stop_after_two(partial):
            kwargs["on_point"](partial)
            if partial.num_done >= 2:
                raise KeyboardInterrupt

        return real_scan(*args, **dict(kwargs, on_point=stop_after_two))

    monkeypatch.setattr(sensitivity, "scan", stopped)
    with pytest.raises(ScanInterrupted) as interrupted:
        run_scan(model, batches, sparsities=(0.5, 0.8), folder=folder, progress=False)
    assert interrupted.value.stage == "scan"
    monkeypatch.setattr(sensitivity, "scan", real_scan)
    said = []
    folder = ScanFolder(tmp_path / "s")  # as a new run finds it (a folder reads scan.json once)
    resumed = run_scan(model, batches, sparsities=(0.5, 0.8), folder=folder, resume_from=folder.partial_scan(),
                       progress=False, on_status=said.append)
    assert any(line.startswith("resuming: 2 points") for line in said)
    assert resumed.plan == whole.plan and resumed.result.scores == whole.result.scores
    other = prunekit.load_model("digits-vgg")
    with torch.no_grad():
        other.features[0].weight.mul_(2)
    folder = ScanFolder(tmp_path / "s")
    with pytest.raises(ValueError, match="used other options"):  # other weights: not the same scan
        run_scan(other, batches, sparsities=(0.5, 0.8), folder=folder, resume_from=folder.partial_scan(),
                 progress=False)


def _functions(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


LIBRARY_WORK = ("collect_channel_stats", "manual_seed", "evaluate_plan", "fit_plan", "Accuracy(", "OutputDistortion(",
                "random.Random", "model_fingerprint", "GradualPruner", "latency_samples",
                "export_program", "export_onnx", "relative_error")


def test_no_cli_module_runs_the_model():
    """Forwards (the input-size search included) are library work: prunekit.input_size, run_scan, ..."""
    for path in sorted(CLI.glob("*.py")):
        source = path.read_text(encoding="utf-8")
        assert not re.search(r"(?<![\w.])model\(", source), path.name
        for name in LIBRARY_WORK:
            assert name not in source, (path.name, name)


@pytest.mark.parametrize("command", ["scan", "prune", "compact", "report"])
def test_each_command_parses_calls_and_reports(command):
    source = (CLI / f"{command}.py").read_text(encoding="utf-8")
    for name in LIBRARY_WORK:
        assert name not in source, name
    longest = max(_functions(CLI / f"{command}.py"), key=lambda node: node.end_lineno - node.lineno)
    assert longest.end_lineno - longest.lineno + 1 < 80, longest.name
