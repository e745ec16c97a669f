"""Bulk flow control: admitted bulk intents wait in Redis and are released fairly.

A bulk upload is not sent to the broker at admission. Its references wait,
durably, in a list per shop (``Keys.bulk_ready``), and the shops with work
waiting take turns in a rotation (``Keys.bulk_shops``). ``release`` pops up
to the room left under ``FULFILMENT_BULK_IN_FLIGHT`` one reference at a time,
one shop after another (round robin across the shops with work), and records
each in the in-flight set (``Keys.bulk_in_flight``, scored on Redis's clock);
the caller sends them to the broker. So the broker never holds more than
about that many bulk messages: a live intent waits behind at most those,
never behind a whole file, and a second shop's upload gets its turn at the
next release instead of after the first shop's file.

Who releases: a producer after admitting a chunk, a worker each time a
purchase reaches its outcome (its reference leaves the in-flight set in the
same script: a top-up), and celery beat every ``FULFILMENT_RELEASE_INTERVAL``
as a safety net.

Nothing lost: while a reference waits, its score in the ledger's open set is
``+inf`` (parked: the recovery sweep leaves it be, it is not stuck, only
queued); the release sets it to now, so a crash between the release and the
send leaves it in flight and open, and the sweep resumes it after
``FULFILMENT_STUCK_AFTER``. Nothing twice: a reference is popped once; sent
twice at worst (the sweep and a late send), which the ledger and the lease
make harmless. An in-flight entry whose purchase ended without a top-up (its
worker died after publishing) is dropped by ``tidy`` (run with the beat's
release) once its entry is published or gone.

Cost per bulk intent, in Redis commands inside the scripts: parking, one
``ZADD`` and its share of one ``RPUSH`` per chunk; release, ``LPOP`` x 2,
``ZADD`` x 2, ``LLEN`` and ``RPUSH`` of the rotation; the top-up, one
``ZREM`` and ``ZCARD``: about 9 commands, and one round trip per intent (the
worker's top-up) plus one per chunk (the producer's park).

A cancelled reference waiting in a list gets its outcome at once
(``fulfilment.stops``) and stays in the list: the release drops it when its
turn comes, without sending it (no ``LREM`` through a long list).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

from fulfilment.config import Settings
from fulfilment.keys import Keys
from fulfilment.redis_text import text

log = logging.getLogger(__name__)

#: The shop of an intent that names none.
DEFAULT_SHOP = "default"
#: References parked per script call (Lua's ``unpack`` has a bound on its arguments).
PARK_CHUNK = 1000
#: Most references one release hands out (a producer's first release, beat's).
RELEASE_MAX = 500

# KEYS: the shop's ready list, the rotation, the ledger's open set. ARGV: shop, references.
# Appends the references to the shop's list, parks them in the open set (score +inf:
# the sweep leaves them be), and puts the shop in the rotation if it is not there.
_PARK = """
for i = 2, #ARGV do redis.call('ZADD', KEYS[3], 'XX', 'inf', ARGV[i]) end
local waiting = redis.call('RPUSH', KEYS[1], unpack(ARGV, 2))
if not redis.call('LPOS', KEYS[2], ARGV[1]) then redis.call('RPUSH', KEYS[2], ARGV[1]) end
return waiting
"""

# KEYS: the rotation, the in-flight set, the open set. ARGV: the ready lists' prefix,
# the in-flight bound, the most to release now, a finished reference or '', now (the
# caller's clock: the open set's progress stamps are on it), the ledger keys' head and
# tail. Takes the finished reference out of flight, then releases while there is room:
# a shop from the head of the rotation, its oldest reference, the shop back at the tail
# if it has more.
_RELEASE = """
if ARGV[4] ~= '' then redis.call('ZREM', KEYS[2], ARGV[4]) end
local n = math.min(tonumber(ARGV[2]) - redis.call('ZCARD', KEYS[2]), tonumber(ARGV[3]))
local released = {}
if n <= 0 then return released end
local t = redis.call('TIME')
local now = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
while #released < n do
  local shop = redis.call('LPOP', KEYS[1])
  if not shop then break end
  local ready = ARGV[1] .. shop
  local reference = redis.call('LPOP', ready)
  -- One with an outcome already (cancelled while it waited) is dropped, not sent.
  while reference and redis.call('HEXISTS', ARGV[6] .. reference .. ARGV[7], 'outcome') == 1 do
    reference = redis.call('LPOP', ready)
  end
  if reference then
    -- Its retry deadline counts from here: waiting its turn was not trying.
    local ledger = ARGV[6] .. reference .. ARGV[7]
    if redis.call('EXISTS', ledger) == 1 then redis.call('HSET', ledger, 'released_at', ARGV[5]) end
    redis.call('ZADD', KEYS[2], now, reference)
    redis.call('ZADD', KEYS[3], 'XX', ARGV[5], reference)
    released[#released + 1] = reference
    if redis.call('LLEN', ready) > 0 then redis.call('RPUSH', KEYS[1], shop) end
  end
end
return released
"""

# KEYS: the in-flight set. ARGV: seconds after which an entry is looked at, seconds
# after which it is dropped anyway, the most to look at, the ledger keys' head and tail.
# Drops in-flight entries whose ledger entry is published or gone (their top-up was
# lost), and any older than the second bound. Returns how many it dropped.
_TIDY = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]),
                       'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[3]))
local dropped = 0
for i = 1, #old, 2 do
  local reference, score = old[i], tonumber(old[i + 1])
  local published = redis.call('HGET', ARGV[4] .. reference .. ARGV[5], 'published')
  if (not published) or published == '1' or score < now - tonumber(ARGV[2]) then
    dropped = dropped + redis.call('ZREM', KEYS[1], reference)
  end
end
return dropped
"""


@dataclass(frozen=True)
class Waiting:
    """Bulk work held back: references waiting per shop, and how many are in flight."""

    by_shop: dict[str, int]
    in_flight: int

    @property
    def total(self) -> int:
        return sum(self.by_shop.values())


class BulkRelease:
    """The ready lists, the rotation and the in-flight set of one deployment."""

    def __init__(self, client: redis.Redis, keys: Keys, *, in_flight: int,
                 clock: Callable[[], float]) -> None:
        self.redis = client
        self.keys = keys
        self.bound = in_flight
        self._clock = clock
        self._park = client.register_script(_PARK)
        self._release = client.register_script(_RELEASE)
        self._tidy = client.register_script(_TIDY)

    def park(self, shop: str | None, references: Sequence[str]) -> int:
        """Queue admitted bulk references behind their shop's; how many that shop has waiting."""
        shop = shop or DEFAULT_SHOP
        waiting = 0
        keys = [self.keys.bulk_ready(shop), self.keys.bulk_shops, self.keys.open_intents]
        for start in range(0, len(references), PARK_CHUNK):
            waiting = int(self._park(keys=keys,
                                     args=[shop, *references[start:start + PARK_CHUNK]]))
        return waiting

    def release(self, *, finished: str | None = None, limit: int = RELEASE_MAX) -> list[str]:
        """Take ``finished`` out of flight, then up to ``limit`` references fairly, while
        fewer than the bound are in flight: the caller sends them to the broker."""
        head, tail = self._ledger_key_parts()
        answer = self._release(
            keys=[self.keys.bulk_shops, self.keys.bulk_in_flight, self.keys.open_intents],
            args=[self.keys.bulk_ready_prefix, self.bound, limit, finished or "",
                  repr(self._clock()), head, tail])
        return [text(reference) for reference in answer]

    def tidy(self, *, look_after: float, drop_after: float, limit: int = 500) -> int:
        """Drop in-flight entries of purchases that ended without their top-up."""
        head, tail = self._ledger_key_parts()
        return int(self._tidy(keys=[self.keys.bulk_in_flight],
                              args=[look_after, drop_after, limit, head, tail]))

    def _ledger_key_parts(self) -> tuple[str, str]:
        """What goes before and after a reference in its ledger key (scripts build it)."""
        head, tail = self.keys.ledger("x").split("{x}")
        return head + "{", "}" + tail

    def waiting(self) -> Waiting:
        return waiting(self.redis, self.keys)


def waiting(client: redis.Redis, keys: Keys) -> Waiting:
    """How many references wait per shop (Redis's lists), and how many are in flight."""
    shops = [text(shop) for shop in client.lrange(keys.bulk_shops, 0, -1)]
    pipe = client.pipeline(transaction=False)
    for shop in shops:
        pipe.llen(keys.bulk_ready(shop))
    pipe.zcard(keys.bulk_in_flight)
    *lengths, in_flight = pipe.execute()
    return Waiting({shop: int(n) for shop, n in zip(shops, lengths, strict=True) if n},
                   int(in_flight))


@dataclass(frozen=True)
class BulkGate:
    """Releases bulk work and sends what it released: ``send`` dispatches references to
    the bulk queue (and marks them owed if the broker refuses, then raises)."""

    release: BulkRelease
    send: Callable[[Sequence[str]], None]

    def top_up(self, *, finished: str | None = None, limit: int = RELEASE_MAX) -> int:
        """Release what there is room for and send it; how many were sent."""
        references = self.release.release(finished=finished, limit=limit)
        if references:
            self.send(references)
            log.debug("released %d bulk intents", len(references))
        return len(references)

    def safety_net(self, settings: Settings) -> int:
        """celery beat's turn: free the slots of purchases that ended without a top-up
        (looked at after ``FULFILMENT_STUCK_AFTER``; any past the retry deadline plus
        twice that), then release what there is room for."""
        dropped = self.release.tidy(look_after=settings.stuck_after,
                                    drop_after=settings.retry_deadline + 2 * settings.stuck_after)
        if dropped:
            log.warning("%d bulk intents ended without freeing their slot; freed now", dropped)
        return self.top_up()
