"""How every command fails and stops: one line on stderr, the right exit code, pure JSON on stdout.

Library errors become one ``error: ...`` line and exit 1 (no traceback; set
``PRUNEKIT_DEBUG=1`` to see it; under ``torchrun`` rank 0 prints it, and the
other ranks wait :data:`RANK_GRACE_SECONDS` first, so that torchrun stops them
once rank 0 has failed and said why; a rank still running then failed alone and
prints its own, with its rank); warnings become ``warning: ...`` lines; Ctrl-C
exits 130. With ``--json`` everything but the JSON document (status lines,
torchvision's download messages) goes to stderr, so stdout parses.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import sys
import time
import warnings
from typing import Any, Callable, Iterator, List

import click

from prunekit.messages import one_line

__all__ = ["emit_json", "library_errors", "one_line"]

# Errors the library raises on bad input; anything else is a bug and keeps its traceback.
_LIBRARY_ERRORS = (ValueError, KeyError, TypeError, OSError, RuntimeError, ImportError)
#: Under torchrun, how long a rank other than 0 waits before it reports an error (rank 0 says it first).
RANK_GRACE_SECONDS = 20.0
_JSON_STDOUT: List[Any] = []  # the real stdout while a --json command runs


def emit_json(document: Any) -> None:
    """Print ``document`` as the command's one JSON output, on the real stdout."""
    stream = _JSON_STDOUT[-1] if _JSON_STDOUT else None
    click.echo(json.dumps(document, indent=2), file=stream)


@contextlib.contextmanager
def _warnings_to_stderr() -> Iterator[None]:
    """Show each warning as one ``warning: ...`` line on stderr (e.g. skipped image files)."""

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        click.echo(f"warning: {one_line(message)}", err=True)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield


@contextlib.contextmanager
def _stdout_for_json(as_json: bool) -> Iterator[None]:
    if not as_json:
        yield
        return
    _JSON_STDOUT.append(sys.stdout)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _JSON_STDOUT.pop()


def library_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command: library errors to one line (exit 1), Ctrl-C to exit 130, ``--json`` output kept pure."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with _warnings_to_stderr(), _stdout_for_json(bool(kwargs.get("as_json"))):
                return func(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise  # click's own (Exit and Abort are RuntimeErrors)
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            raise click.exceptions.Exit(130) from None
        except _LIBRARY_ERRORS as err:
            if os.environ.get("PRUNEKIT_DEBUG"):
                raise
            message = one_line(err)
            if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                message += "; free some space and run the same command again (a scan continues with --resume)"
            rank = os.environ.get("RANK", "0")
            if rank not in ("", "0"):
                # Under torchrun every rank usually fails alike and rank 0 says why; a rank that exited at once
                # would make torchrun stop rank 0 before it could. Wait for it, and speak if it did not fail.
                time.sleep(RANK_GRACE_SECONDS)
                message = f"rank {rank}: {message}"
            raise click.ClickException(message) from None

    return wrapper

