"""Reproductions from a new user's and an attacker's tries (issue 20), each fixed: outputs, hints, inputs, errors."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from prunekit.cli import cli


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return CliRunner()


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
