"""One progress display for every long job (scan, channel statistics, plan fit, recovery).

On a terminal it is click's bar. Off a terminal (a log file, CI, a pipe) a bar
cannot redraw, so it prints a plain line now and then instead: at most one per
``every`` seconds and one at the end, so that a job run under ``nohup`` or in CI
still shows that it moves and how far it got.

Example:
    >>> with progress_bar(3, "working", show=False) as tick:
    ...     for _ in range(3):
    ...         tick()
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator, Optional

import click

__all__ = ["progress_bar"]


@contextlib.contextmanager
def progress_bar(
    length: int, label: str, show: bool = True, *, every: float = 30.0
) -> Iterator[Callable[..., None]]:
    """A ``tick(item=None)`` callable that advances by one; nothing is shown when ``show`` is false.

    Args:
        length: the number of ticks expected.
        label: what the job is doing ("scanning").
        show: False for no output at all (``--quiet``).
        every: off a terminal, the least seconds between two printed lines.
    """
    if not show or length <= 0:
        yield lambda item=None: None
        return
    stream = sys.stderr
    if stream.isatty():
        with click.progressbar(
            length=length, label=label, file=stream, show_eta=True, show_pos=True,
            item_show_func=lambda item: item,
        ) as bar:
            yield lambda item=None: bar.update(1, item)
        return
    start = time.monotonic()
    state = {"done": 0, "printed": start, "shown": 0}

    def show_line(item: Optional[str] = None) -> None:
        now = time.monotonic()
        state["printed"], state["shown"] = now, state["done"]
        where = f" ({item})" if item else ""
        click.echo(f"{label}: {state['done']}/{length}{where}, {now - start:.0f} s", file=stream)

    def tick(item: Optional[str] = None) -> None:
        state["done"] += 1
        if state["done"] == length or time.monotonic() - state["printed"] >= every:
            show_line(item)

    click.echo(f"{label}: 0/{length}", file=stream)
    try:
        yield tick
    finally:
        if state["shown"] != state["done"]:
            show_line()  # where it ended (early, or interrupted)
