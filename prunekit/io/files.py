"""Atomic file output: a reader never sees a half-written file, even after a crash or Ctrl-C."""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator, Optional, Union

__all__ = ["PathLike", "atomic_write", "package_folder", "read_json", "save_torch", "write_json"]

PathLike = Union[str, "os.PathLike[str]"]


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import: reading it means setting it, which would race with other threads.
_UMASK = _read_umask()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _remove_stale_temporaries(target: Path) -> None:
    """Delete temporaries a killed writer of ``target`` left behind (their pid is in the name and gone)."""
    for stray in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        pid_text = stray.name[len(target.name) + 2 :].split(".", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(int(pid_text)):
            with contextlib.suppress(OSError):
                stray.unlink()


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` in one step.

    On any error the temporary file is deleted and ``path`` keeps its old content.
    Parent folders are created. A file replaced keeps its permission bits; a new
    one gets those a plain ``open()`` would give (0666 less the umask). A temporary
    left by a writer that was killed (``SIGKILL``) is removed by the next write of
    the same file.

    Example:
        >>> with atomic_write("out/plan.json") as f:
        ...     _ = f.write("{}")
        >>> Path("out/plan.json").read_text()
        '{}'
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode={mode!r} is not supported; use 'w' (text) or 'wb' (binary)")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    try:
        permissions = target.stat().st_mode & 0o7777
    except FileNotFoundError:
        permissions = 0o666 & ~_UMASK
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    except OSError as err:
        raise _named(err, target) from None
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, permissions)  # mkstemp creates 0600 files
        os.replace(tmp_name, target)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if isinstance(err, OSError) and tmp_name in str(err):
            raise _named(err, target) from None
        if isinstance(err, OSError) and err.errno is not None and err.filename is None:
            raise _named(err, target) from None
        raise


def _named(err: OSError, target: Path) -> OSError:
    """The same error, naming the file the user asked for (never the temporary beside it)."""
    return type(err)(err.errno, f"cannot write {str(target)!r}: {err.strerror or err}")


def package_folder(package: str) -> Optional[Path]:
    """The folder of an installed package, found without importing it (None when it is not installed).

    Example:
        >>> package_folder("prunekit").name
        'prunekit'
    """
    import importlib.util

    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]) if locations else None


def write_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    with atomic_write(path, "w") as handle:
        json.dump(obj, handle, indent=2, sort_keys=False)
        handle.write("\n")


# prunekit's JSON files (plans, scans, fits) are kilobytes to a few megabytes; a larger one is not ours.
MAX_JSON_BYTES = 64 * 2**20


def read_json(path: PathLike, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Read a JSON file, with an error that names the file when it is missing, not a file, too large or malformed.

    At most ``max_bytes`` are read (the file is refused, not read whole, when it is
    larger), and a document nested too deeply for Python's parser is refused too.

    Example:
        >>> write_json("plan.json", {"features.0": 0.5})
        >>> read_json("plan.json")
        {'features.0': 0.5}
    """
    target = Path(path)
    if not target.exists():
        raise FileNotFoundError(f"no such file: {str(target)!r}")
    if not target.is_file():
        kind = "a folder" if target.is_dir() else "not a regular file (a pipe, socket or device)"
        raise ValueError(f"{str(target)!r} is {kind}; pass a JSON file")
    size = target.stat().st_size
    if size > max_bytes:
        raise ValueError(
            f"{str(target)!r} is {size / 2**20:,.0f} MiB, more than the {max_bytes / 2**20:,.0f} MiB a prunekit "
            "JSON file can hold; pass the file prunekit wrote"
        )
    try:
        with open(target, "rb") as handle:
            text = handle.read(max_bytes + 1).decode("utf-8")
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(target)!r} is not valid JSON ({err}); regenerate the file") from None
    except RecursionError:
        raise ValueError(f"{str(target)!r} is nested too deeply to be a prunekit JSON file; regenerate it") from None


def save_torch(obj: Any, path: PathLike) -> None:
    """``torch.save`` to ``path`` atomically.

    The bytes are made in memory first: a write that fails (a full disk) is then a
    plain ``OSError`` naming ``path``, not an error from torch's zip writer.
    """
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getbuffer())
