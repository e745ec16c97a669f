"""What a webhook told us, as handed from the receiver to the task.

A notice carries identifiers only (the order code, the action, Onebox's
delivery id and subtype, when it was received): the webhook's body holds
nothing else we act on, and nothing personal travels through the broker.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

PURCHASE = "PURCHASE"
REFUND = "REFUND"
CANCEL = "CANCEL"
#: The actions a task acts on; any other (PRINT, BOOKING, RELOCATE...) is acknowledged only.
ACTED_ON = frozenset({PURCHASE, REFUND, CANCEL})

#: Onebox order codes: short, upper-case letters and digits (a little wider, to be safe).
CODE = re.compile(r"[A-Za-z0-9_-]{1,64}")
ACTION = re.compile(r"[A-Z][A-Z_]{0,31}")
#: ob-delivery-id, ob-hook-id, ob-subtype: kept only when they look like identifiers.
TOKEN = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class NoticeError(ValueError):
    """A webhook or task argument that is not a notice; the reason names no value."""


@dataclass(frozen=True)
class Notice:
    """One webhook we act on: (code, action) is what it is deduplicated on."""

    action: str
    code: str
    #: Redis's clock (epoch seconds) when the receiver took the delivery.
    received_at: float
    delivery_id: str | None = None
    subtype: str | None = None

    def __post_init__(self) -> None:
        if not ACTION.fullmatch(self.action):
            raise NoticeError("the action is not an Onebox action (A-Z and _)")
        if not CODE.fullmatch(self.code):
            raise NoticeError("the order code is not 1-64 of A-Z a-z 0-9 _ -")
        for name in ("delivery_id", "subtype"):
            value = getattr(self, name)
            if value is not None and not TOKEN.fullmatch(value):
                raise NoticeError(f"the {name} is not 1-64 of A-Z a-z 0-9 . _ : -")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> Notice:
        """A task's argument back into a notice; ``NoticeError`` if it is not one."""
        if not isinstance(data, Mapping):
            raise NoticeError("a notice is a JSON object")
        allowed = {"action", "code", "received_at", "delivery_id", "subtype"}
        if set(data) - allowed or not {"action", "code", "received_at"} <= set(data):
            raise NoticeError(f"a notice has the keys {sorted(allowed)}")
        received = data["received_at"]
        if isinstance(received, bool) or not isinstance(received, int | float):
            raise NoticeError("received_at is epoch seconds")
        for name in ("action", "code", "delivery_id", "subtype"):
            value = data.get(name)
            if value is not None and not isinstance(value, str):
                raise NoticeError(f"{name} is a string")
        return cls(action=data["action"], code=data["code"], received_at=float(received),
                   delivery_id=data.get("delivery_id"), subtype=data.get("subtype"))


def optional_token(value: str | None) -> str | None:
    """A header kept only when it looks like an identifier (else dropped, not refused)."""
    if value is None:
        return None
    value = value.strip()
    return value if TOKEN.fullmatch(value) else None
