"""Atomic file output: a reader never sees a half-written file, even after a crash or Ctrl-C."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator, Union

import torch

__all__ = ["PathLike", "atomic_write", "read_json", "save_torch", "write_json"]

PathLike = Union[str, "os.PathLike[str]"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` in one step.

    On any error the temporary file is deleted and ``path`` keeps its old content.
    Parent folders are created.

    Example:
        >>> with atomic_write("out/plan.json") as f:  # doctest: +SKIP
        ...     f.write("{}")
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode={mode!r} is not supported; use 'w' (text) or 'wb' (binary)")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600 files; give the result the mode a plain open() would.
        os.chmod(tmp_name, 0o666 & ~_umask())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def write_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    with atomic_write(path, "w") as handle:
        json.dump(obj, handle, indent=2, sort_keys=False)
        handle.write("\n")


def read_json(path: PathLike) -> Any:
    """Read a JSON file, with an error that names the file when it is missing or malformed."""
    target = Path(path)
    if not target.is_file():
        raise FileNotFoundError(f"no such file: {str(target)!r}")
    try:
        return json.loads(target.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(target)!r} is not valid JSON ({err}); regenerate the file") from None


def save_torch(obj: Any, path: PathLike) -> None:
    """``torch.save`` to ``path`` atomically."""
    with atomic_write(path, "wb") as handle:
        torch.save(obj, handle)
