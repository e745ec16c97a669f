"""How a batch stands, read from the ledger: counts by state, the oldest open intent.

A batch is every intent admitted with the same ``batch`` field (one upload of
``fulfilment submit``, or any producer's). The ledger's scripts keep its
counters in the same atomic step as each entry's change (see
``fulfilment.ledger``), so reading them is three commands however large the
batch, and another terminal sees what the uploader sees. Nothing here drains
the results queue: the outcomes are read from the ledger entries.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import redis

from fulfilment.keys import Keys
from fulfilment.lookup import HOLD_FIELDS, hold_stage
from fulfilment.redis_text import text
from fulfilment.release import Waiting, waiting

#: References read per round trip when walking a batch's outcomes.
PAGE = 1000


@dataclass(frozen=True)
class OpenIntent:
    """The batch's oldest intent without an outcome, and how far it got."""

    reference: str
    admitted_at: float  # epoch seconds
    stage: str  # queued | basket | pre-confirmed | held | confirm requested | cancelling |
    #             expiring | confirm sent | gone
    attempts: int
    updated_at: float | None  # its last progress, epoch seconds


@dataclass(frozen=True)
class BatchStatus:
    batch: str
    admitted: int = 0
    in_progress: int = 0  # admitted, no outcome yet
    confirmed: int = 0
    failed: int = 0
    unsettled: int = 0
    #: Intents held now (a gauge: in progress, waiting for the shop's confirm or cancel).
    held: int = 0
    cancelled: int = 0
    expired: int = 0
    published: int = 0  # outcomes on the results queue
    failed_by_code: dict[str, int] = field(default_factory=dict)
    created_at: float | None = None
    updated_at: float | None = None
    oldest_open: OpenIntent | None = None
    #: Bulk intents of every batch waiting in Redis for their release, per shop.
    bulk: Waiting | None = None

    @property
    def exists(self) -> bool:
        return self.admitted > 0

    @property
    def outcomes(self) -> int:
        return self.confirmed + self.failed + self.unsettled + self.cancelled + self.expired

    @property
    def done(self) -> bool:
        """Every admitted intent has an outcome (unsettled ones wait for an operator;
        held ones are still in progress)."""
        return self.exists and self.in_progress == 0

    def as_dict(self) -> dict[str, Any]:
        oldest = self.oldest_open
        return {
            "batch": self.batch, "admitted": self.admitted, "in_progress": self.in_progress,
            "confirmed": self.confirmed, "failed": self.failed, "unsettled": self.unsettled,
            "held": self.held, "cancelled": self.cancelled, "expired": self.expired,
            "published": self.published, "failed_by_code": dict(self.failed_by_code),
            "created_at": self.created_at, "updated_at": self.updated_at,
            "oldest_open": None if oldest is None else {
                "reference": oldest.reference, "admitted_at": oldest.admitted_at,
                "stage": oldest.stage, "attempts": oldest.attempts,
                "updated_at": oldest.updated_at},
            "bulk_waiting": None if self.bulk is None else dict(self.bulk.by_shop),
            "bulk_in_flight": None if self.bulk is None else self.bulk.in_flight,
        }


def batch_status(client: redis.Redis, keys: Keys, batch: str) -> BatchStatus:
    """The batch's counters and oldest open intent, as one consistent snapshot."""
    pipe = client.pipeline(transaction=True)  # MULTI: the three reads see one moment
    pipe.hgetall(keys.batch(batch))
    pipe.zcard(keys.batch_open(batch))
    pipe.zrange(keys.batch_open(batch), 0, 0, withscores=True)
    counters_raw, open_count, oldest = pipe.execute()
    counters = {text(k): text(v) for k, v in counters_raw.items()}
    by_code = {name.split(":", 1)[1]: int(value) for name, value in counters.items()
               if name.startswith("failed:") and int(value) > 0}
    return BatchStatus(
        batch=batch,
        admitted=int(counters.get("admitted", 0)),
        in_progress=int(open_count),
        confirmed=int(counters.get("confirmed", 0)),
        failed=int(counters.get("failed", 0)),
        unsettled=int(counters.get("unsettled", 0)),
        # A gauge the ledger moves both ways: never shown below zero.
        held=max(int(counters.get("held", 0)), 0),
        cancelled=int(counters.get("cancelled", 0)),
        expired=int(counters.get("expired", 0)),
        published=int(counters.get("published", 0)),
        failed_by_code=dict(sorted(by_code.items(), key=lambda kv: (-kv[1], kv[0]))),
        created_at=_float(counters.get("created_at")),
        updated_at=_float(counters.get("updated_at")),
        oldest_open=_open_intent(client, keys, text(oldest[0][0]), float(oldest[0][1]))
        if oldest else None,
        bulk=waiting(client, keys),
    )


