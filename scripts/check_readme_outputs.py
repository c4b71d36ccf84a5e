"""Check that the output README.md quotes is what its command prints today.

Each quoted output in README.md follows a marker naming the command that prints it::

    <!-- output of: prunekit scan -->
    ```
    accuracy (higher is better), dense baseline 0.9972, ...
    ...
    ```

This script runs each command in an empty temporary folder (so it writes nothing
here) and checks that every quoted line, in order, is a line of what it printed;
a line ``...`` stands for lines left out. Markers written ``output of (slow):``
run only with ``--all`` (the HED scan takes minutes); the test suite runs the others.

Usage:
    python scripts/check_readme_outputs.py          # the quick ones
    python scripts/check_readme_outputs.py --all    # every quoted output (HED included)
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, NamedTuple, Optional

README = Path(__file__).resolve().parent.parent / "README.md"
_MARKER = re.compile(r"^<!-- output of( \(slow\))?: (.+?) -->$")


class QuotedOutput(NamedTuple):
    command: str
    slow: bool
    lines: List[str]


def quoted_outputs(text: str) -> List[QuotedOutput]:
    """Every (command, quoted lines) pair in the README text."""
    found = []
    lines = text.splitlines()
    for index, line in enumerate(lines):
        match = _MARKER.match(line.strip())
        if match is None:
            continue
        if index + 1 >= len(lines) or not lines[index + 1].startswith("```"):
            raise ValueError(f"README line {index + 1}: an output marker must be followed by a ``` block")
        end = next(i for i in range(index + 2, len(lines)) if lines[i].startswith("```"))
        found.append(QuotedOutput(match.group(2), bool(match.group(1)), lines[index + 2 : end]))
    return found


def missing_lines(quoted: List[str], printed: str) -> Optional[str]:
    """The first quoted line not found (in order) among the printed lines; None when all are there."""
    output = [line.rstrip() for line in printed.splitlines()]
    position = 0
    for line in quoted:
        if line.strip() == "...":
            continue
        try:
            position = output.index(line.rstrip(), position) + 1
        except ValueError:
            return line
    return None


def check(quoted: QuotedOutput, timeout: float = 3600) -> Optional[str]:
    """Run the quoted command in an empty folder; a message when its output differs, else None."""
    argv = shlex.split(quoted.command)
    if argv[0] == "prunekit":
        argv = [sys.executable, "-m", "prunekit", *argv[1:]]
    with tempfile.TemporaryDirectory() as folder:
        done = subprocess.run(argv, cwd=folder, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        return f"`{quoted.command}` exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"
    line = missing_lines(quoted.lines, done.stdout)
    if line is not None:
        return f"`{quoted.command}` no longer prints the README's line {line!r}; it printed:\n{done.stdout}"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="also run the slow commands (the HED scan)")
    args = parser.parse_args()
    failures = 0
    for quoted in quoted_outputs(README.read_text(encoding="utf-8")):
        if quoted.slow and not args.all:
            print(f"skipped (slow; --all runs it): {quoted.command}")
            continue
        problem = check(quoted)
        print(f"{'ok' if problem is None else 'DIFFERS'}: {quoted.command}")
        if problem is not None:
            print(problem)
            failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
