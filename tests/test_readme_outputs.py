"""README.md quotes what its commands print today (scripts/check_readme_outputs.py; the HED scan runs with --all)."""

import importlib.util
import re
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_readme_outputs.py"
spec = importlib.util.spec_from_file_location("check_readme_outputs", SCRIPT)
checker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(checker)


def test_the_readme_marks_its_quoted_outputs():
    quoted = checker.quoted_outputs(checker.README.read_text(encoding="utf-8"))
    commands = {q.command: q.slow for q in quoted}
    assert commands == {"prunekit scan": False, "prunekit scan --method channel --target-macs 0.5": False,
                        "prunekit scan --method 2:4": False,
                        "prunekit scan --model hed --out hed-scan": True,
                        "prunekit scan --model digits-resnet --method channel --target-macs 0.25 --steps 3 "
                        "--recover-steps 100 --threads 1 --out staged -q": True}
    assert all(len(q.lines) > 5 for q in quoted)


def test_quoted_lines_must_appear_in_order():
    printed = "a\nb\nc\n"
    assert checker.missing_lines(["a", "...", "c"], printed) is None
    assert checker.missing_lines(["c", "a"], printed) == "a"
    assert checker.missing_lines(["a", "x"], printed) == "x"


@pytest.mark.slow
def test_the_main_commands_output_is_the_one_the_readme_quotes():
    fast = [q for q in checker.quoted_outputs(checker.README.read_text(encoding="utf-8")) if not q.slow]
    # nothing checked would pass: the quotes must parse
    assert [q.command for q in fast] == ["prunekit scan", "prunekit scan --method 2:4",
                                         "prunekit scan --method channel --target-macs 0.5"]
    for quoted in fast:
        assert checker.check(quoted, timeout=600) is None


def test_the_opening_says_what_prunekit_does_for_the_classic_cnns_with_the_measured_figures():
    text = checker.README.read_text(encoding="utf-8")
    opening = text[: text.index("## Two commands")]
    section = text[text.index("## What pruning buys: measured here"):]
    assert "](#what-pruning-buys-measured-here)" in opening  # the measured table one click away
    table = {}
    for line in section.splitlines():  # the compact coverage table: | model | params | MACs | prunekit speed-up | ...
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and re.fullmatch(r"[a-z0-9_]+", cells[0]) and re.match(r"\d+\.\d+x \(", cells[3]):
            table[cells[0]] = cells[3].split("x")[0]
    assert {"resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "vgg16_bn"} <= set(table)
    quoted = dict(re.findall(r"([a-z][a-z0-9_]+) \**(\d+\.\d+)x", opening))
    assert {"resnet18", "mobilenet_v2"} <= set(quoted)  # a ResNet and a MobileNet, by name, with a figure
    assert all(table[model] == figure for model, figure in quoted.items())  # the table's figures, not others
    families = {"VGG": "vgg", "ResNet": "resnet", "MobileNet": "mobilenet", "EfficientNet": "efficientnet",
                "DenseNet": "densenet", "GoogLeNet": "googlenet", "RegNet": "regnet", "SqueezeNet": "squeezenet",
                "ShuffleNet": "shufflenet"}
    for family, prefix in families.items():  # every measured family is named in the opening
        assert not any(model.startswith(prefix) for model in table) or family in opening, family
