"""The ledger: where every intent stands, in Redis, keyed by its reference.

Queues deliver at least once; the ledger is what makes the work happen once.
Every step reads the entry before acting and records what it did before the
message that carried it is acknowledged, so a redelivered or duplicated
message resumes where the work stands. The ledger, not the broker, is the
record of what is owed: the recovery sweep walks ``open_intents``.

One Redis hash per intent. Fields: ``intent`` (the payload, JSON),
``fingerprint``, ``submitted_at`` (the admitting process's clock, shown to
people), ``admitted_at`` (Redis's clock at admission: deadlines), ``order_id``,
``item_ids`` (JSON list),
``items_done``, ``pending`` (a basket call sent but not yet recorded),
``buyer_set``, ``code``, ``confirm_sent``, ``baskets``, ``basket_expires``,
``basket_ttl``, ``orphan_expires`` and ``orphans`` (abandoned baskets that may
still hold seats, JSON list of order ids)
(when an abandoned basket of unknown contents lets go of its seats),
``attempts``, ``outcome`` (the result, JSON, written once), ``published``,
``updated_at``, ``batch`` (the intent's batch id, or empty). Every time
another process compares (``updated_at`` and the open set's scores, which the
recovery sweep reads; ``basket_expires``, ``orphan_expires``) is on Redis's
clock (``fulfilment.clock``), never the writer's own.

Once the outcome is written the intent itself is owed nothing more, and the
entry keeps, for ``FULFILMENT_LEDGER_RETENTION``, only what duplicate
detection, ``fulfilment status``, ``settle``, refunds and batch status read
(``KEPT_AFTER_OUTCOME``). The payload (buyer e-mail, phone, names, payments)
and the basket's working notes go in the same script that writes the outcome,
so no finished entry ever holds them.

A batch's counters (``Keys.batch``: ``admitted``, ``confirmed``, ``failed``,
``failed:<code>``, ``unsettled``, ``published``, ``created_at``,
``updated_at``), its references without an outcome (``Keys.batch_open``) and
all its references (``Keys.batch_members``) are kept by the same scripts, in
the same atomic step as the entry's own change: admission counts it, writing
the outcome counts its status and closes it, settling moves it from
``unsettled`` to its final status, publishing counts it. So the counters
always agree with the entries; ``fulfilment.batches`` reads them.
"""

from __future__ import annotations

import contextvars
import enum
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis
from marshmallow import ValidationError

from fulfilment import metrics
from fulfilment.clock import RedisClock
from fulfilment.errors import FulfilmentError, PermanentError, TransientError
from fulfilment.keys import Keys
from fulfilment.redis_text import text
from schemas.intent import PurchaseIntent, dump_intent, intent_fingerprint, load_intent
from schemas.result import OrderResult, dump_result, load_result

#: Errors that say a stored entry can never be read (the recovery sweep sends it to the
#: failures queue rather than retrying it for ever).
UNREADABLE = (ValidationError, ValueError, KeyError, TypeError)
#: Decoded intents kept per process, oldest dropped first.
INTENT_CACHE_SIZE = 4096
#: The quantity limit when reading back an intent that was admitted already.
STORED_MAX_QUANTITY = 1_000_000


class Admission(enum.Enum):
    """What ``Ledger.admit`` made of an intent."""

    NEW = "new"
    DUPLICATE = "duplicate"  # same reference, same payload: already taken
    CONFLICT = "conflict"  # same reference, different payload: refused


# KEYS: ledger key, open-intents zset, then (when ARGV[8] names a batch) the batch's
# counters, open set and members. ARGV: fingerprint, intent json, submitted_at, now,
# retention seconds, reference, submission id, batch id or '', admission time (epoch
# seconds, tests) or '' for Redis's own TIME. The submission id makes a call that
# redis-py retried after a timeout answer "new" again, rather than "duplicate" of
# itself (and count nothing twice). ``admitted_at`` is Redis's clock, never the
# producer's: the retry deadline is counted from it (``Ledger.age``).
_ADMIT = """
local existing = redis.call('HGET', KEYS[1], 'fingerprint')
if existing then
  if existing ~= ARGV[1] then return 'conflict' end
  if redis.call('HGET', KEYS[1], 'submission') == ARGV[7] then return 'new' end
  return 'duplicate'
end
local admitted = ARGV[9]
if admitted == '' then
  local t = redis.call('TIME')
  admitted = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
end
redis.call('HSET', KEYS[1], 'fingerprint', ARGV[1], 'intent', ARGV[2], 'submission', ARGV[7],
           'submitted_at', ARGV[3], 'admitted_at', admitted, 'updated_at', ARGV[4],
           'items_done', 0, 'attempts', 0, 'baskets', 0, 'buyer_set', 0, 'confirm_sent', 0,
           'published', 0, 'batch', ARGV[8])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[6])
if ARGV[8] ~= '' then
  local n = redis.call('HINCRBY', KEYS[3], 'admitted', 1)
  redis.call('HSETNX', KEYS[3], 'created_at', ARGV[4])
  redis.call('HSET', KEYS[3], 'updated_at', ARGV[4])
  redis.call('ZADD', KEYS[4], ARGV[4], ARGV[6])
  redis.call('ZADD', KEYS[5], n, ARGV[6])
  for i = 3, 5 do redis.call('EXPIRE', KEYS[i], ARGV[5]) end
end
return 'new'
"""

