"""``fulfilment status REF``: where one intent stands, read from its ledger entry.

Only the fields that say how far the purchase came are read (``HMGET``), never
the stored intent: the buyer's e-mail, phone and names are not even fetched,
so they cannot be shown. The published outcome is read for its status, codes
and times; its metadata (the producer's) is not shown either.

Times are Redis's (``fulfilment.clock``): "admitted" is ``admitted_at``, which
the admission script took from Redis's ``TIME``, and "ago" is counted from
Redis's clock, read in the same round trip. The producer's ``submitted_at`` is
its own clock's: shown only for an entry admitted before ``admitted_at`` was kept.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from marshmallow import ValidationError

from fulfilment.keys import Keys
from fulfilment.redis_text import text
from schemas.result import HELD, UNSETTLED, load_result

#: A reference is spelled as the contract says; anything else cannot be in the ledger.
REFERENCE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
REFERENCE_RULE = "1-64 of A-Z a-z 0-9 . _ : -"
#: The ledger's fields of a hold and of a stop asked for (``fulfilment.ledger``).
HOLD_FIELDS = ("held_until", "held_published", "stop", "confirm_requested")
_FIELDS = ("fingerprint", "submitted_at", "admitted_at", "updated_at", "order_id", "code",
           "items_done", "pending", "buyer_set", "confirm_sent", "baskets", "attempts",
           "outcome", "published", "batch", *HOLD_FIELDS)


@dataclass(frozen=True)
class IntentStatus:
    """An intent's progress, free of personal data. ``found`` False: no ledger entry."""

    reference: str
    found: bool
    #: queued | basket | pre-confirmed | held | confirm requested | cancelling | expiring |
    #: confirm sent | an outcome
    state: str | None = None
    step: str | None = None  # the step it is at, or last went through
    order_id: str | None = None
    order_code: str | None = None
    attempts: int = 0
    baskets: int = 0
    items_done: int = 0
    batch: str | None = None
    submitted_at: str | None = None  # the producer's clock
    admitted_at: str | None = None  # Redis's clock at admission
    updated_at: str | None = None
    finished_at: str | None = None
    outcome: str | None = None  # a result status, once there is one
    held_until: str | None = None  # when a hold lapses unless confirmed (Redis's clock)
    held_published: bool = False  # the interim held result went out
    error_code: str | None = None
    error_step: str | None = None
    published: bool = False
    running: bool = False  # a worker holds its lease now
    problem: str | None = None  # why it could not be looked up, or read
    read_at: str | None = None  # when it was read, on Redis's clock

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def intent_status(client: redis.Redis, keys: Keys, reference: str) -> IntentStatus:
    """The intent's status from the ledger (two reads and Redis's clock, one round trip)."""
    if not REFERENCE.fullmatch(reference):
        return IntentStatus(reference, False, problem=f"not a reference ({REFERENCE_RULE})")
    pipe = client.pipeline(transaction=False)
    pipe.hmget(keys.ledger(reference), list(_FIELDS))
    pipe.exists(keys.lease(reference))
    pipe.time()
    values, lease, (seconds, micros) = pipe.execute()
    read_at = _iso(f"{seconds}.{int(micros):06d}")
    fields = {name: text(value) for name, value in zip(_FIELDS, values, strict=True)
              if value is not None}
    if "fingerprint" not in fields:
        return IntentStatus(reference, False, problem="no ledger entry: never admitted, or "
                            "expired (FULFILMENT_LEDGER_RETENTION)", read_at=read_at)
    status = IntentStatus(
        reference, True,
        order_id=fields.get("order_id") or None,
        order_code=fields.get("code") or None,
        attempts=_int(fields.get("attempts")),
        baskets=_int(fields.get("baskets")),
        items_done=_int(fields.get("items_done")),
        batch=fields.get("batch") or None,
        submitted_at=_normal(fields.get("submitted_at")),
        admitted_at=_iso(fields.get("admitted_at")),
        updated_at=_iso(fields.get("updated_at")),
        published=fields.get("published") == "1",
        held_until=_iso(fields.get("held_until")),
        held_published=fields.get("held_published") == "1",
        running=bool(lease),
        read_at=read_at,
    )
    outcome = fields.get("outcome")
    if outcome:
        return _finished(status, outcome)
    state, step = _progress(fields)
    return _replace(status, state=state, step=step)


def _finished(status: IntentStatus, raw: str) -> IntentStatus:
    try:
        result = load_result(raw)
    except (ValidationError, ValueError):
        return _replace(status, state="unreadable outcome", step=None,
                        problem="its outcome does not load as an order result")
    error = result.error
    held = result.status == HELD
    return _replace(
        status, state=result.status, outcome=result.status,
        step="published" if status.published else "publish",
        order_code=result.order_code or status.order_code,
        order_id=result.order_id or status.order_id,
        finished_at=_iso_datetime(result.finished_at),
        error_code=error.code if error else None,
        error_step=error.step if error else None,
        held_until=_iso_datetime(result.hold_expires_at) if held else status.held_until,
        held_published=status.held_published or (held and status.published))


