"""OAuth2 client-credentials tokens, shared by every worker through Redis.

A fleet of workers must not each ask Onebox for a token, nor all ask at once
when it nears expiry: the token lives in Redis, and whoever renews it holds a
Redis lock while the others wait and then read the new one. Each process also
keeps the token in memory, so the common case costs no round trip at all.
If Redis is unreachable the provider falls back to its own memory: a token
request too many is better than a sale not made.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
import requests
from marshmallow import ValidationError

from fulfilment.config import Settings, mask_url
from fulfilment.errors import ConfigError, TransientError
from fulfilment.onebox.guard import OneboxGuard, guarded
from fulfilment.onebox.transport import (
    RETRY_LATER_STATUSES,
    TRACE_HEADER,
    classify_send_error,
    parse_retry_after,
)
from fulfilment.redis_text import text
from schemas.onebox import load_api_error, load_token

log = logging.getLogger(__name__)

CLIENT_ID = "seller-channel-client"
STEP = "token"
#: Seconds to wait before asking again after Onebox refused our credentials.
AUTH_RETRY_AFTER = 5.0
#: Longest a worker waits for another to finish renewing the token.
LOCK_WAIT = 15.0
#: Longest a renewal may hold the lock (a crashed holder frees it after this).
LOCK_TTL = 30.0



class AuthRefusedError(TransientError):
    """Onebox refused our credentials or token (401 or 403): nothing was done.

    Auth trouble passes (a token revoked under us, an auth outage, a key being
    rotated): the flow waits it out within the intent's time budget before any
    verdict, never fails or settles on it at once.
    """

    default_code = "AUTH_REFUSED"


# Compare-and-delete: forget the shared token only if it is still the one that
# was refused, so a worker late with its 401 does not throw away a fresh token.
_DELETE_IF_SAME = """
if redis.call('HGET', KEYS[1], 'access_token') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True)
class CachedToken:
    """An access token and when to stop using it (renew_at is before expiry)."""

    access_token: str
    expires_at: float
    renew_at: float

    def __repr__(self) -> str:
        return f"CachedToken(<redacted>, expires_at={self.expires_at:.0f})"

    def usable(self, now: float) -> bool:
        return now < self.renew_at

    def to_fields(self) -> dict[Any, Any]:
        return {"access_token": self.access_token, "expires_at": repr(self.expires_at),
                "renew_at": repr(self.renew_at)}

    @classmethod
    def from_fields(cls, raw: dict[Any, Any]) -> CachedToken | None:
        data = {text(k): text(v) for k, v in raw.items()}
        try:
            return cls(data["access_token"], float(data["expires_at"]), float(data["renew_at"]))
        except (ValueError, KeyError):
            return None