# Every write after admission goes through these scripts: they never re-create
# an entry that is gone (expired, or lost with a Redis crash), refresh its
# retention (it lasts as long as it progresses), and, when a lease token is
# given, refuse a worker whose lease has passed to another (a fenced write).
# They return -1 when the entry is gone, -2 when the lease is not ours.
_GUARD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if ARGV[4] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[4] then return -2 end
"""

# KEYS: ledger, open set, lease. ARGV: now, retention, reference, lease token or '',
# field to increment or '', then field/value pairs. Returns {the incremented count or 0,
# the stop recorded or ''}: every write tells its writer whether the shop asked to stop.
_RECORD_BODY = """
if #ARGV > 5 then redis.call('HSET', KEYS[1], unpack(ARGV, 6)) end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], 'XX', ARGV[1], ARGV[3])
local count = 0
if ARGV[5] ~= '' then count = redis.call('HINCRBY', KEYS[1], ARGV[5], 1) end
return {count, redis.call('HGET', KEYS[1], 'stop') or ''}
"""
_RECORD = _GUARD + _RECORD_BODY

# The same write, refused (-4) once a stop or an outcome is recorded: how a confirm is
# marked sent. A cancel is recorded only while no confirm is marked (``_STOP``), so one
# of the two wins, and nothing is bought after a cancel was acknowledged.
_RECORD_UNLESS_STOPPED = _GUARD + """
local stop = redis.call('HGET', KEYS[1], 'stop')
if (stop and stop ~= '') or redis.call('HEXISTS', KEYS[1], 'outcome') == 1 then return -4 end
""" + _RECORD_BODY

# The scripts that change what a batch counts (finish, settle, publish) take the
# batch too: KEYS[4..6] the batch's counters, open set and members (absent when
# the caller names no batch), ARGV[5] its id or ''. The entry's own ``batch`` field
# decides: a caller that named another batch (or none, for an entry that has one)
# gets -3 and asks again with the right one; an entry admitted before batches
# were counted (no field) counts nothing. ``tally`` adds (or, with -1, takes back)
# an outcome in its batch's counters.
_BATCH_GUARD = _GUARD + """
local batch = redis.call('HGET', KEYS[1], 'batch')
if batch == false or batch == '' then batch = nil
elseif batch ~= ARGV[5] or #KEYS < 6 then return -3 end
local function touch()
  redis.call('HSET', KEYS[4], 'updated_at', ARGV[1])
  for i = 4, 6 do redis.call('EXPIRE', KEYS[i], ARGV[2]) end
end
local function tally(outcome, by)
  local result = cjson.decode(outcome)
  redis.call('HINCRBY', KEYS[4], result['status'], by)
  if result['status'] == 'failed' and type(result['error']) == 'table' then
    redis.call('HINCRBY', KEYS[4], 'failed:' .. result['error']['code'], by)
  end
  touch()
end
"""

#: Fields of an entry that an outcome makes useless: the intent (the buyer's data)
#: and the basket's working notes. Everything else is kept (``KEPT_AFTER_OUTCOME``).
DROPPED_AT_OUTCOME = ("intent", "pending", "buyer_set", "basket_ttl", "orphans",
                      "orphan_expires", "failures", "stop", "confirm_requested", "held_until",
                      "held_published", "confirm_requested_at", "released_at")
#: What a finished entry keeps, and who reads it: duplicate detection (fingerprint,
#: submission); status (those, the times, counts and codes); settle and refunds
#: (order_id, code, item_ids, basket_expires, confirm_sent); batch status and
#: publishing (outcome, published, batch).
KEPT_AFTER_OUTCOME = ("fingerprint", "submission", "submitted_at", "admitted_at", "updated_at",
                      "order_id", "code", "item_ids", "items_done", "confirm_sent", "baskets",
                      "basket_expires", "attempts", "outcome", "published", "batch")

# Write the outcome once, and drop what it makes useless (the buyer's data with
# it). KEYS and the first five ARGV as above; ARGV[6]: outcome json. Returns the
# outcome that stands (ours, or the one written before).
_FINISH = _BATCH_GUARD + """
redis.call('EXPIRE', KEYS[1], ARGV[2])
if batch and redis.call('HEXISTS', KEYS[1], 'outcome') == 0 and
   redis.call('HEXISTS', KEYS[1], 'held_until') == 1 then
  redis.call('HINCRBY', KEYS[4], 'held', -1)
end
redis.call('HDEL', KEYS[1], """ + ", ".join(f"'{name}'" for name in DROPPED_AT_OUTCOME) + """)
local existing = redis.call('HGET', KEYS[1], 'outcome')
if existing then return existing end
redis.call('HSET', KEYS[1], 'outcome', ARGV[6], 'updated_at', ARGV[1])
if batch then
  redis.call('ZREM', KEYS[5], ARGV[3])
  tally(ARGV[6], 1)
