"""Scrub personal data and secrets out of text we did not write ourselves.

Onebox's error messages, exception texts of HTTP libraries and the like may
echo what we sent. Anything of theirs that goes into a log line, an exception
or a result passes through ``scrub`` first.
"""

from __future__ import annotations

import re

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_BEARER = re.compile(r"(?i)\b(bearer|token|secret|key|password)(\s*[=:]\s*|\s+)\S+")
# Seven or more digits, allowing the separators phone numbers are written with.
_PHONE = re.compile(r"\+?\d[\d\s().-]{5,}\d")

MAX_LENGTH = 300


def scrub(text: str | None, *, max_length: int = MAX_LENGTH) -> str:
    """``text`` with e-mails, phone-like numbers and credentials masked, and bounded."""
    if not text:
        return ""
    cleaned = _EMAIL.sub("<email>", text)
    cleaned = _BEARER.sub(lambda m: f"{m.group(1)}{m.group(2)}<redacted>", cleaned)
    cleaned = _PHONE.sub(_mask_phone, cleaned)
    if len(cleaned) > max_length:
        cleaned = cleaned[: max_length - 1] + "…"
    return cleaned


def _mask_phone(match: re.Match[str]) -> str:
    digits = sum(ch.isdigit() for ch in match.group(0))
    return "<phone>" if digits >= 7 else match.group(0)
