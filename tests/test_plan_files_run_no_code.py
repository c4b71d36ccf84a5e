"""A plan file chooses no code: factories and trusted pickles come only from what the user types."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from prunekit.cli import cli
from prunekit.models.zoo import is_factory_spec, load_model

# Importing this module leaves a marker file: the tests below prove it was never imported.
MARKING_MODULE = textwrap.dedent(
    """
    from pathlib import Path
    from torch import nn

    Path("imported.marker").write_text("code ran")

    def build():
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    """
)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("marking.py").write_text(MARKING_MODULE)
    yield tmp_path
    sys.modules.pop("marking", None)


def one_error_line(result, *fragments):
    assert result.exit_code == 1, (result.exit_code, result.stderr)
    assert "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in error, error


@pytest.mark.parametrize("spec", ["marking:build", "os:abort", "http.server:test"])
def test_a_plan_naming_a_factory_is_refused_before_any_import(folder, spec):
    Path("plan.json").write_text(json.dumps({"plan": {"0": 0.5}, "model": spec}))
    result = CliRunner().invoke(cli, ["prune", "--plan", "plan.json", "--out", "p.pt"])
    one_error_line(result, f"names model {spec!r}", f"type it: --model {spec}")
    assert not Path("imported.marker").exists()
    assert not Path("p.pt").exists()


def test_the_typed_factory_is_the_users_word(folder):
    Path("plan.json").write_text(json.dumps({"plan": {"0": 0.5}, "model": "marking:build", "data": "builtin"}))
    result = CliRunner().invoke(cli, ["prune", "--plan", "plan.json", "--model", "marking:build", "--out", "p.pt",
                                      "-q"])
    assert result.exit_code == 0, result.stderr
    assert Path("imported.marker").exists()  # imported from the current folder, as typed


def test_trust_checkpoint_never_extends_to_a_model_file_the_plan_names(folder):
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3)), "whole.pt")
    Path("plan.json").write_text(json.dumps({"plan": {"0": 0.5}, "model": str(folder / "whole.pt")}))
    result = CliRunner().invoke(cli, ["prune", "--plan", "plan.json", "--out", "p.pt", "--trust-checkpoint"])
    one_error_line(result, "--trust-checkpoint applies to a --model you type", "--model", "whole.pt")
    typed = CliRunner().invoke(cli, ["prune", "--plan", "plan.json", "--model", "whole.pt", "--out", "p.pt",
                                     "--trust-checkpoint", "-q"])
    assert typed.exit_code == 0, typed.stderr


def test_a_factory_recorded_in_a_checkpoint_is_never_imported_from_the_current_folder(folder):
    from prunekit.models.zoo import save_checkpoint

    model = load_model("marking:build", factory_folder=folder)
    Path("imported.marker").unlink()
    sys.modules.pop("marking", None)
    save_checkpoint(model, "c.pt", "marking:build")
    with pytest.raises(ValueError, match="--trust-checkpoint"):
        load_model("c.pt")
    assert not Path("imported.marker").exists()


def test_factory_folder_is_searched_only_when_given(folder):
    with pytest.raises(ValueError, match="cannot import 'marking'"):
        load_model("marking:build")
    assert not Path("imported.marker").exists()
    assert str(folder) not in sys.path
    load_model("marking:build", factory_folder=folder)
    assert str(folder) not in sys.path  # put back as it was


def test_the_console_script_imports_a_typed_factory_from_the_current_folder(folder):
    script = shutil.which("prunekit", path=str(Path(sys.executable).parent))
    assert script is not None
    Path("plan.json").write_text(json.dumps({"plan": {"0": 0.5}}))
    done = subprocess.run([script, "prune", "--plan", "plan.json", "--model", "marking:build", "--out", "p.pt", "-q"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert Path("p.pt").is_file() and Path("imported.marker").exists()


def test_is_factory_spec():
    assert is_factory_spec("pkg.mod:make") and is_factory_spec(" os:abort ")
    assert not any(is_factory_spec(s) for s in ("vgg16", "a/b.pt", "c:\\x.pt", 123, None, "a:b:c"))


def test_the_scans_hint_types_a_factory_model(folder):
    from prunekit.cli.scan import _apply_hint

    assert "--model marking:build" in _apply_hint(Path("s/plan.json"), "marking:build", False)
    assert "--model" not in _apply_hint(Path("s/plan.json"), "digits-vgg", False)
    assert "--model m.pt --out pruned.pt --trust-checkpoint" in _apply_hint(Path("s/plan.json"), "m.pt", True)
