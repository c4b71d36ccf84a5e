"""README.md quotes what its commands print today (scripts/check_readme_outputs.py; the HED scan runs with --all)."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_readme_outputs.py"
spec = importlib.util.spec_from_file_location("check_readme_outputs", SCRIPT)
checker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(checker)


def test_the_readme_marks_its_quoted_outputs():
    quoted = checker.quoted_outputs(checker.README.read_text(encoding="utf-8"))
    commands = {q.command: q.slow for q in quoted}
    assert commands == {"prunekit scan": False, "prunekit scan --model hed --out hed-scan": True}
    assert all(len(q.lines) > 5 for q in quoted)


def test_quoted_lines_must_appear_in_order():
    printed = "a\nb\nc\n"
    assert checker.missing_lines(["a", "...", "c"], printed) is None
    assert checker.missing_lines(["c", "a"], printed) == "a"
    assert checker.missing_lines(["a", "x"], printed) == "x"


@pytest.mark.slow
def test_the_main_commands_output_is_the_one_the_readme_quotes():
    for quoted in checker.quoted_outputs(checker.README.read_text(encoding="utf-8")):
        if not quoted.slow:
            assert checker.check(quoted, timeout=600) is None
