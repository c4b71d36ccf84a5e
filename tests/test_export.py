"""Deployable compaction: the compacted model (folded border-bias constants included) exports to
torch.export and ONNX (checked with onnxruntime) and compiles without graph breaks."""

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import prunekit
from prunekit.cli import cli
from prunekit.compact import BorderBiasConv2d
from prunekit.export import export_onnx, export_program


def compacted_with_border_bias():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding=1),
    )
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.bias.data.uniform_(0.5, 1)  # a masked channel becomes a non-zero constant after BN + ReLU
    prunekit.channel_activation(model[0], torch.tensor([5.0, 0, 4, 0, 3, 2, 0, 1]), amount=3)  # BN not masked
    small = prunekit.compact(model.eval())
    assert any(isinstance(m, BorderBiasConv2d) for m in small.modules())
    return model, small


def test_torch_export_program_round_trips(tmp_path):
    model, small = compacted_with_border_bias()
    x = torch.rand(2, 3, 11, 9)
    assert export_program(small, x, tmp_path / "m.pt2") < 1e-6
    loaded = torch.export.load(str(tmp_path / "m.pt2"))
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(x), model(x))


def test_a_wrong_export_is_measured_as_wrong(tmp_path, monkeypatch):
    model, small = compacted_with_border_bias()
    x = torch.rand(2, 3, 11, 9)
    other = prunekit.copy_model(small)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)  # what a broken export would run instead
    program = torch.export.export(other, (x,))
    monkeypatch.setattr(torch.export, "load", lambda path: program)
    assert export_program(small, x, tmp_path / "m.pt2") > 1e-3


def test_a_wrong_onnx_file_is_measured_as_wrong(tmp_path, monkeypatch):
    onnxruntime = pytest.importorskip("onnxruntime", reason="pip install onnx onnxruntime onnxscript")
    _, small = compacted_with_border_bias()
    real_run = onnxruntime.InferenceSession.run
    monkeypatch.setattr(onnxruntime.InferenceSession, "run",
                        lambda self, *a, **k: [output * 1.01 for output in real_run(self, *a, **k)])
    assert export_onnx(small, torch.rand(1, 3, 11, 9), tmp_path / "m.onnx") == pytest.approx(0.01, rel=1e-3)


def test_onnx_agrees_with_onnxruntime_within_1e_5(tmp_path):
    pytest.importorskip("onnxruntime", reason="pip install onnx onnxruntime onnxscript")
    _, small = compacted_with_border_bias()
    assert export_onnx(small, torch.rand(1, 3, 11, 9), tmp_path / "m.onnx") < 1e-5


def test_compact_command_writes_checked_deployment_files(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime", reason="pip install onnx onnxruntime onnxscript")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    assert runner.invoke(cli, ["scan", "--method", "channel", "--sparsities", "0.5", "--layers", "features.5",
                               "--max-drop", "1", "--out", "ch", "-q"]).exit_code == 0
    assert runner.invoke(cli, ["prune", "--plan", "ch/plan.json", "--out", "ch.pt", "-q"]).exit_code == 0
    result = runner.invoke(cli, ["compact", "ch.pt", "--repeats", "1", "--exported", "ch.pt2", "--onnx", "ch.onnx", "--json"])
    assert result.exit_code == 0, result.stderr
    checks = json.loads(result.stdout)["export_checks"]
    assert checks["exported"] < 1e-6 and checks["onnx"] < 1e-5 and checks["compact_vs_source"] < 1e-5
    refused = runner.invoke(cli, ["compact", "ch.pt", "--onnx", "ch.pt"])
    assert refused.exit_code == 1 and "is the input checkpoint" in refused.stderr


@pytest.mark.slow
def test_compacted_model_compiles_without_graph_breaks():
    model, small = compacted_with_border_bias()
    compiled = torch.compile(small, fullgraph=True)  # fullgraph: a graph break is an error
    x = torch.rand(1, 3, 10, 12)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def compacted_groups():
    from test_compact_groups import Net, mask_units, randomize_batchnorms

    torch.manual_seed(0)
    model = Net()
    randomize_batchnorms(model)
    mask_units(model.eval())
    return model, prunekit.compact(model)


def test_a_model_compacted_across_residuals_gates_and_depthwise_convs_exports(tmp_path):
    model, small = compacted_groups()
    assert small.block.depthwise[0].groups == 6 and small.stem.out_channels == 3
    x = torch.rand(2, 3, 8, 8)
    assert export_program(small, x, tmp_path / "g.pt2") < 1e-6
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(str(tmp_path / "g.pt2")).module()(x), model(x))
    pytest.importorskip("onnxruntime", reason="pip install onnx onnxruntime onnxscript")
    assert export_onnx(small, x[:1], tmp_path / "g.onnx") < 1e-5
