"""Progress of a long command: a bar with rate and ETA on a terminal, plain lines otherwise.

On a terminal, click's progress bar (click is a dependency already; it draws
the bar and the ETA) with the count and the rate beside it. Anywhere else (a
log file, CI, a pipe) a bar's carriage returns make a mess, so a plain line
every ``every`` seconds and one at the end: ``submitting: 12,000 intents
(34%), 5,210/s, ETA 0:00:12``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TextIO

import click


def _duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """``update(done, count)``: ``done`` of ``total`` (bytes, outcomes...), ``count`` items.

    The bar moves by ``done`` (its ETA is of ``total``); the rate is of items.
    ``total`` may be unknown (standard input): then no percentage and no ETA.
    """

    def __init__(self, label: str, total: int | None, unit: str, *,
                 file: TextIO | None = None, every: float = 5.0,
                 terminal: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._label, self._total, self._unit = label, total, unit
        self._file = file if file is not None else sys.stderr
        self._every, self._clock = every, clock
        self._started = self._last_line = clock()
        self._done = self._count = 0
        tty = terminal if terminal is not None else self._file.isatty()
        self._bar: Any = None
        if tty and total:
            self._bar = click.progressbar(length=total, label=label, file=self._file,
                                          show_eta=True, show_percent=True,
                                          item_show_func=lambda text: text)
            self._bar.__enter__()

    def rate(self) -> float:
        elapsed = self._clock() - self._started
        return self._count / elapsed if elapsed > 0 else 0.0

    def describe(self) -> str:
        text = f"{self._count:,} {self._unit}"
        if self._total:
            text += f" ({100 * min(self._done / self._total, 1):.0f}%)"
        text += f", {self.rate():,.1f}/s"
        elapsed = self._clock() - self._started
        if self._total and 0 < self._done < self._total and elapsed > 0:
            text += f", ETA {_duration(elapsed * (self._total - self._done) / self._done)}"
        return text

    def update(self, done: int, count: int) -> None:
        if self._bar is not None:
            self._bar.update(max(done - self._done, 0), f"{count:,} {self._unit}, "
                                                        f"{self.rate():,.0f}/s")
        self._done, self._count = done, count
        if self._bar is None and self._clock() - self._last_line >= self._every:
            self._last_line = self._clock()
            click.echo(f"{self._label}: {self.describe()}", file=self._file)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None
        else:
            elapsed = self._clock() - self._started
            click.echo(f"{self._label}: {self._count:,} {self._unit} in "
                       f"{_duration(elapsed)}, {self.rate():,.1f}/s", file=self._file)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()