end
return ARGV[6]
"""

# Replace an unsettled outcome by the settled one, to be published again.
# KEYS and ARGV as _FINISH. Returns the outcome that stands.
_SETTLE = _BATCH_GUARD + """
local existing = redis.call('HGET', KEYS[1], 'outcome')
if existing and cjson.decode(existing)['status'] ~= 'unsettled' then return existing end
local was_published = redis.call('HGET', KEYS[1], 'published') == '1'
redis.call('HSET', KEYS[1], 'outcome', ARGV[6], 'published', '0', 'updated_at', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[3])
if batch then
  if existing then tally(existing, -1) else redis.call('ZREM', KEYS[5], ARGV[3]) end
  if was_published then redis.call('HINCRBY', KEYS[4], 'published', -1) end
  tally(ARGV[6], 1)
end
return ARGV[6]
"""

# The outcome is on the results queue. KEYS and ARGV as _FINISH (no ARGV[6]).
_PUBLISHED = _BATCH_GUARD + """
if batch and redis.call('HGET', KEYS[1], 'published') ~= '1' then
  redis.call('HINCRBY', KEYS[4], 'published', 1)
  touch()
end
redis.call('HSET', KEYS[1], 'published', '1', 'updated_at', ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[3])
return 0
"""


# The shop asks to stop (ARGV[6]: 'cancel'), or a hold lapsed ('expire'). KEYS as
# _FINISH, then the holds set (KEYS[#KEYS]). ARGV[7]: the outcome to write at once when
# no worker can be acting on the intent (no basket, no call owed, no lease), else ''.
# Returns 'done:<status>' (an outcome stands), 'too_late' (a confirm was marked sent),
# 'confirming' (an expiry after the shop's confirm: no stop), 'stopping' (recorded:
# the worker releases the basket and writes the outcome) or 'finished' (written now,
# to be published by the caller; the open set's score makes the sweep publish it if
# the caller dies first).
_STOP = _BATCH_GUARD + """
local existing = redis.call('HGET', KEYS[1], 'outcome')
if existing then return 'done:' .. cjson.decode(existing)['status'] end
if redis.call('HGET', KEYS[1], 'confirm_sent') == '1' then return 'too_late' end
if ARGV[6] == 'expire' and redis.call('HGET', KEYS[1], 'confirm_requested') == '1' then
  return 'confirming'
