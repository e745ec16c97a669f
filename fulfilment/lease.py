"""One worker at a time per intent: a short Redis lease, renewed while the work runs.

Two workers holding redeliveries of one message must not both act on it. The
lease is short (``FULFILMENT_LEASE_TTL``, 15 s by default) and a heartbeat
thread renews it while its holder works, so a worker killed while holding it
delays the intent by seconds, not by a task time limit. A holder that stalls
past the lease (a frozen process) loses it: the ledger refuses its writes
(``Ledger.fenced``), so it cannot act on what another worker now owns. So does
one whose work runs past ``max_hold`` (the task's hard time limit): the
heartbeat stops renewing then, so a thread hung where no time limit can reach
it (the threads pool enforces none) lets its intent go, as a killed process
would.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from types import TracebackType

import redis

from fulfilment.keys import Keys
from fulfilment.redis_text import text

log = logging.getLogger(__name__)

# Release only if it is still ours. KEYS: lease key. ARGV: token.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Extend only if it is still ours. KEYS: lease key. ARGV: token, ttl in ms.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class Leases:
    def __init__(self, client: redis.Redis, keys: Keys, ttl: float,
                 max_hold: float = math.inf) -> None:
        self._redis = client
        self._keys = keys
        self.ttl = ttl
        self.max_hold = max_hold
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)

    def offer(self, reference: str) -> Lease:
        """A lease on ``reference`` with a fresh token, for a script to take in Redis.

        ``Ledger.begin`` takes it in the same round trip as it reads the entry;
        used only once taken (its heartbeat starts on entering it).
        """
        return Lease(self, self._keys.lease(reference), uuid.uuid4().hex)

    def take(self, reference: str) -> Lease | None:
        """The lease on ``reference``, or None while another worker holds it."""
        key, token = self._keys.lease(reference), uuid.uuid4().hex
        taken = self._redis.set(key, token, nx=True, px=int(self.ttl * 1000))
        # A SET that timed out and was retried by redis-py may have taken it first.
        if taken or text(self._redis.get(key)) == token:
            return Lease(self, key, token)
        return None


class Lease:
    """A held lease; as a context manager it is renewed until released."""

    def __init__(self, owner: Leases, key: str, token: str) -> None:
        self.owner, self.key, self.token = owner, key, token
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        #: How many times the heartbeat extended it.
        self.renewals = 0

    def __enter__(self) -> Lease:
        self._heartbeat = threading.Thread(target=self._beat, name=f"lease-{self.key}",
                                           daemon=True)
        self._heartbeat.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.release()

    def renew(self) -> bool:
        """Extend the lease; False when it is no longer ours."""
        ttl_ms = int(self.owner.ttl * 1000)
        return bool(self.owner._renew(keys=[self.key], args=[self.token, ttl_ms]))

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join()
        self.owner._release(keys=[self.key], args=[self.token])

    def _beat(self) -> None:
        # Three renewals per lifetime: one late or failed renewal does not lose it.
        until = time.monotonic() + self.owner.max_hold
        while not self._stop.wait(self.owner.ttl / 3):
            if time.monotonic() > until:
                log.warning("lease %s held past %.0fs: no longer renewed; its writes will be "
                            "refused once it lapses", self.key, self.owner.max_hold)
                return
            try:
                if not self.renew():
                    log.warning("lease %s lost; its writes will be refused", self.key)
                    return
                self.renewals += 1
            except redis.RedisError as exc:
                log.warning("could not renew lease %s: %s", self.key, type(exc).__name__)