def _progress(fields: dict[str, str]) -> tuple[str, str]:
    """(state, step) of an intent without an outcome, as the flow records it."""
    pending = fields.get("pending") or None
    stage = "confirm sent" if fields.get("confirm_sent") == "1" else hold_stage(fields)
    if stage:
        return stage, _HOLD_STEP[stage]
    if fields.get("code"):
        return "pre-confirmed", "confirm"
    if fields.get("buyer_set") == "1":
        return "basket", pending or "pre_confirm"
    if fields.get("order_id"):
        return "basket", pending or "seats"
    if _int(fields.get("attempts")):
        return "basket", pending or "create"
    return "queued", "basket"


#: The step of each state past the basket (the confirm, or the stop asked for).
_HOLD_STEP = {"confirm sent": "confirm", "cancelling": "cancel", "expiring": "expire",
              "confirm requested": "confirm", "held": "confirm"}


def hold_stage(fields: Mapping[str, str]) -> str | None:
    """How far a held or stopped purchase is, before any confirm was sent; None: neither.

    ``fields`` are ledger fields, ``HOLD_FIELDS`` and ``code`` among them. A stop
    asked for wins over a hold (no confirm can be sent once it is set).
    """
    stop = fields.get("stop")
    if stop == "cancel":
        return "cancelling"
    if stop == "expire":
        return "expiring"
    if fields.get("confirm_requested") == "1":
        return "confirm requested"
    if fields.get("held_until") and fields.get("code"):
        return "held"
    return None


def describe(status: IntentStatus, *, now: datetime | None = None) -> list[str]:
    """The status as lines for people; "ago" from ``now``, else Redis's clock when read."""
    if not status.found:
        # Typed by someone: shown quoted unless it is a reference (one line, whatever it holds).
        shown = status.reference if REFERENCE.fullmatch(status.reference) else \
            repr(status.reference)
        return [f"{shown}: unknown: {status.problem}"]
    now = now or _datetime(status.read_at) or datetime.now(UTC)
    head = f"{status.reference}: {status.state}"
    if status.outcome:
        head += ", published" if status.published else ", not yet published"
    elif status.running:
        head += ", a worker is on it now"
    lines = [head, f"  step        {status.step}"]
    if status.order_id or status.order_code:
        lines.append(f"  order       {status.order_id or '-'}, code {status.order_code or '-'}")
    lines.append(f"  attempts    {status.attempts} (baskets {status.baskets}, "
                 f"items added {status.items_done})")
    if status.batch:
        lines.append(f"  batch       {status.batch}")
    admitted = status.admitted_at or status.submitted_at  # an entry from before admitted_at
    for label, moment in (("admitted", admitted), ("last change", status.updated_at),
                          ("finished", status.finished_at)):
        if moment:
            lines.append(f"  {label:<11} {moment}{_ago(now, moment)}")
    if status.error_code:
        where = f" at {status.error_step}" if status.error_step else ""
        lines.append(f"  error       {status.error_code}{where}")
    if status.held_until and status.state in ("held", "confirm requested"):
        went_out = "published" if status.held_published else "not yet published"
        lines.append(f"  held until  {status.held_until}{_until(now, status.held_until)}, "
                     f"held result {went_out}")
    if status.outcome == UNSETTLED:
        lines.append(f"  settle with fulfilment settle {status.reference}")
    if status.problem:
        lines.append(f"  problem     {status.problem}")
    return lines


def as_json(status: IntentStatus) -> str:
    return json.dumps(status.as_dict(), sort_keys=True)


def _replace(status: IntentStatus, **changes: Any) -> IntentStatus:
    return IntentStatus(**{**status.as_dict(), **changes})


def _int(value: str | None) -> int:
    try:
        return int(value) if value else 0
    except ValueError:
        return 0


def _iso(epoch: str | None) -> str | None:
    try:
        return _iso_datetime(datetime.fromtimestamp(float(epoch), UTC)) if epoch else None
    except (ValueError, OverflowError, OSError):
        return None


def _normal(moment: str | None) -> str | None:
    try:
        return _iso_datetime(datetime.fromisoformat(moment)) if moment else None
    except ValueError:
        return moment


def _iso_datetime(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _datetime(moment: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(moment.replace("Z", "+00:00")) if moment else None
    except ValueError:
        return None


def _until(now: datetime, moment: str) -> str:
    """" (in 9m)", or " (lapsed 2m ago)" once past."""
    then = _datetime(moment)
    if then is None:
        return ""
    seconds = int((then - now).total_seconds())
    return f" (in {_span(seconds)})" if seconds > 0 else f" (lapsed {_span(-seconds)} ago)"


def _ago(now: datetime, moment: str) -> str:
    then = _datetime(moment)
    if then is None:
        return ""
    return f" ({_span(max(int((now - then).total_seconds()), 0))} ago)"


def _span(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