end
local stop = redis.call('HGET', KEYS[1], 'stop')
if not stop or stop == '' then redis.call('HSET', KEYS[1], 'stop', ARGV[6]) end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[1])
redis.call('ZREM', KEYS[#KEYS], ARGV[3])
if ARGV[7] == '' or redis.call('EXISTS', KEYS[3]) == 1 or
   (redis.call('HGET', KEYS[1], 'order_id') or '') ~= '' or
   (redis.call('HGET', KEYS[1], 'pending') or '') ~= '' then
  return 'stopping'
end
if batch and redis.call('HEXISTS', KEYS[1], 'held_until') == 1 then
  redis.call('HINCRBY', KEYS[4], 'held', -1)
end
redis.call('HDEL', KEYS[1], """ + ", ".join(f"'{name}'" for name in DROPPED_AT_OUTCOME) + """)
redis.call('HSET', KEYS[1], 'outcome', ARGV[7])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], 'XX', ARGV[1], ARGV[3])
redis.call('ZREM', KEYS[#KEYS], ARGV[3])
if batch then
  redis.call('ZREM', KEYS[5], ARGV[3])
  tally(ARGV[7], 1)
end
return 'finished'
"""

# The shop confirms a hold. KEYS: ledger, open set, lease, holds set. ARGV as _RECORD's
# first four. On Redis's clock (TIME): a hold past its time is refused, and its stop
# recorded so it is released at once. Returns 'done:<status>', 'stopped:<stop>',
# 'too_late' (a confirm is under way), 'not_hold', 'lapsed', or 'accepted' / 'accepted_held'
# (held already: the caller sends the purchase on; else it goes on by itself).
_CONFIRM_REQUEST = _GUARD + """
local existing = redis.call('HGET', KEYS[1], 'outcome')
if existing then return 'done:' .. cjson.decode(existing)['status'] end
local stop = redis.call('HGET', KEYS[1], 'stop')
if stop and stop ~= '' then return 'stopped:' .. stop end
if redis.call('HGET', KEYS[1], 'confirm_sent') == '1' or
   redis.call('HGET', KEYS[1], 'confirm_requested') == '1' then return 'too_late' end
if not cjson.decode(redis.call('HGET', KEYS[1], 'intent'))['hold'] then return 'not_hold' end
local until_ = tonumber(redis.call('HGET', KEYS[1], 'held_until') or '')
local t = redis.call('TIME')
if until_ and tonumber(t[1]) + tonumber(t[2]) / 1e6 > until_ then
  redis.call('HSET', KEYS[1], 'stop', 'expire', 'updated_at', ARGV[1])
  redis.call('ZREM', KEYS[4], ARGV[3])
  return 'lapsed'
end
redis.call('HSET', KEYS[1], 'confirm_requested', '1', 'updated_at', ARGV[1],
           'confirm_requested_at', ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[3])
if until_ then return 'accepted_held' end
return 'accepted'
"""

# The order is pre-confirmed and held for the shop. KEYS as _FINISH, then the holds set.
# ARGV[6]: when the hold lapses (Redis's clock), ARGV[7] '1' when the held result went
# out. The open set's score is that time: the
# sweep leaves a hold be until then (and resumes it after, which releases it). Returns
# 1 held (now or before), -4 a stop is recorded, -5 the shop confirmed already (go on).
_HOLD = _BATCH_GUARD + """
local stop = redis.call('HGET', KEYS[1], 'stop')
if (stop and stop ~= '') or redis.call('HEXISTS', KEYS[1], 'outcome') == 1 then return -4 end
if redis.call('HGET', KEYS[1], 'confirm_requested') == '1' then return -5 end
if ARGV[7] == '1' then redis.call('HSET', KEYS[1], 'held_published', '1') end
if redis.call('HSETNX', KEYS[1], 'held_until', ARGV[6]) == 1 and batch then
  redis.call('HINCRBY', KEYS[4], 'held', 1)
  touch()
end
local until_ = redis.call('HGET', KEYS[1], 'held_until')
redis.call('HSET', KEYS[1], 'updated_at', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], 'XX', until_, ARGV[3])
redis.call('ZADD', KEYS[#KEYS], until_, ARGV[3])
return 1
"""


# A task's first round trip: read the entry and, unless it needs no more work,
# take the intent's lease and count the attempt. KEYS: ledger, open set, lease.
# ARGV: now, retention, reference, lease token, lease ms, '1' when an outcome
# alone means done (else only publishing does). Returns -1 when the entry is gone,
# else {state, fields}: 0 nothing to do (not leased), 1 leased, 2 another holds it.
_BEGIN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HGET', KEYS[1], 'published') == '1' or
   (ARGV[6] == '1' and redis.call('HEXISTS', KEYS[1], 'outcome') == 1) then
  return {0, redis.call('HGETALL', KEYS[1])}
end
if not redis.call('SET', KEYS[3], ARGV[4], 'NX', 'PX', ARGV[5]) and
   redis.call('GET', KEYS[3]) ~= ARGV[4] then
  return {2, {}}
end
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'updated_at', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], 'XX', ARGV[1], ARGV[3])
return {1, redis.call('HGETALL', KEYS[1])}
"""


class Begun(enum.Enum):
    """What ``Ledger.begin`` found."""

    DONE = 0  # nothing more to do for this target: no lease taken
    LEASED = 1  # the lease is ours, the attempt counted
    HELD = 2  # another worker holds the intent

@dataclass(frozen=True)
class PreparedAdmission:
    """One admission script call, ready to send: see ``Ledger.prepare_admissions``."""

    keys: list[str]
    args: list[Any]


class UnknownIntentError(PermanentError):
    """A task names a reference the ledger does not hold (expired, lost, never admitted)."""

    default_code = "UNKNOWN_INTENT"


class IntentDroppedError(PermanentError):
    """The intent of a finished entry was asked for: it is dropped with the outcome."""

    default_code = "INTENT_DROPPED"


class StopRecordedError(FulfilmentError):
    """A stop (the shop's cancel, a lapsed hold) was recorded: the write that would have
    let a confirm out is refused, and the flow releases the basket instead."""

    default_code = "STOP_RECORDED"


class LeaseLostError(TransientError):
    """Another worker holds the intent now: this one must stop writing and let go."""

    default_code = "LEASE_LOST"


@dataclass
class _Held:
    """The lease a run holds, and its intent's fields as that run last wrote them.

    While the lease is ours no one else changes the entry's progress (other
    workers' writes are fenced off; the recovery sweep only touches its
    ``updated_at``), so the entry read when the lease was taken, plus our own
    writes, is what Redis holds: reading it again costs no round trip.
    """

    lease_key: str
    token: str
    reference: str
    fields: dict[str, str] | None
    entry: Entry | None = None


#: The lease whose holder may write, for the thread (or task) at work: see ``fenced``.
_FENCE: contextvars.ContextVar[_Held | None] = contextvars.ContextVar(
    "ledger_fence", default=None)


@dataclass(frozen=True)
class Entry:
    """One intent's ledger entry, as read."""

    reference: str
    #: The intent as admitted; None once the outcome is written (see ``intent``).
    stored_intent: PurchaseIntent | None
    fingerprint: str
    submitted_at: datetime
    order_id: str | None
    item_ids: tuple[int, ...]
    items_done: int
    pending: str | None
    buyer_set: bool
    code: str | None
    confirm_sent: bool
    baskets: int
    basket_expires: float | None
    basket_ttl: float | None
    orphan_expires: float | None
    orphans: tuple[str, ...]
    attempts: int
    outcome: OrderResult | None
    published: bool
    updated_at: float
    batch: str | None = None
    #: When it was admitted, on Redis's clock; None for an entry admitted before it was kept.
    admitted_at: float | None = None
    #: A stop recorded and not yet carried out: 'cancel' (the shop) or 'expire' (a hold lapsed).
    stop: str | None = None
    #: The shop confirmed the hold: the purchase goes on to confirm.
    confirm_requested: bool = False
    #: Held for the shop until then (Redis's clock); None: not held.
    held_until: float | None = None
    #: The interim ``held`` result went out.
    held_published: bool = False
    #: When its retry deadline starts again, on Redis's clock: the bulk release that sent
    #: it (time parked in its lane is not time trying), the shop's confirm of its hold.
    restarted_at: float | None = None
    #: The hash's fields as read, for a holder of the lease to keep up to date.
    fields: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    @property
    def intent(self) -> PurchaseIntent:
        """The intent to buy: only an entry without an outcome still holds it."""
        if self.stored_intent is None:
            raise IntentDroppedError(f"{self.reference} has its outcome: its intent (and "
                                     "the buyer's data) is no longer kept")
        return self.stored_intent

    @property
    def result_batch(self) -> str | None:
        """The batch an outcome of this entry names (the intent's, or its outcome's)."""
        if self.stored_intent is not None:
            return self.stored_intent.batch
        return self.outcome.batch if self.outcome is not None else self.batch

    @property
    def result_metadata(self) -> Mapping[str, Any]:
        """The producer's metadata an outcome of this entry carries (as above)."""
        if self.stored_intent is not None:
            return self.stored_intent.metadata
        return self.outcome.metadata if self.outcome is not None else {}


class Ledger:
    """Reads and writes ledger entries; every write is one atomic Redis command."""

    def __init__(self, client: redis.Redis, keys: Keys, retention: int,
                 clock: Callable[[], float] | None = None) -> None:
        """``clock``: Redis's time, which every stamp another process compares is written
        on (``updated_at``, the open set's scores); None: a ``RedisClock`` on ``client``.
        A test's own clock stands for Redis's in admission and for the process's too."""
        self.redis = client
        self._keys = keys
        self._retention = retention
        injected = clock is not None and not isinstance(clock, RedisClock)
        #: Redis's clock (``fulfilment.clock``); ``Services.clock`` is this one by default.
        self.clock: Callable[[], float] = clock or RedisClock(client)
        self._clock = self.clock
        #: None: the admission script reads ``TIME`` itself for ``admitted_at``.
        self._redis_clock = clock if injected else None
        #: This process's wall clock: ``submitted_at`` only (shown to people).
        self._wall = time.time if self._redis_clock is None else self._redis_clock
        self._intents: dict[str, PurchaseIntent] = {}
        self._intents_lock = threading.Lock()
        #: The batch of each reference read lately, so publishing names it without a read.
        self._batches: dict[str, str | None] = {}
        self._admit = client.register_script(_ADMIT)
        self._record = client.register_script(_RECORD)
        self._finish = client.register_script(_FINISH)
        self._settle = client.register_script(_SETTLE)
        self._published = client.register_script(_PUBLISHED)
        self._begin = client.register_script(_BEGIN)
        self._record_unless_stopped = client.register_script(_RECORD_UNLESS_STOPPED)
        self._stop = client.register_script(_STOP)
        self._confirm_request = client.register_script(_CONFIRM_REQUEST)
        self._hold = client.register_script(_HOLD)

    @property
    def keys(self) -> Keys:
        return self._keys

    def now(self) -> float:
        """Redis's clock (epoch seconds): the one every admission time is read on."""
        return self._clock()

    def age(self, entry: Entry) -> float:
        """Seconds its retry deadline has run, on Redis's clock (no round trip): since it
        was admitted, or since the bulk release sent it or the shop confirmed its hold,
        whichever came last (waiting its turn, or for the shop, is not trying).

        An entry admitted before admission times were kept has only the
        producer's ``submitted_at``: it is read against Redis's clock, never
        less than zero (such entries are the few in flight during the upgrade).
        """
        since = entry.admitted_at if entry.admitted_at is not None \
            else entry.submitted_at.timestamp()
        if entry.restarted_at is not None:
            since = max(since, entry.restarted_at)
        return max(self.now() - since, 0.0)

    def admit(self, intent: PurchaseIntent, submitted_at: datetime | None = None) -> Admission:
        """Record a new intent, or say it is a duplicate or a conflicting reuse."""
        return self.admit_many([intent], submitted_at)[0]

    def admit_many(self, intents: Sequence[PurchaseIntent],
                   submitted_at: datetime | None = None) -> list[Admission]:
        """``admit`` for each intent, in order, in one Redis round trip (a pipeline).

        Each admission is its own atomic script, as with ``admit``: a pipeline is
        not a transaction, and needs none (each answer stands on its own). Redis
        answers the pipeline once every script in it is done (and, with
        ``appendfsync always``, on disk).
        """
        return self.send_admissions(self.prepare_admissions(intents, submitted_at))

    def prepare_admissions(self, intents: Sequence[PurchaseIntent],
                           submitted_at: datetime | None = None) -> list[PreparedAdmission]:
        """The keys and arguments of each intent's admission (the CPU work of ``admit_many``)."""
        now = self._clock()  # Redis's: updated_at and the open set's score
        submitted = (submitted_at or datetime.fromtimestamp(self._wall(), UTC)).isoformat()
        admitted = "" if self._redis_clock is None else repr(self._redis_clock())
        prepared = []
        for intent in intents:
            document = dump_intent(intent)
            keys = [self._keys.ledger(intent.reference), self._keys.open_intents]
            if intent.batch:
                keys += self._batch_keys(intent.batch)
            prepared.append(PreparedAdmission(keys, [
                intent_fingerprint(document),  # one rule on every way in: no batch
                json.dumps(document, separators=(",", ":")), submitted, repr(now),
                self._retention, intent.reference, uuid.uuid4().hex, intent.batch or "",
                admitted]))
        return prepared

    def send_admissions(self, prepared: Sequence[PreparedAdmission]) -> list[Admission]:
        """Run prepared admissions in one round trip; their answers, in order.

        Mostly waiting on the socket: a producer may run it in a thread of its
        own while it prepares the next admissions.
        """
        if not prepared:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for admission in prepared:
            self._admit(keys=admission.keys, args=admission.args, client=pipe)
        return [Admission(text(answer)) for answer in pipe.execute()]

    def _batch_keys(self, batch: str) -> list[str]:
        return [self._keys.batch(batch), self._keys.batch_open(batch),
                self._keys.batch_members(batch)]

    def get(self, reference: str) -> Entry | None:
        held = _FENCE.get()
        if held is not None and held.reference == reference and held.fields is not None:
            if held.entry is None:
                held.entry = self._entry(reference, held.fields)
            return held.entry
        raw = self.redis.hgetall(self._keys.ledger(reference))
        return self._read(reference, raw) if raw else None

    def get_many(self, references: Sequence[str]) -> list[Entry | None]:
        """Each reference's entry (None when gone), in one round trip; never from a lease's
        copy: for a process that acts on many intents it holds no lease on."""
        pipe = self.redis.pipeline(transaction=False)
        for reference in references:
            pipe.hgetall(self._keys.ledger(reference))
        return [self._read(reference, raw) if raw else None
                for reference, raw in zip(references, pipe.execute(), strict=True)]

    def begin(self, reference: str, lease_key: str, token: str, lease_ttl: float, *,
              done_when_finished: bool) -> tuple[Begun, Entry | None]:
        """Read the entry and, unless there is nothing to do, take its lease: one round trip.

        Counts the attempt when the lease is taken. ``done_when_finished``: an
        outcome alone means there is nothing to do (otherwise only a published
        one does). Raises ``UnknownIntentError`` when the entry is gone; the
        entry is None with ``Begun.HELD``.
        """
        answer = self._begin(
            keys=[self._keys.ledger(reference), self._keys.open_intents, lease_key],
            args=[repr(self._clock()), self._retention, reference, token,
                  int(lease_ttl * 1000), "1" if done_when_finished else "0"])
        self._check(reference, answer)
        state, flat = Begun(int(answer[0])), answer[1]
        if state is Begun.HELD:
            return state, None
        raw = dict(zip(flat[::2], flat[1::2], strict=True))
        return state, self._read(reference, raw)

    def _read(self, reference: str, raw: Mapping[Any, Any]) -> Entry:
        entry = self._entry(reference, {text(k): text(v) for k, v in raw.items()})
        with self._intents_lock:
            if len(self._batches) >= INTENT_CACHE_SIZE:
                self._batches.pop(next(iter(self._batches)))
            self._batches[reference] = entry.batch
        return entry

    @contextmanager
    def fenced(self, lease_key: str, token: str, entry: Entry | None = None) -> Iterator[None]:
        """Writes made inside go through only while this lease is still ours.

        Given the entry read when the lease was taken (``begin``), reads of it
        inside are answered from memory, kept up to date with our own writes.
        """
        held = _Held(lease_key, token, entry.reference if entry else "",
                     dict(entry.fields) if entry else None, entry)
        previous = _FENCE.set(held)
        try:
            yield
        finally:
            _FENCE.reset(previous)

    def record(self, reference: str, **changes: Any) -> None:
        """Write progress fields (and mark the intent as having progressed now).

        The lease holder's copy learns of a stop the shop recorded meanwhile, so the
        flow sees it at its next step without a read of its own.
        """
        self._recorded(self._record, reference, "", changes)

    def record_unless_stopped(self, reference: str, **changes: Any) -> None:
        """``record``, refused with ``StopRecordedError`` once a stop or an outcome is
        recorded: a confirm is marked sent with it, so none goes out after a cancel."""
        self._recorded(self._record_unless_stopped, reference, "", changes)

    def _recorded(self, script: Any, reference: str, counted: str,
                  changes: Mapping[str, Any]) -> int:
        pairs = _pairs(changes)
        answer = self._write(script, reference, counted, *pairs)
        if answer == -4:
            # Refused for a stop, or for an outcome written meanwhile: the copy learns which.
            stop, outcome = (text(value) if value is not None else None for value in
                             self.redis.hmget(self._keys.ledger(reference), "stop", "outcome"))
            if stop:
                self._remember(reference, {"stop": stop})
            elif outcome:
                self._remember(reference, {"outcome": outcome}, drop=DROPPED_AT_OUTCOME)
            raise StopRecordedError(f"{reference}: a stop was recorded; nothing sent")
        count, stop = int(answer[0]), text(answer[1])
        remembered = dict(zip(pairs[::2], pairs[1::2], strict=True))
        if counted:
            remembered[counted] = str(count)
        self._remember(reference, {**remembered, "stop": stop} if stop else remembered)
        return count

    def count_failure(self, reference: str) -> int:
        """One more failure without progress (progress writes ``failures=0``); the count."""
        return self._recorded(self._record, reference, "failures", {})

    def count_attempt(self, reference: str) -> int:
        """One more step attempt for this intent; returns the total so far."""
        return self._recorded(self._record, reference, "attempts", {})

    def request_stop(self, reference: str, kind: str, outcome: OrderResult | None,
                     batch: str | None) -> str:
        """Record a stop ('cancel' or 'expire'); see ``_STOP`` for the answers.

        ``outcome``: written at once if no worker can be acting on the intent.
        """
        answer = text(self._write_counted(
            self._stop, reference, batch, kind, _result_json(outcome) if outcome else "",
            extra=[self._keys.holds]))
        if answer == "finished" and outcome is not None:
            metrics.outcome_written(outcome, outcome)
        return answer

    def request_stops(self, stops: Sequence[tuple[str, tuple[str | None, OrderResult | None]]],
                      kind: str = "cancel") -> list[str]:
        """``request_stop`` for many, in one round trip: (reference, (batch as read, outcome
        to write at once or None)) each; answers in order, 'unknown' for an entry gone."""
        now = repr(self._clock())
        pipe = self.redis.pipeline(transaction=False)
        for reference, (batch, outcome) in stops:
            keys = [self._keys.ledger(reference), self._keys.open_intents,
                    self._keys.lease(reference), *(self._batch_keys(batch) if batch else []),
                    self._keys.holds]
            self._stop(keys=keys, args=[now, self._retention, reference, "", batch or "", kind,
                                        _result_json(outcome) if outcome else ""], client=pipe)
        answers = []
        for (reference, (_, outcome)), answer in zip(stops, pipe.execute(), strict=True):
            if answer == -1:
                answers.append("unknown")
            elif answer == -3:  # its batch changed since it was read: ask on its own
                answers.append(self.request_stop(reference, kind, outcome, None))
            else:
                answers.append(text(answer))
                if answers[-1] == "finished" and outcome is not None:
                    metrics.outcome_written(outcome, outcome)
        return answers

    def request_confirm(self, reference: str) -> str:
        """The shop confirms a hold; see ``_CONFIRM_REQUEST`` for the answers."""
        return text(self._check(reference, self._call(self._confirm_request, reference,
                                                      [self._keys.holds], ())))

    def hold(self, reference: str, until: float, batch: str | None, *,
             published: bool = False) -> int:
        """Record the hold (once: its first time stands), and with ``published`` that its
        held result went out; 1, or -4 a stop is recorded, -5 the shop confirmed already."""
        answer = int(self._write_counted(self._hold, reference, batch, repr(until),
                                         "1" if published else "0", extra=[self._keys.holds]))
        if answer == 1:
            held = text(self.redis.hget(self._keys.ledger(reference), "held_until") or b"")
            self._remember(reference, {"held_until": held or repr(until),
                                       **({"held_published": "1"} if published else {})})
        return answer

    def lapsed_holds(self, now: float, limit: int = 500) -> list[str]:
        """Held references whose hold's time has passed (``now``: Redis's clock)."""
        found = self.redis.zrangebyscore(self._keys.holds, "-inf", now, start=0, num=limit)
        return [text(ref) for ref in found]

    def forget_hold(self, reference: str) -> None:
        self.redis.zrem(self._keys.holds, reference)

    def finish(self, reference: str, outcome: OrderResult) -> OrderResult:
        """Write the outcome unless one stands already; return the one that stands."""
        answer = text(self._write_counted(self._finish, reference, outcome.batch,
                                          _result_json(outcome)))
        self._remember(reference, {"outcome": answer}, drop=DROPPED_AT_OUTCOME)
        return metrics.outcome_written(outcome, load_result(answer))

    def settle(self, reference: str, outcome: OrderResult) -> OrderResult:
        """Replace an ``unsettled`` outcome by a settled one (to be published again)."""
        answer = text(self._write_counted(self._settle, reference, outcome.batch,
                                          _result_json(outcome)))
        if answer == _result_json(outcome):
            self._remember(reference, {"outcome": answer, "published": "0"})
        return load_result(answer)

    def mark_published(self, reference: str) -> None:
        """The outcome is on the results queue: nothing more is owed for this intent."""
        self._write_counted(self._published, reference, self._batches.get(reference))
        self._remember(reference, {"published": "1"})

    def mark_many_published(self, published: Sequence[tuple[str, str | None]]) -> None:
        """``mark_published`` for many (reference, its batch), in one round trip: for a
        process that holds no lease on them (the shop's cancel publishing what it wrote)."""
        now = repr(self._clock())
        pipe = self.redis.pipeline(transaction=False)
        for reference, batch in published:
            keys = [self._keys.ledger(reference), self._keys.open_intents,
                    self._keys.lease(reference), *(self._batch_keys(batch) if batch else [])]
            self._published(keys=keys, args=[now, self._retention, reference, "", batch or ""],
                            client=pipe)
        for (reference, _), answer in zip(published, pipe.execute(), strict=True):
            if answer == -3:  # its batch is not the one named: on its own, which reads it
                self.mark_published(reference)

    def _remember(self, reference: str, changes: Mapping[str, str],
                  drop: Sequence[str] = ()) -> None:
        """Keep the lease holder's copy of the entry as it now stands in Redis."""
        held = _FENCE.get()
        if held is not None and held.reference == reference and held.fields is not None:
            held.fields.update(changes, updated_at=repr(self._clock()))
            for name in drop:
                held.fields.pop(name, None)
            held.entry = None

    def _write(self, script: Any, reference: str, *args: Any) -> Any:
        return self._check(reference, self._call(script, reference, [], args))

    def _write_counted(self, script: Any, reference: str, batch: str | None, *args: Any,
                       extra: Sequence[str] = ()) -> Any:
        """A write that changes what the intent's batch counts (see ``_BATCH_GUARD``).

        ``batch`` is a guess (the outcome's, or the one read last): the script
        checks it against the entry's and answers -3 when it is wrong; then the
        entry's own is read and the write made again.
        """
        for _ in range(3):
            keys = [*(self._batch_keys(batch) if batch else []), *extra]
            answer = self._call(script, reference, keys, (batch or "", *args))
            if answer != -3:
                return self._check(reference, answer)
            batch = text(self.redis.hget(self._keys.ledger(reference), "batch") or b"") or None
        raise TransientError(f"the batch of {reference} changed while it was written",
                             code="BATCH_CHANGED")

    def _call(self, script: Any, reference: str, extra_keys: list[str],
              args: Sequence[Any]) -> Any:
        held = _FENCE.get()
        keys = [self._keys.ledger(reference), self._keys.open_intents,
                held.lease_key if held else self._keys.lease(reference), *extra_keys]
        return script(keys=keys, args=[repr(self._clock()), self._retention, reference,
                                       held.token if held else "", *args])

    @staticmethod
    def _check(reference: str, answer: Any) -> Any:
        if answer == -1:
            raise UnknownIntentError(f"no ledger entry for reference {reference}")
        if answer == -2:
            raise LeaseLostError(f"the lease on {reference} passed to another worker")
        return answer

    def index_code(self, reference: str, code: str, ttl: int | None = None) -> None:
        """Remember which intent an Onebox order code belongs to (webhooks name only the
        code); kept ``ttl`` seconds, the ledger's retention by default."""
        self.redis.set(self._keys.order_code(code), reference, ex=ttl or self._retention)

    def reference_for_code(self, code: str) -> str | None:
        """The intent whose order has this code, if this deployment made it (and recorded
        its code) within the retention."""
        found = self.redis.get(self._keys.order_code(code))
        return text(found) if found is not None else None

    def stuck(self, older_than: float, limit: int = 500) -> list[str]:
        """References whose last progress is older than ``older_than`` (epoch seconds)."""
        found = self.redis.zrangebyscore(self._keys.open_intents, "-inf", older_than,
                                          start=0, num=limit)
        return [text(ref) for ref in found]

    def forget_open(self, reference: str) -> None:
        """Drop a reference from the open set (its entry expired)."""
        self.redis.zrem(self._keys.open_intents, reference)

    def open_count(self) -> int:
        return int(self.redis.zcard(self._keys.open_intents))

    def _intent(self, fingerprint: str, raw: str | None) -> PurchaseIntent | None:
        """The stored intent, decoded once per process (every stage reads it); None once
        the outcome dropped it."""
        if raw is None:
            return None
        intent = self._intents.get(fingerprint)
        if intent is None:
            # Admitted under the producer's limits; a later, lower limit must not
            # make a stored intent unreadable.
            intent = load_intent(raw, max_quantity=STORED_MAX_QUANTITY)
            with self._intents_lock:  # the demo's worker runs threads
                if len(self._intents) >= INTENT_CACHE_SIZE:
                    self._intents.pop(next(iter(self._intents)))
                self._intents[fingerprint] = intent
        return intent

    def _entry(self, reference: str, fields: Mapping[str, str]) -> Entry:
        outcome = fields.get("outcome")
        return Entry(
            reference=reference,
            # An entry without an outcome must hold its intent (else it is unreadable).
            stored_intent=self._intent(fields["fingerprint"],
                                       fields.get("intent") if outcome else fields["intent"]),
            fingerprint=fields["fingerprint"],
            submitted_at=datetime.fromisoformat(fields["submitted_at"]),
            order_id=fields.get("order_id") or None,
            item_ids=tuple(json.loads(fields.get("item_ids") or "[]")),
            items_done=int(fields.get("items_done", 0)),
            pending=fields.get("pending") or None,
            buyer_set=fields.get("buyer_set") == "1",
            code=fields.get("code") or None,
            confirm_sent=fields.get("confirm_sent") == "1",
            baskets=int(fields.get("baskets", 0)),
            basket_expires=_float(fields.get("basket_expires")),
            basket_ttl=_float(fields.get("basket_ttl")),
            orphan_expires=_float(fields.get("orphan_expires")),
            orphans=tuple(json.loads(fields.get("orphans") or "[]")),
            attempts=int(fields.get("attempts", 0)),
            outcome=load_result(outcome) if outcome else None,
            published=fields.get("published") == "1",
            updated_at=float(fields.get("updated_at", 0)),
            batch=fields.get("batch") or None,
            admitted_at=_float(fields.get("admitted_at")),
            stop=fields.get("stop") or None,
            confirm_requested=fields.get("confirm_requested") == "1",
            held_until=_float(fields.get("held_until")),
            held_published=fields.get("held_published") == "1",
            restarted_at=max((_float(fields.get(name)) or 0.0 for name in
                              ("released_at", "confirm_requested_at")), default=0.0) or None,
            fields=fields,
        )


def _float(value: str | None) -> float | None:
    return float(value) if value else None


def _pairs(changes: Mapping[str, Any]) -> list[str]:
    return [part for name, value in changes.items() for part in (name, _encode(value))]


def _result_json(outcome: OrderResult) -> str:
    return json.dumps(dump_result(outcome), separators=(",", ":"))


def _encode(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, list | tuple):
        return json.dumps(list(value))
    return str(value)
