"""Scrub personal data and secrets out of text we did not write ourselves.

Onebox's error messages, exception texts of HTTP libraries and the like may
echo what we sent. Anything of theirs that goes into a log line, an exception
or a result passes through ``scrub`` first. A name has no pattern, so the
buyer's own name and other free fields are masked too while work on their
intent runs (``masking_buyer``: the flow and the buyer-data call set it).
E-mails and phone numbers are matched by pattern, whoever they belong to.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from schemas.intent import Buyer

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_BEARER = re.compile(r"(?i)\b(bearer|token|secret|key|password)(\s*[=:]\s*|\s+)\S+")
# Seven or more digits, allowing the separators phone numbers are written with.
_PHONE = re.compile(r"\+?\d[\d\s().-]{5,}\d")

MAX_LENGTH = 300
#: Shorter values are not masked on their own (a two-letter country would garble text).
MIN_KNOWN_LENGTH = 3

_KNOWN: contextvars.ContextVar[re.Pattern[str] | None] = contextvars.ContextVar(
    "redact_known", default=None)


@contextmanager
def masking(values: Iterable[str | None]) -> Iterator[None]:
    """While inside, ``scrub`` also masks these values (a buyer's name, say) as whole words."""
    words = sorted({v.strip() for v in values if v and len(v.strip()) >= MIN_KNOWN_LENGTH},
                   key=len, reverse=True)
    pattern = re.compile(r"(?i)(?<!\w)(?:" + "|".join(map(re.escape, words)) + r")(?!\w)") \
        if words else None
    token = _KNOWN.set(pattern)
    try:
        yield
    finally:
        _KNOWN.reset(token)


def masking_buyer(buyer: Buyer) -> contextlib.AbstractContextManager[None]:
    """``masking`` the buyer's values that no pattern recognises: names and free fields."""
    return masking([buyer.name, buyer.surname, *buyer.extra.values()])


def scrub(text: str | None, *, max_length: int = MAX_LENGTH) -> str:
    """``text`` with e-mails, phone-like numbers and credentials masked, and bounded."""
    if not text:
        return ""
    known = _KNOWN.get()
    cleaned = known.sub("<buyer>", text) if known is not None else text
    cleaned = _EMAIL.sub("<email>", cleaned)
    cleaned = _BEARER.sub(lambda m: f"{m.group(1)}{m.group(2)}<redacted>", cleaned)
    cleaned = _PHONE.sub(_mask_phone, cleaned)
    if len(cleaned) > max_length:
        cleaned = cleaned[: max_length - 1] + "…"
    return cleaned


def _mask_phone(match: re.Match[str]) -> str:
    digits = sum(ch.isdigit() for ch in match.group(0))
    return "<phone>" if digits >= 7 else match.group(0)