class TokenProvider:
    """Hands out a valid bearer token; renews it before expiry and on request."""

    def __init__(
        self,
        settings: Settings,
        redis_client: redis.Redis,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
        *,
        guard: OneboxGuard | None = None,
    ) -> None:
        self._settings = settings
        #: The fleet's rate limit and breaker: a token request is a call like any other.
        self._guard = guard
        self._redis = redis_client
        self._session = session or requests.Session()
        # The session (shared with the client's calls) verifies Onebox's certificate,
        # said here rather than left to a default: never False, a CA bundle if set.
        self._session.verify = settings.tls_verify
        self._clock = clock
        self._local: CachedToken | None = None
        self._mutex = threading.Lock()
        # The key names the host and channel, never the secret.
        scope = hashlib.sha256(
            f"{settings.token_url}|{settings.onebox_channel_id}".encode()
        ).hexdigest()[:16]
        self.key = f"{settings.key_prefix}:onebox:token:{scope}"
        self._delete_if_same = self._redis.register_script(_DELETE_IF_SAME)
        #: How many tokens this process fetched from Onebox (for tests and metrics).
        self.fetched = 0

    def get(self) -> str:
        """A bearer token valid for a while yet."""
        now = self._clock()
        local = self._local
        if local is not None and local.usable(now):
            return local.access_token
        with self._mutex:
            return self._refresh_shared().access_token

    def check_credentials(self) -> bool:
        """Ask Onebox for a token now (the worker's start-up check); True if it gave one.

        The shared cache is bypassed: a token another worker cached proves
        nothing about the key this process holds. Refused credentials (a 4xx
        other than 408, 425 or 429) raise ``ConfigError``: a wrong
        ``ONEBOX_API_KEY`` or ``ONEBOX_CHANNEL_ID`` stays wrong, and would fail
        every intent. An Onebox that cannot answer now (unreachable, 5xx, 429,
        the breaker open) is not a wrong key: a warning, False, and the worker
        starts; its tasks wait the outage out as they would one that began later.
        """
        try:
            token = self._fetch()
        except TransientError as exc:
            status = exc.status
            if status is not None and 400 <= status < 500 and status not in RETRY_LATER_STATUSES:
                raise ConfigError(
                    f"Onebox refused the credentials of channel "
                    f"{self._settings.onebox_channel_id!r} at "
                    f"{mask_url(self._settings.token_url)} (HTTP {status}, {exc.code}): check "
                    f"ONEBOX_API_KEY and ONEBOX_CHANNEL_ID") from None
            log.warning("could not check Onebox's credentials at start-up (%s, %s); starting "
                        "anyway: calls wait for Onebox as in any outage", exc.code,
                        exc.message)
            return False
        with self._mutex:
            self._local = token  # fetched anyway: this process uses it until renewal
        return True

    def invalidate(self, access_token: str) -> None:
        """Onebox refused ``access_token`` (401): forget it here and in Redis."""
        with self._mutex:
            if self._local is not None and self._local.access_token == access_token:
                self._local = None
            try:
                self._delete_if_same(keys=[self.key], args=[access_token])
            except redis.RedisError as exc:
                log.warning("could not drop the shared Onebox token: %s", type(exc).__name__)

    def _refresh_shared(self) -> CachedToken:
        now = self._clock()
        if self._local is not None and self._local.usable(now):
            return self._local  # another thread renewed it while we waited
        try:
            token = self._read_shared(now)
            if token is None:
                token = self._renew_under_lock()
        except redis.RedisError as exc:
            log.warning("Redis unavailable for the token cache (%s); using a local token",
                        type(exc).__name__)
            token = self._fetch()
        self._local = token
        return token

    def _read_shared(self, now: float) -> CachedToken | None:
        raw = self._redis.hgetall(self.key)
        token = CachedToken.from_fields(raw) if raw else None
        return token if token is not None and token.usable(now) else None

    def _renew_under_lock(self) -> CachedToken:
        lock = self._redis.lock(f"{self.key}:lock", timeout=LOCK_TTL, blocking_timeout=LOCK_WAIT)
        acquired = lock.acquire()
        try:
            if acquired:
                # Whoever held the lock before us may have renewed it already.
                token = self._read_shared(self._clock())
                if token is not None:
                    return token
            else:
                log.warning("waited %.0fs for another worker to renew the token", LOCK_WAIT)
            token = self._fetch()
            ttl_ms = max(int((token.expires_at - self._clock()) * 1000), 1)
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(self.key, mapping=token.to_fields())
                pipe.pexpire(self.key, ttl_ms)
                pipe.execute()
            return token
        finally:
            if acquired:
                try:
                    lock.release()
                except redis.exceptions.LockError:
                    log.warning("the token lock expired while renewing")

    def _fetch(self) -> CachedToken:
        """Ask Onebox for a new token (client-credentials grant)."""
        settings = self._settings
        form = {
            "grant_type": "client_credentials",
            "channel_id": settings.onebox_channel_id,
            "client_id": CLIENT_ID,
            "client_secret": settings.onebox_api_key,
        }
        started = self._clock()
        try:
            response = guarded(self._guard, STEP, lambda: self._session.post(
                settings.token_url,
                data=form,
                headers={"Accept": "application/json"},
                timeout=(settings.onebox_connect_timeout, settings.onebox_read_timeout),
            ))
        except requests.RequestException as exc:
            # Asking for a token twice is harmless: every failure here is transient.
            raise classify_send_error(exc, step=STEP, idempotent=True) from exc
        trace_id = response.headers.get(TRACE_HEADER)
        if response.status_code != 200:
            raise self._token_error(response, trace_id)
        try:
            grant = load_token(response.json())
        except (ValueError, ValidationError):
            raise TransientError("Onebox's token response is malformed",
                                 code="MALFORMED_RESPONSE", status=response.status_code,
                                 trace_id=trace_id, step=STEP) from None
        self.fetched += 1
        lifetime = float(grant.expires_in)
        margin = min(settings.onebox_token_renew_margin, lifetime / 2)
        log.info("obtained an Onebox access token valid for %ds", grant.expires_in)
        return CachedToken(grant.access_token, started + lifetime, started + lifetime - margin)

    @staticmethod
    def _token_error(response: requests.Response, trace_id: str | None) -> Exception:
        status = response.status_code
        try:
            api_error = load_api_error(response.json())
        except ValueError:
            api_error = None
        code = api_error.code if api_error else f"HTTP_{status}"
        if status == 429 or status >= 500:
            return TransientError("Onebox's token endpoint is unavailable", code=code,
                                  status=status, trace_id=trace_id, step=STEP,
                                  retry_after=parse_retry_after(response))
        # Refused credentials. A wrong key stays wrong, but an auth outage or a key
        # being rotated passes: within the retry deadline it is worth waiting out,
        # and nothing was bought meanwhile. (A wrong key at start-up is an operator's.)
        kind = AuthRefusedError if status in (401, 403) else TransientError
        return kind("Onebox refused the channel's credentials", code=code,
                              status=status, trace_id=trace_id, step=STEP,
                              retry_after=AUTH_RETRY_AFTER)
