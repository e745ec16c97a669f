"""Taking intents in: validate, admit to the ledger, then dispatch.

Nothing is enqueued for an intent that fails its contract (the error names
each bad field), nor twice for one reference: the same reference with the same
payload is a duplicate and is taken once; with a different payload it is a
conflict and is refused, as payment APIs treat a reused idempotency key.
How an admitted intent is dispatched (a Celery chain) is the caller's business:
this module never imports Celery.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from marshmallow import ValidationError

from fulfilment.errors import FulfilmentError, InvalidMessageError, PermanentError
from fulfilment.ledger import Admission, Ledger
from fulfilment.redact import scrub
from schemas.intent import PurchaseIntent, load_intent

log = logging.getLogger(__name__)

ACCEPTED, DUPLICATE, REFUSED = "accepted", "duplicate", "refused"

RawIntent = PurchaseIntent | Mapping[str, Any] | str | bytes


class ReferenceConflictError(PermanentError):
    """The reference was used before for a different purchase."""

    default_code = "REFERENCE_CONFLICT"


@dataclass(frozen=True)
class Submission:
    """What became of one submitted intent."""

    reference: str | None
    status: str  # accepted | duplicate | refused
    errors: Mapping[str, Any] = field(default_factory=dict)
    reason: str | None = None


def parse_intent(raw: RawIntent, *, max_quantity: int) -> PurchaseIntent:
    """The intent, or ``InvalidMessageError`` with the errors of each field."""
    if isinstance(raw, PurchaseIntent):
        return raw
    try:
        return load_intent(raw, max_quantity=max_quantity)
    except ValidationError as exc:
        messages = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
        raise InvalidMessageError("invalid purchase intent", _scrub_keys(messages)) from None


def _scrub_keys(messages: Mapping[Any, Any]) -> dict[Any, Any]:
    """Field errors keep the producer's field names; one may be an e-mail typed as a key."""
    return {scrub(key) if isinstance(key, str) else key:
            _scrub_keys(value) if isinstance(value, Mapping) else value
            for key, value in messages.items()}


def reference_of(raw: RawIntent) -> str | None:
    """The reference of a possibly invalid intent, for error reports."""
    if isinstance(raw, PurchaseIntent):
        return raw.reference
    if isinstance(raw, str | bytes):
        try:
            raw = json.loads(raw)
        except ValueError:
            return None
    value = raw.get("reference") if isinstance(raw, Mapping) else None
    return value if isinstance(value, str) and len(value) <= 64 else None


class Producer:
    """Validates, admits and dispatches intents."""

    def __init__(self, ledger: Ledger, dispatch: Callable[[str], None], *,
                 max_quantity: int) -> None:
        self._ledger = ledger
        self._dispatch = dispatch
        self._max_quantity = max_quantity

    def submit(self, raw: RawIntent) -> Submission:
        """Take one intent in; raise ``InvalidMessageError`` or ``ReferenceConflictError``."""
        intent = parse_intent(raw, max_quantity=self._max_quantity)
        admission = self._ledger.admit(intent)
        if admission is Admission.CONFLICT:
            raise ReferenceConflictError(
                f"reference {intent.reference} was already used for a different purchase")
        if admission is Admission.DUPLICATE:
            log.info("intent %s is a duplicate; taken once already", intent.reference)
            return Submission(intent.reference, DUPLICATE)
        self._dispatch(intent.reference)
        return Submission(intent.reference, ACCEPTED)

    def submit_many(self, intents: Iterable[RawIntent]) -> Iterator[Submission]:
        """Take each intent in; a refused one is reported, never raised."""
        for raw in intents:
            try:
                yield self.submit(raw)
            except InvalidMessageError as exc:
                yield Submission(reference_of(raw), REFUSED, exc.errors, exc.message)
            except FulfilmentError as exc:
                if not isinstance(exc, PermanentError):
                    raise
                yield Submission(reference_of(raw), REFUSED, {}, exc.message)


def describe_errors(errors: Mapping[Any, Any] | list[Any], path: str = "") -> list[str]:
    """Marshmallow's nested messages as lines: ``buyer.email: Not a valid email address.``"""
    if isinstance(errors, list):
        return [f"{path or 'message'}: {message}" for message in errors if isinstance(message, str)]
    lines = []
    for key, value in errors.items():
        name = path if key == "_schema" else (f"{path}.{key}" if path else str(key))
        lines.extend(describe_errors(value, name))
    return lines
