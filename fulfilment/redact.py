"""Scrub personal data and secrets out of text we did not write ourselves.

Onebox's error messages, exception texts of HTTP libraries and the like may
echo what we sent. Anything of theirs that goes into a log line, an exception
or a result passes through ``scrub`` first. A name has no pattern, so the
buyer's own name and other free fields are masked too while work on their
intent runs (``masking_buyer``: the flow and the buyer-data call set it).
E-mails and phone numbers are matched by pattern, whoever they belong to.

URLs are masked the way the clients that read them parse them, so whatever
authenticates is hidden however it is spelled: redis-py and kombu take the
password as everything between the userinfo's first ``:`` and the netloc's
*last* ``@`` (an unencoded ``@`` in a password works), and redis-py also takes
``?password=`` (any query argument becomes a connection argument). A password
holding ``/``, ``?`` or ``#`` unencoded authenticates nowhere, but is masked
too: it is still someone's password.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from schemas.intent import Buyer

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_BEARER = re.compile(r"(?i)\b(bearer|token|secret|key|password)(\s*[=:]\s*|\s+)\S+")
# Seven or more digits, allowing the separators phone numbers are written with.
_PHONE = re.compile(r"\+?\d[\d\s().-]{5,}\d")

MAX_LENGTH = 300
#: What a masked password reads as.
MASK = "***"

_SCHEME = r"[A-Za-z][A-Za-z0-9+.-]*://"
#: Where one URL of a list ends and the next begins (Celery's ``amqp://a;amqp://b``).
_NEXT_URL = re.compile(rf"[;,]\s*(?={_SCHEME})")
#: A URL inside free text: up to white space or a quote.
_URL_IN_TEXT = re.compile(rf"{_SCHEME}[^\s'\"<>]*")
#: Query arguments whose value is a credential (redis-py passes any of them on).
_SECRET_QUERY = re.compile(r"(?i)((?:^|[?&;])[^=&;#]*(?:pass|secret|token)[^=&;#]*=)[^&;#]*")
#: ``//user:password@`` that ``urlsplit`` does not see (an unencoded ``/ ? #`` in it).
_LOOSE_USERINFO = re.compile(r"(//[^/?#@:\s]*:)[^@\s]*@")
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
    """``text`` with URL passwords, e-mails, phone-like numbers and credentials masked,
    and bounded."""
    if not text:
        return ""
    cleaned = mask_urls_in(text)
    known = _KNOWN.get()
    cleaned = known.sub("<buyer>", cleaned) if known is not None else cleaned
    cleaned = _EMAIL.sub("<email>", cleaned)
    cleaned = _BEARER.sub(lambda m: f"{m.group(1)}{m.group(2)}<redacted>", cleaned)
    cleaned = _PHONE.sub(_mask_phone, cleaned)
    if len(cleaned) > max_length:
        cleaned = cleaned[: max_length - 1] + "…"
    return cleaned


def mask_url(value: str) -> str:
    """A URL (or a ``;``-separated list of them) with every password in it replaced by
    ``***``; the user, host, port, path and other arguments kept."""
    pieces = _NEXT_URL.split(value)
    separators = _NEXT_URL.findall(value)
    masked = [_mask_one(piece) for piece in pieces]
    return "".join(part for pair in zip(masked, [*separators, ""], strict=True)
                   for part in pair)


def mask_urls_in(text: str) -> str:
    """Free text with the password of every URL in it masked (see ``mask_url``)."""
    return _URL_IN_TEXT.sub(lambda m: mask_url(m.group(0)), text)


def url_has_password(url: str) -> bool:
    """True when the URL carries a password in any spelling ``mask_url`` masks."""
    return mask_url(url) != url


def _mask_one(url: str) -> str:
    head, sep, rest = url.partition("//")
    if not sep:
        return url
    try:
        netloc = urlsplit(url).netloc
    except ValueError:  # an unparsable authority ("[" without "]"): hide all of it
        return f"{head}//{MASK}"
    if netloc and rest.startswith(netloc) and "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        rest = f"{user}{colon}{MASK if colon else ''}@{hostport}{rest[len(netloc):]}"
        return _mask_query(f"{head}//{rest}")
    if _cut_password(netloc, rest[len(netloc):]):
        return _mask_query(_LOOSE_USERINFO.sub(rf"\g<1>{MASK}@", url))
    return _mask_query(url)


def _cut_password(netloc: str, after: str) -> bool:
    """A ``user:pass/word@host`` that ``urlsplit`` cut short at the ``/``, ``?`` or ``#``:
    what it took for a port is no number, or an ``@`` follows in the path."""
    port = netloc.rpartition(":")[2] if ":" in netloc.rpartition("]")[2] else ""
    in_path = after.split("?", 1)[0].split("#", 1)[0]
    return (bool(port) and not port.isdigit()) or "@" in in_path


def _mask_query(url: str) -> str:
    before, question, after = url.partition("?")
    if not question:
        return url
    return before + _SECRET_QUERY.sub(rf"\g<1>{MASK}", question + after)


def _mask_phone(match: re.Match[str]) -> str:
    digits = sum(ch.isdigit() for ch in match.group(0))
    return "<phone>" if digits >= 7 else match.group(0)
