"""Which (order code, action) webhooks were handed to a task already.

Onebox makes a new ``ob-delivery-id`` for every attempt, so a retried webhook
looks new by its id: it is recognised by the order code and the action. The
mark is written only after the task was handed over (see
``fulfilment.webhooks.receiver`` for why), and kept as long as the ledger
keeps duplicate detection (``FULFILMENT_LEDGER_RETENTION``).
"""

from __future__ import annotations

import redis

from fulfilment.keys import Keys


class Dedupe:
    """The receiver's record of webhooks handed over, in Redis under the deployment's prefix."""

    def __init__(self, client: redis.Redis, keys: Keys, ttl: int) -> None:
        self._redis = client
        self._keys = keys
        self._ttl = ttl

    def seen(self, code: str, action: str) -> bool:
        """Whether a webhook for (code, action) was handed to a task already."""
        return bool(self._redis.exists(self._keys.webhook_seen(code, action)))

    def mark(self, code: str, action: str) -> None:
        """(code, action) is handed over: later deliveries of it are acknowledged only."""
        self._redis.set(self._keys.webhook_seen(code, action), "1", ex=self._ttl)
