"""Switches for every choice the sandbox makes where the real Onebox API is unknown.

``Behaviour`` holds one field per unknown; each default is the sandbox's
documented choice (``docs/sandbox.md``), each alternative another answer the
real API might give. Tests flip them to prove the client copes with every
plausible answer. A ``Behaviour`` is immutable: changing a switch at run time
(``POST /__sandbox/config``) replaces the whole value.

The allowed values of each field come from its type: a ``Literal`` lists the
choices, ``bool`` is true/false and ``int`` a whole number >= 0. ``from_dict``
(JSON) and ``parse_assignments`` (the command line's ``KEY=VALUE``) both
validate against them, so an unknown key or value is refused with a message
that lists what is allowed.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal


class BehaviourError(ValueError):
    """An unknown switch or a value the switch does not take."""


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How the sandbox answers where the real API's behaviour is unknown."""

    #: Releasing seats of a PRE_CONFIRM order: it goes back to BASKET, DIST0004, or a
    #: 200 that does not take (nothing released, the order stays PRE_CONFIRM).
    release_outside_basket: Literal["to_basket", "refuse", "ignored"] = "to_basket"
    #: The orders-management read by code: works, or always 401 / 403 / 404 for this
    #: channel (404: as for an order it may not read, existing or not).
    orders_mgmt_read: Literal["ok", "401", "403", "404"] = "ok"
    #: Milliseconds the orders-management read lags behind the distribution API.
    orders_mgmt_lag_ms: int = 0
    #: Which orders the orders-management read shows: any with a code, or confirmed only.
    orders_mgmt_scope: Literal["coded", "confirmed"] = "coded"
    #: Pre-confirm of a PRE_CONFIRM order / confirm of a CONFIRM order: DIST0004 or 200.
    repeat_status_call: Literal["refuse", "idempotent"] = "refuse"
    #: An expired basket: 404 everywhere, or still readable by code as EXPIRED.
    expired_orders: Literal["gone", "readable"] = "gone"
    #: Whether a refused distribution call restarts the basket's expiry.
    refused_calls_touch: bool = True
    #: Whether the orders-management read restarts the basket's expiry.
    reads_touch: bool = False
    #: Seats-auto: one item per place, or one item per call (holding every place).
    seats_auto_items: Literal["per_place", "per_call"] = "per_place"
    #: Buyer data: a call replaces earlier data, or is merged into it.
    buyer_data: Literal["replace", "merge"] = "replace"
    #: A distribution POST without a body: counts as ``{}``, or 400 DIST0001.
    empty_body: Literal["as_object", "refuse"] = "as_object"
    #: The body of ``create``: checked like any other (415 / DIST0001), or ignored.
    create_body: Literal["checked", "ignored"] = "checked"
    #: Which refusal wins: field checks before the status check, or the status first.
    check_order: Literal["fields_first", "status_first"] = "fields_first"
    #: Seats, seats-auto or buyer data on a PRE_CONFIRM order: DIST0004, or done and
    #: the order goes back to BASKET.
    change_pre_confirmed: Literal["refuse", "to_basket"] = "refuse"
    #: The code of an order sent back to BASKET: kept, or dropped (a new one at the
    #: next pre-confirm; the old one reads 404).
    code_after_basket: Literal["kept", "new"] = "kept"
    #: Releasing an item id the order does not hold: DIST0005 and nothing released,
    #: or ignored (the others are released).
    release_unknown_items: Literal["refuse", "ignore"] = "refuse"
    #: A seat or place asked for without ``rate_id``: the session's first rate, or
    #: PARAMETER_REQUIRED.
    missing_rate_id: Literal["first_rate", "required"] = "first_rate"
    #: The HTTP status of ORDER_SEAT_NOT_AVAILABLE.
    seat_unavailable_status: Literal[409, 400] = 409
    #: A refund naming an item already REFUNDED: 409 PRODUCT_STATE_INVALID (what the
    #: public documentation says), or refunded again (the audit's ``refunded_twice``).
    repeat_refund: Literal["conflict", "again"] = "conflict"
    #: How the webhooks' ``ob-signature`` is computed (``fulfilment.webhooks.signature``).
    webhook_signature: Literal["hmac-sha256", "hmac-sha256-base64", "none"] = "hmac-sha256"

    # -- validation ----------------------------------------------------------

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """Every switch's name."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def choices(cls, key: str) -> tuple[Any, ...] | type:
        """The values a switch takes: a tuple of choices, or ``bool`` / ``int``."""
        hint = _hints()[key]
        if typing.get_origin(hint) is Literal:
            return typing.get_args(hint)
        assert hint in (bool, int), hint
        return typing.cast(type, hint)

    @classmethod
    def check(cls, key: str, value: Any) -> Any:
        """``value`` if switch ``key`` takes it, else ``BehaviourError``."""
        if key not in _hints():
            raise BehaviourError(f"unknown switch {key!r}; known: {', '.join(cls.keys())}")
        allowed = cls.choices(key)
        if allowed is bool:
            if isinstance(value, bool):
                return value
            raise BehaviourError(f"{key} must be true or false, got {value!r}")
        if allowed is int:
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
            raise BehaviourError(f"{key} must be a whole number >= 0, got {value!r}")
        assert isinstance(allowed, tuple)
        if any(type(value) is type(choice) and value == choice for choice in allowed):
            return value
        raise BehaviourError(f"{key} must be one of {list(allowed)}, got {value!r}")

    def replace(self, changes: Mapping[str, Any]) -> Behaviour:
        """A copy with ``changes`` (JSON values) applied; all validated first."""
        checked = {key: self.check(key, value) for key, value in changes.items()}
        return dataclasses.replace(self, **checked) if checked else self

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Behaviour:
        """From JSON; missing switches keep their default."""
        return cls().replace(data)

    def to_dict(self) -> dict[str, Any]:
        """Every switch and its value (JSON-ready)."""
        return {key: getattr(self, key) for key in self.keys()}

    @classmethod
    def parse_value(cls, key: str, text: str) -> Any:
        """A switch's value from command-line text (``true``, ``250``, ``refuse``)."""
        if key not in _hints():
            raise BehaviourError(f"unknown switch {key!r}; known: {', '.join(cls.keys())}")
        allowed = cls.choices(key)
        word = text.strip()
        if allowed is bool:
            lowered = word.lower()
            if lowered in ("true", "yes", "on", "1"):
                return True
            if lowered in ("false", "no", "off", "0"):
                return False
            raise BehaviourError(f"{key} must be true or false, got {text!r}")
        if allowed is int:
            if not (word.isascii() and word.isdigit()):
                raise BehaviourError(f"{key} must be a whole number >= 0, got {text!r}")
            return int(word)
        assert isinstance(allowed, tuple)
        for choice in allowed:
            if str(choice) == word:
                return choice
        raise BehaviourError(f"{key} must be one of {[str(c) for c in allowed]}, got {text!r}")

    def with_assignments(self, assignments: Iterable[str]) -> Behaviour:
        """A copy with ``KEY=VALUE`` texts (the command line's ``--behaviour``) applied."""
        changes: dict[str, Any] = {}
        for assignment in assignments:
            key, sep, text = assignment.partition("=")
            if not sep:
                raise BehaviourError(f"expected KEY=VALUE, got {assignment!r}")
            key = key.strip()
            changes[key] = self.parse_value(key, text)
        return self.replace(changes)


_HINTS: dict[str, Any] = {}


def _hints() -> dict[str, Any]:
    """The fields' resolved types (annotations are strings under PEP 563)."""
    if not _HINTS:
        hints = typing.get_type_hints(Behaviour)
        _HINTS.update({f.name: hints[f.name] for f in dataclasses.fields(Behaviour)})
    return _HINTS


#: Today's behaviour: every switch at its default.
DEFAULT = Behaviour()
