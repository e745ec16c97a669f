"""Dispatches owed: admitted intents whose purchase could not be sent to the broker.

An intent is admitted to the ledger before its purchase is dispatched; when
the dispatch fails (the broker is down) the intent is open in the ledger and
the recovery sweep would resume it once it has been still for
``FULFILMENT_STUCK_AFTER`` (5 minutes). Rather than wait that long, whoever
saw the dispatch fail marks the reference here (``Keys.dispatch_owed``, a hash
of reference -> the entry's ``updated_at`` when the dispatch failed), and a
worker sends it again as soon as it has the broker back
(``tasks.brokerwatch``), or the next sweep does.

Never twice what was sent: only a dispatch that raised is marked, and sending
it again first claims the mark in one script that removes it (one claimer
wins) and checks the entry has not moved since: a task that began the intent,
or the sweep resuming it, changed ``updated_at``, and the mark is dropped
unsent. A claim records progress as the sweep does, so the sweep gives the
new dispatch its time. A dispatch that raised may still have reached the
broker (the connection dropped before its confirm): sending it again then
makes a second chain for one intent, which the ledger and the lease make
harmless, as with any redelivered message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import redis

from fulfilment.keys import Keys
from fulfilment.redis_text import text

log = logging.getLogger(__name__)

#: References claimed (and sent again) per round trip.
CHUNK = 500

# KEYS: owed hash, ledger entry. ARGV: reference.
# Marks an entry that exists and is not yet published; 1 if marked.
_MARK = """
local updated = redis.call('HGET', KEYS[2], 'updated_at')
if not updated or redis.call('HGET', KEYS[2], 'published') == '1' then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], updated)
return 1
"""

# KEYS: owed hash, ledger entry, open set. ARGV: reference, now.
# Takes the mark; 1 if the dispatch is still owed (progress recorded), else 0.
_CLAIM = """
local stamp = redis.call('HGET', KEYS[1], ARGV[1])
if not stamp then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('HGET', KEYS[2], 'published') ~= '0' then return 0 end
if redis.call('HGET', KEYS[2], 'updated_at') ~= stamp then return 0 end
redis.call('HSET', KEYS[2], 'updated_at', ARGV[2])
redis.call('ZADD', KEYS[3], 'XX', ARGV[2], ARGV[1])
return 1
"""


@dataclass
class OwedDispatches:
    """Marks failed dispatches and hands each back once to be sent again."""

    client: redis.Redis
    keys: Keys

    def __post_init__(self) -> None:
        self._mark = self.client.register_script(_MARK)
        self._claim = self.client.register_script(_CLAIM)

    def mark(self, references: Iterable[str]) -> int:
        """Mark these references as owed a dispatch; how many were (open entries only)."""
        pipe = self.client.pipeline(transaction=False)
        count = 0
        for reference in references:
            self._mark(keys=[self.keys.dispatch_owed, self.keys.ledger(reference)],
                       args=[reference], client=pipe)
            count += 1
        if not count:
            return 0
        return sum(int(answer) for answer in pipe.execute())

    def count(self) -> int:
        return int(self.client.hlen(self.keys.dispatch_owed))

    def claim(self, now: float, limit: int = CHUNK) -> list[str]:
        """Up to about ``limit`` owed references, now this caller's to send."""
        references: list[str] = []
        for reference, _ in self.client.hscan_iter(self.keys.dispatch_owed, count=limit):
            references.append(text(reference))
            if len(references) >= limit:
                break
        if not references:
            return []
        pipe = self.client.pipeline(transaction=False)
        for reference in references:
            self._claim(keys=[self.keys.dispatch_owed, self.keys.ledger(reference),
                              self.keys.open_intents], args=[reference, repr(now)], client=pipe)
        return [ref for ref, won in zip(references, pipe.execute(), strict=True) if int(won)]

    def resend(self, dispatch_many: Callable[[list[str]], None], now: Callable[[], float],
               *, limit: int = 20 * CHUNK) -> int:
        """Claim and send the owed dispatches, a chunk at a time; how many were sent.

        A chunk whose sending fails is marked again by the dispatch itself
        (``tasks.purchase``), and the error is raised: the broker is gone again.
        """
        sent = 0
        while sent < limit:
            references = self.claim(now())
            if not references:
                break
            dispatch_many(references)
            sent += len(references)
        if sent:
            log.info("sent %d purchases again whose dispatch had failed", sent)
        return sent
