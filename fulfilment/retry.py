"""One retry policy, bounded twice: in attempts and in total time.

Backoff doubles from ``base`` up to ``cap`` with full jitter (a fleet that
failed together does not retry together); a server's ``Retry-After`` is a
floor. ``jitter=False`` makes delays exact for tests.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from fulfilment.config import Settings


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 10
    base: float = 0.5
    cap: float = 60.0
    deadline: float = 900.0
    jitter: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(settings.retry_max_attempts, settings.retry_base_delay,
                   settings.retry_max_delay, settings.retry_deadline)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt`` counts from 1)."""
        ceiling = min(self.cap, self.base * 2 ** max(attempt - 1, 0))
        backoff = random.uniform(0, ceiling) if self.jitter else ceiling
        if retry_after is not None:
            # The server's word is a floor (up to our cap); a little jitter spreads the herd.
            spread = random.uniform(0, min(1.0, ceiling)) if self.jitter else 0.0
            return min(retry_after, self.cap) + spread
        return backoff

    def gives_up(self, attempt: int, elapsed: float, next_delay: float) -> bool:
        """True when another attempt would exceed the attempts or the time budget."""
        return attempt >= self.max_attempts or elapsed + next_delay > self.deadline
