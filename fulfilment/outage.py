"""A broker outage, told once: one warning when it starts, one line when it ends.

A process that loses the broker hears about it many times: every reconnect
attempt fails, every message it held cannot be acknowledged, every publish
gives up. Each of those says the same thing. ``BrokerOutage`` is the one
place that says it: the first ``lost()`` of an outage logs a WARNING, later
ones (and the retries) only DEBUG, and ``restored()`` logs one INFO line with
how long the broker was away. The worker, beat and the results consumer each
keep one (``tasks.brokerwatch``, ``fulfilment.results``). A command that shows only
warnings (the ``fulfilment`` CLI without ``-v``) says the end at WARNING too
(``end_level``), or its reader would see an outage begin and never end.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class BrokerOutage:
    """Whether this process is without its broker, and since when (monotonic)."""

    def __init__(self, who: str, *, end_level: int = logging.INFO,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._who = who
        self._end_level = end_level
        self._clock = clock
        self._lock = threading.Lock()
        self._since: float | None = None

    @property
    def active(self) -> bool:
        return self._since is not None

    def lost(self, exc: BaseException | None = None, *, what: str = "") -> bool:
        """Note that the broker is unreachable; True (and a WARNING) when that is news."""
        reason = _reason(exc)
        with self._lock:
            first = self._since is None
            if first:
                self._since = self._clock()
        if first:
            log.warning("%s: broker connection lost (%s); %s", self._who, reason,
                        what or "waiting for it to come back")
        else:
            log.debug("%s: broker still unreachable (%s)", self._who, reason)
        return first

    def restored(self) -> float | None:
        """Note that the broker answers again; the outage's length if there was one."""
        with self._lock:
            since, self._since = self._since, None
        if since is None:
            return None
        down = self._clock() - since
        log.log(self._end_level, "%s: broker connection restored after %.1f s", self._who, down)
        return down


def _reason(exc: BaseException | None) -> str:
    """The error's type and text, on one line (a broker error carries no personal data)."""
    if exc is None:
        return "unreachable"
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
