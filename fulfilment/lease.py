"""One worker at a time per intent: a Redis key with an expiry and a token.

Two workers holding redeliveries of one message must not both act on it. The
lease expires by itself (after the task's hard time limit and a margin), so a
worker killed while holding it delays the intent, never blocks it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import redis

from fulfilment.keys import Keys
from fulfilment.redis_text import text

# Release only if it is still ours. KEYS: lease key. ARGV: token.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Leases:
    def __init__(self, client: redis.Redis, keys: Keys, ttl: int) -> None:
        self._redis = client
        self._keys = keys
        self._ttl = ttl
        self._release = client.register_script(_RELEASE)

    def take(self, reference: str) -> Lease | None:
        """The lease on ``reference``, or None while another worker holds it."""
        key, token = self._keys.lease(reference), uuid.uuid4().hex
        taken = self._redis.set(key, token, nx=True, ex=self._ttl)
        # A SET that timed out and was retried by redis-py may have taken it first.
        if taken or text(self._redis.get(key)) == token:
            return Lease(self, key, token)
        return None

    def _give_back(self, lease: Lease) -> None:
        self._release(keys=[lease.key], args=[lease.token])


@dataclass(frozen=True)
class Lease:
    owner: Leases
    key: str
    token: str

    def release(self) -> None:
        self.owner._give_back(self)
