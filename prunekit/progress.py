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


class _Ticker:
    """``tick(item=None)`` advances by one; ``tick.finish()`` says the job ended early (it needed fewer steps)."""

    def __init__(self, step: Callable[[Optional[str]], None], finish: Callable[[], None]) -> None:
        self._step, self._finish = step, finish

    def __call__(self, item: Optional[str] = None) -> None:
        self._step(item)

    def finish(self) -> None:
        self._finish()


@contextlib.contextmanager
def progress_bar(length: int, label: str, show: bool = True, *, every: float = 30.0) -> Iterator[_Ticker]:
    """A ``tick(item=None)`` callable that advances by one; nothing is shown when ``show`` is false.

    ``length`` may be an upper bound (a plan fit that can stop early): ``tick.finish()``
    then shows the job as done, with the steps it took.

    Args:
        length: the number of ticks expected (at most).
        label: what the job is doing ("scanning").
        show: False for no output at all (``--quiet``).
        every: off a terminal, the least seconds between two printed lines.
    """
    if not show or length <= 0:
        yield _Ticker(lambda item=None: None, lambda: None)
        return
    stream = sys.stderr
    if stream.isatty():
        with click.progressbar(
            length=length, label=label, file=stream, show_eta=True, show_pos=True,
            item_show_func=lambda item: item,
        ) as bar:
            yield _Ticker(lambda item=None: bar.update(1, item), lambda: bar.update(length - bar.pos, "done"))
        return
    start = time.monotonic()
    state = {"done": 0, "printed": start, "shown": 0, "finished": False}

    def show_line(item: Optional[str] = None) -> None:
        now = time.monotonic()
        state["printed"], state["shown"] = now, state["done"]
        where = f" ({item})" if item else ""
        click.echo(f"{label}: {state['done']}/{length}{where}, {now - start:.0f} s", file=stream)

    def tick(item: Optional[str] = None) -> None:
        state["done"] += 1
        if state["done"] == length or time.monotonic() - state["printed"] >= every:
            show_line(item)

    def finish() -> None:
        state["finished"] = True
        click.echo(f"{label}: done in {state['done']} steps (of at most {length}), "
                   f"{time.monotonic() - start:.0f} s", file=stream)

    click.echo(f"{label}: 0/{length}", file=stream)
    try:
        yield _Ticker(tick, finish)
    finally:
        if state["shown"] != state["done"] and not state["finished"]:
            show_line()  # where it ended (early, or interrupted)
