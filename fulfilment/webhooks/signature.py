"""``ob-signature``: how a webhook proves it comes from Onebox.

Onebox does not publish how it computes the header, so the scheme is a switch
(``FULFILMENT_WEBHOOK_SIGNATURE``), the same names the sandbox signs with:

- ``hmac-sha256`` (default): the hex HMAC-SHA256 of the raw body, keyed with
  the secret; an optional ``sha256=`` prefix (GitHub's and Stripe's habit) is
  accepted, and the hex in either case.
- ``hmac-sha256-base64``: the same digest, base64 (Shopify's habit).
- ``none``: no check at all; ``fulfilment.config`` refuses it unless Onebox
  is a plain-http sandbox.

The comparison is constant-time (``hmac.compare_digest``); the header and the
secret are never logged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

HMAC_SHA256 = "hmac-sha256"
HMAC_SHA256_BASE64 = "hmac-sha256-base64"
NONE = "none"
SCHEMES = (HMAC_SHA256, HMAC_SHA256_BASE64, NONE)
#: Longest header looked at: a digest in any spelling is far shorter.
MAX_HEADER = 256
_PREFIX = "sha256="


def _digest(secret: str, body: bytes) -> bytes:
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).digest()


def sign(scheme: str, secret: str, body: bytes) -> str | None:
    """The ``ob-signature`` of ``body`` under ``scheme`` (None: ``none`` sends no header)."""
    if scheme == HMAC_SHA256:
        return _digest(secret, body).hex()
    if scheme == HMAC_SHA256_BASE64:
        return base64.b64encode(_digest(secret, body)).decode("ascii")
    if scheme == NONE:
        return None
    raise ValueError(f"unknown signature scheme {scheme!r}; known: {', '.join(SCHEMES)}")


def verify(scheme: str, secret: str, body: bytes, header: str | None) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` under ``scheme``.

    A missing, empty, over-long or non-ASCII header is simply not valid; so is
    any signature when the secret is empty (a scheme other than ``none``).
    """
    if scheme == NONE:
        return True
    if scheme not in SCHEMES:
        raise ValueError(f"unknown signature scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    if not secret or not header or len(header) > MAX_HEADER or not header.isascii():
        return False
    given = header.strip()
    if given[:len(_PREFIX)].lower() == _PREFIX:
        given = given[len(_PREFIX):]
    if scheme == HMAC_SHA256:
        given = given.lower()
    expected = sign(scheme, secret, body)
    assert expected is not None
    return hmac.compare_digest(expected.encode("ascii"), given.encode("ascii"))