def _open_intent(client: redis.Redis, keys: Keys, reference: str,
                 admitted_at: float) -> OpenIntent:
    names = ["attempts", "order_id", "code", "confirm_sent", "updated_at", "fingerprint",
             *HOLD_FIELDS]
    fields = {name: text(value) for name, value in
              zip(names, client.hmget(keys.ledger(reference), names), strict=True)
              if value is not None}
    attempts, order_id, code, confirm_sent, updated_at, fingerprint = (
        fields.get(name) for name in names[:6])
    if fingerprint is None:
        stage = "gone"  # expired or lost: the recovery sweep reports it
    elif confirm_sent == "1":
        stage = "confirm sent"
    elif held_stage := hold_stage(fields):
        stage = held_stage
    elif code:
        stage = "pre-confirmed"
    elif order_id or (attempts and attempts != "0"):
        stage = "basket"
    else:
        stage = "queued"
    return OpenIntent(reference, admitted_at, stage, int(attempts or 0), _float(updated_at))


def batch_outcomes(client: redis.Redis, keys: Keys, batch: str) -> Iterator[dict[str, Any]]:
    """Each outcome of the batch (the result as published), in admission order.

    Reads ``PAGE`` references and their outcomes per round trip: constant
    memory however large the batch. Intents without an outcome yet are skipped.
    """
    start = 0
    while True:
        references = client.zrange(keys.batch_members(batch), start, start + PAGE - 1)
        if not references:
            return
        pipe = client.pipeline(transaction=False)
        for reference in references:
            pipe.hget(keys.ledger(text(reference)), "outcome")
        for outcome in pipe.execute():
            if outcome is not None:
                yield json.loads(outcome)
        start += len(references)


def _float(value: str | None) -> float | None:
    return float(value) if value else None


def describe(status: BatchStatus, *, now: float | None = None) -> list[str]:
    """The status as lines for people (``fulfilment batch status``, ``submit --wait``)."""
    if not status.exists:
        return [f"batch {status.batch}: no intent admitted (unknown batch, or expired)"]
    now = time.time() if now is None else now
    failed = ", ".join(f"{code} {count}" for code, count in status.failed_by_code.items())
    lines = [
        f"batch {status.batch}: {status.admitted:,} admitted"
        + (f", first {_ago(now, status.created_at)} ago" if status.created_at else "")
        + (f", last change {_ago(now, status.updated_at)} ago" if status.updated_at else ""),
        _row("in progress", status.in_progress),
    ]
    # Holds and stops show only when the batch has some: most batches never do.
    if status.held:
        lines.append(_row("  held", status.held, "seats held, waiting for the shop's confirm "
                                                 "or cancel"))
    lines += [
        _row("confirmed", status.confirmed),
        _row("failed", status.failed, failed),
        _row("unsettled", status.unsettled,
             "fulfilment settle REF once Onebox can tell" if status.unsettled else ""),
    ]
    if status.cancelled:
        lines.append(_row("cancelled", status.cancelled, "stopped before a confirm was sent"))
    if status.expired:
        lines.append(_row("expired", status.expired, "holds not confirmed in time, released"))
    lines.append(_row("published", status.published, "outcomes on the results queue"))
    oldest = status.oldest_open
    if oldest is not None:
        line = (f"  oldest open: {oldest.reference}, admitted {_ago(now, oldest.admitted_at)} "
                f"ago, {oldest.stage}, {oldest.attempts} attempt(s)")
        if oldest.updated_at:
            line += f", last progress {_ago(now, oldest.updated_at)} ago"
        lines.append(line)
    bulk = status.bulk
    if bulk is not None and (bulk.by_shop or bulk.in_flight):
        shops = ", ".join(f"{shop} {count:,}" for shop, count in bulk.by_shop.items()) or "none"
        lines.append(f"  bulk lane, all batches: waiting in Redis by shop: {shops}; "
                     f"{bulk.in_flight:,} released, in flight")
    return lines


def _row(label: str, count: int, note: str = "") -> str:
    return f"  {label:<13}{count:>9,}" + (f"  ({note})" if note else "")


def _ago(now: float, then: float | None) -> str:
    seconds = max(int(now - (then or now)), 0)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
