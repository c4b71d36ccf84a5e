"""Checks on output paths, made before any work: each says what is wrong with the path and what to pass.

Outputs are written atomically (:func:`prunekit.io.files.atomic_write`), never over an
input, and a bad ``--out`` fails in a second rather than after a long scan with
the operating system's text about a temporary file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

__all__ = ["check_output_file", "check_output_folder", "refuse_inputs"]


def _nearest_existing(path: Path) -> Path:
    here = path.absolute()
    while not here.exists() and here != here.parent:
        here = here.parent
    return here


def _check_writable(flag: str, value: str, folder: Path) -> None:
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise NotADirectoryError(f"{flag} {value}: {existing} is a file, not a folder; choose another place")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {value}: the folder {existing} is not writable; choose a writable place")
    # Permission bits do not tell everything (root passes os.access; /proc, read-only mounts, full
    # disks refuse anyway): create and remove a probe file where the output will go.
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise PermissionError(
            f"{flag} {value}: cannot write in {existing} ({err.strerror or err}); choose a writable place"
        ) from None


def check_output_file(flag: str, value: str, example: str = "out.pt") -> Path:
    """``value`` can be written as a file: not a folder, in a folder we may write to (created if missing).

    Example:
        >>> check_output_file("--out", "pruned.pt").name
        'pruned.pt'
    """
    path = Path(value)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {value} is a folder; name a file in it, e.g. {path / example}")
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"{flag} {value} exists and is read-only; choose another file or make it writable")
    _check_writable(flag, value, path.parent)
    return path


def check_output_folder(flag: str, value: str) -> Path:
    """``value`` can hold this command's files: a folder (or a new one) we may write to.

    Example:
        >>> check_output_folder("--out", "scan-results").name
        'scan-results'
    """
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{flag} {value} is a file; this command writes a folder there: pass a folder name")
    _check_writable(flag, value, path)
    return path


def refuse_inputs(outputs: Iterable[Tuple[str, Optional[str]]], inputs: Iterable[Tuple[str, Optional[str]]]) -> None:
    """No output may be one of the inputs, nor another output: ``(flag, path)`` outputs, ``(what, path)`` inputs.

    ``None`` paths are skipped.

    Example:
        >>> refuse_inputs([("--out", "a.pt")], [("input checkpoint", "a.pt")])
        Traceback (most recent call last):
        ...
        ValueError: --out a.pt is the input checkpoint; write the result to another file
        >>> refuse_inputs([("--out", "a.pt"), ("--recover-plot", "./a.pt")], [])
        Traceback (most recent call last):
        ...
        ValueError: --recover-plot ./a.pt and --out a.pt name the same file; give each output a file of its own
    """
    sources = [(flag, Path(value).resolve()) for flag, value in inputs if value]
    written: List[Tuple[str, str, Path]] = []
    for flag, value in outputs:
        if value is None:
            continue
        target = Path(value).resolve()
        for source_flag, source in sources:
            if target == source:
                raise ValueError(f"{flag} {value} is the {source_flag}; write the result to another file")
        for other_flag, other_value, other in written:
            if target == other:
                raise ValueError(
                    f"{flag} {value} and {other_flag} {other_value} name the same file; give each output a file "
                    "of its own"
                )
        written.append((flag, value, target))
