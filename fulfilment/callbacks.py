"""Outcomes POSTed to the shop: queued in Redis when published, sent by celery beat.

Publishing an outcome must never wait for a shop's server, so the publisher
only adds the callback to an outbox in Redis (``CallbackOutbox.add``: one
script, one round trip, nothing on the network). ``CallbackSender.run``,
called by beat every ``FULFILMENT_CALLBACK_INTERVAL`` seconds, takes what is
due and POSTs it: 2xx is delivered (removed), anything else is tried again
with backoff until ``FULFILMENT_CALLBACK_FOR`` has passed since publication,
then dropped with a warning and counted. Delivery is at least once: the shop
de-duplicates on ``result_id`` (and keeps the highest ``delivery``; a settled
outcome that replaces an ``unsettled`` one is a second delivery of the same
``result_id``).

Backoff is per endpoint, not per callback: one failure (no answer, 5xx, 429,
408, or an address refused) holds the endpoint for 1 s, doubling to
``FULFILMENT_CALLBACK_MAX_DELAY``, and its callbacks wait with it; the first
try after the hold is the probe. So a dead endpoint costs one request per
hold, whatever its backlog, and other shops' endpoints go on (each endpoint
is served by a thread of its own, every request bounded by
``FULFILMENT_CALLBACK_TIMEOUT``). Any other answer (4xx, 3xx: redirects are
never followed) is that callback's own failure: it alone backs off.

Request forgery: a callback URL is a place this service sends requests to on
someone's behalf, so plain ``http://`` and addresses in private, loopback,
link-local, multicast or reserved ranges are refused unless
``FULFILMENT_CALLBACK_ALLOW`` lists the host (or the address's network). The
URL is checked at start-up; at every send the host name is resolved, every
address it has is checked, and the connection goes to the checked address
(TLS still verifies the certificate against the host name): a name that
resolves to a public address when checked and a private one when connecting
(DNS rebinding) cannot slip through, because nothing resolves it a second
time.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import certifi
import redis
import urllib3

from fulfilment import metrics
from fulfilment.keys import Keys
from fulfilment.redis_text import text
from schemas.result import UNSETTLED, OrderResult, dump_result

log = logging.getLogger(__name__)

#: The signature's header: ``t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">``.
SIGNATURE_HEADER = "X-Fulfilment-Signature"
RESULT_ID_HEADER = "X-Fulfilment-Result-Id"
DELIVERY_HEADER = "X-Fulfilment-Delivery"
#: Seconds between a signature's time and the receiver's clock that ``verify`` accepts.
DEFAULT_TOLERANCE = 300
#: The first hold of a failing endpoint; it doubles per failure up to the setting's cap.
FIRST_DELAY = 1.0
#: Callbacks claimed per round of a run; a run goes on with more rounds while time is left.
CLAIM_BATCH = 200
#: Seconds a run starts new rounds for (each request is bounded by the timeout besides).
RUN_BUDGET = 5.0
#: Endpoints served at once, each by a thread of its own.
ENDPOINT_THREADS = 4
#: Bytes of an answer read (the body is not used; a longer one closes the connection).
ANSWER_LIMIT = 65_536
#: Answers that say the endpoint itself is in trouble: it is held, not just this callback.
ENDPOINT_TROUBLE = frozenset({408, 429})

_NON_PUBLIC = ("private", "loopback", "link-local", "multicast", "reserved", "unspecified")


# --- signatures ------------------------------------------------------------------
def signature(secret: str, body: bytes, timestamp: int) -> str:
    """The ``X-Fulfilment-Signature`` value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def verify(secret: str, header: str, body: bytes, tolerance: float = DEFAULT_TOLERANCE, *,
           now: float | None = None) -> bool:
    """For a shop: True when ``header`` signs exactly ``body`` with ``secret``, made within
    ``tolerance`` seconds of ``now`` (this host's clock by default).

    ``body`` is the raw request body, before any JSON parsing. Several ``v1=`` parts
    are accepted (any one matching will do), for a secret being rotated.
    """
    stamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isdigit():
            stamp = int(value)
        elif name == "v1":
            candidates.append(value)
    if stamp is None or not candidates:
        return False
    moment = time.time() if now is None else now
    if abs(moment - stamp) > tolerance:
        return False
    expected = signature(secret, body, stamp).rsplit("v1=", 1)[1]
    return any(hmac.compare_digest(expected, candidate) for candidate in candidates)


# --- what may be reached -----------------------------------------------------------
class CallbackRefused(Exception):
    """A callback URL or address this service will not send to (request forgery)."""


@dataclass(frozen=True)
class AllowList:
    """``FULFILMENT_CALLBACK_ALLOW``: hosts by name, and addresses or networks."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def parse(cls, raw: str) -> AllowList:
        hosts: set[str] = set()
        networks = []
        for entry in filter(None, (e.strip().lower().strip("[]") for e in raw.split(","))):
            with contextlib.suppress(ValueError):
                networks.append(ipaddress.ip_network(entry, strict=False))
            hosts.add(entry)
        return cls(frozenset(hosts), tuple(networks))

    def host_listed(self, host: str) -> bool:
        return host.lower().strip("[]").rstrip(".") in self.hosts

    def address_allowed(self, host: str, address: str) -> bool:
        """A public address; or any address of a listed host, or in a listed network."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if self.host_listed(host) or any(ip in network for network in self.networks):
            return True
        return not _non_public(ip)

    def check_url(self, url: str) -> None:
        """Refuse plain http:// and a non-public literal address, unless the host is listed."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.scheme not in {"http", "https"} or not host:
            raise CallbackRefused("a callback URL must be an absolute https:// URL")
        if parts.scheme == "http" and not self.host_listed(host):
            raise CallbackRefused(
                f"plain http:// to {host!r}: outcomes would cross the network unencrypted; "
                f"use https://, or add {host!r} to FULFILMENT_CALLBACK_ALLOW")
        if host in {"localhost", "localhost.localdomain"} or host.endswith(".localhost"):
            literal = "127.0.0.1"
        else:
            literal = host
        try:
            ipaddress.ip_address(literal)
        except ValueError:
            return  # a name: its addresses are checked at every send
        if not self.address_allowed(host, literal):
            raise CallbackRefused(
                f"{host!r} is a private, loopback, link-local or reserved address; add it to "
                f"FULFILMENT_CALLBACK_ALLOW if the callback is meant to reach it")

    def resolve(self, host: str, port: int,
                resolver: Callable[..., Any] = socket.getaddrinfo) -> str:
        """The address to connect to: every address ``host`` resolves to must be allowed."""
        try:
            found = resolver(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise CallbackRefused(f"cannot resolve {host!r}: {exc}") from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in found))
        if not addresses:
            raise CallbackRefused(f"{host!r} resolves to no address")
        refused = [a for a in addresses if not self.address_allowed(host, a)]
        if refused:
            raise CallbackRefused(
                f"{host!r} resolves to {refused[0]}, a private, loopback, link-local or "
                f"reserved address not in FULFILMENT_CALLBACK_ALLOW")
        return addresses[0]


def _non_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:  # ::ffff:10.0.0.1 is 10.0.0.1
        ip = mapped
    return any(getattr(ip, f"is_{kind.replace('-', '_')}") for kind in _NON_PUBLIC) \
        or not ip.is_global


# --- where, and when -----------------------------------------------------------------
def url_for(routes: Mapping[str | None, str], shop: str | None) -> str | None:
    """The shop's own URL, else the deployment's; None when neither is set."""
    if shop is not None and shop in routes:
        return routes[shop]
    return routes.get(None)


def backoff(failures: int, max_delay: float, first: float = FIRST_DELAY) -> float:
    """Seconds to wait after ``failures`` failures in a row: 1, 2, 4, ... up to ``max_delay``."""
    if failures <= 0:
        return 0.0
    return min(first * 2.0 ** min(failures - 1, 62), max_delay)


# --- the outbox (Redis) ------------------------------------------------------------------
# KEYS: due, since, body, seq. ARGV: member, now, the payload's JSON without its opening
# brace (the delivery number is put in front of it here).
_ADD = """
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return 0 end
local seq = redis.call('INCR', KEYS[4])
redis.call('HSET', KEYS[3], ARGV[1], '{"delivery":' .. seq .. ',' .. ARGV[3])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return seq
"""

# Claim what is due by moving it ``lease`` seconds on: a sender that dies holding it lets it
# come back then. KEYS: due, since, body, attempts. ARGV: now, lease, batch.
_CLAIM = """
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
local out = {}
for _, member in ipairs(members) do
  redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), member)
  local since = redis.call('ZSCORE', KEYS[2], member)
  local body = redis.call('HGET', KEYS[3], member)
  local attempts = redis.call('HGET', KEYS[4], member)
  table.insert(out, {member, since or false, body or false, attempts or '0'})
end
return out
"""

# KEYS: due, since, body, attempts. ARGV: member.
_FORGET = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
return 1
"""


@dataclass(frozen=True)
class CallbackKeys:
    due: str
    since: str
    body: str
    attempts: str
    seq: str
    hold: str
    lock: str

    @classmethod
    def of(cls, keys: Keys) -> CallbackKeys:
        return cls(*(keys.callbacks(kind) for kind in
                     ("due", "since", "body", "attempts", "seq", "hold", "lock")))


def payload(result: OrderResult) -> dict[str, Any]:
    """The callback's JSON, less its ``delivery`` number (given when it is queued)."""
    return {"event": "outcome", "result_id": result.result_id, "reference": result.reference,
            "status": result.status, "final": result.status != UNSETTLED,
            "shop": result.shop, "result": dump_result(result)}


class CallbackOutbox:
    """Where the publisher leaves each outcome for the sender: Redis only, never the network."""

    def __init__(self, client: redis.Redis, keys: Keys, routes: Mapping[str | None, str],
                 clock: Callable[[], float]) -> None:
        self._redis = client
        self._keys = CallbackKeys.of(keys)
        self._routes = dict(routes)
        self._clock = clock
        self._add = client.register_script(_ADD)

    def add(self, result: OrderResult) -> int | None:
        """Queue ``result`` for its shop's URL; its delivery number, 0 when it is queued
        already (the same outcome published again), None when no URL is set for the shop."""
        if url_for(self._routes, result.shop) is None:
            return None
        # One callback per outcome: an unsettled one and the settled one after it are two.
        member = f"{result.result_id}:{result.status}"
        rest = json.dumps(payload(result), separators=(",", ":"), sort_keys=True)[1:]
        k = self._keys
        return int(self._add(keys=[k.due, k.since, k.body, k.seq],
                             args=[member, repr(self._clock()), rest]))


# --- the sender ------------------------------------------------------------------------------
@dataclass
class Claimed:
    member: str
    since: float
    body: bytes
    attempts: int
    result_id: str
    delivery: int
    shop: str | None


@dataclass
class RunReport:
    delivered: int = 0
    failed: int = 0
    dropped: int = 0
    deferred: int = 0
    endpoints_failing: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SenderConfig:
    routes: Mapping[str | None, str]
    secret: str
    allow: AllowList
    keep_for: float
    timeout: float
    max_delay: float
    run_budget: float = RUN_BUDGET
    batch: int = CLAIM_BATCH

    @classmethod
    def from_settings(cls, settings: Any) -> SenderConfig:
        return cls(settings.callback_routes, settings.callback_secret,
                   AllowList.parse(settings.callback_allow), settings.callback_for,
                   settings.callback_timeout, settings.callback_max_delay)


class _Failure(Exception):
    """One try failed; ``endpoint``: the endpoint is in trouble (hold it), not only this one."""

    def __init__(self, reason: str, *, endpoint: bool) -> None:
        super().__init__(reason)
        self.reason, self.endpoint = reason, endpoint


class CallbackSender:
    """One run: claim what is due, POST it per endpoint in parallel, record how each went.

    One run at a time per deployment (a short lock in Redis); a run that finds the lock
    taken returns at once, so beat's runs never pile up in a worker.
    """

    def __init__(self, client: redis.Redis, keys: Keys, config: SenderConfig,
                 clock: Callable[[], float], *,
                 resolver: Callable[..., Any] = socket.getaddrinfo) -> None:
        self._redis = client
        self._keys = CallbackKeys.of(keys)
        self._config = config
        self._clock = clock
        self._resolver = resolver
        self._claim = client.register_script(_CLAIM)
        self._forget = client.register_script(_FORGET)
        #: Seconds a claimed callback stays claimed: a whole run, with each request's time.
        self.lease = config.run_budget + 2 * config.timeout + 5
        self._deadline = 0.0

    def run(self) -> RunReport:
        report = RunReport()
        k = self._keys
        lock = self._redis.lock(k.lock, timeout=self.lease, blocking_timeout=0)
        if not lock.acquire(blocking=False):
            return report
        try:
            self._deadline = time.monotonic() + self._config.run_budget
            while time.monotonic() < self._deadline:
                claimed = self._take()
                if not claimed:
                    break
                self._round(claimed, report)
                if len(claimed) < self._config.batch:
                    break
        finally:
            with contextlib.suppress(redis.exceptions.LockError):  # it lapsed: another's now
                lock.release()
        return report

    # -- one round --------------------------------------------------------------------------
    def _take(self) -> list[Claimed]:
        k = self._keys
        if not self._redis.zcard(k.due):
            self._redis.delete(k.hold)  # nothing waits: no endpoint is failing any more
            return []
        rows = self._claim(keys=[k.due, k.since, k.body, k.attempts],
                           args=[repr(self._clock()), repr(self.lease), self._config.batch])
        claimed = []
        for member, since, body, attempts in rows:
            name = text(member)
            if not body:  # forgotten meanwhile (delivered by a run whose lease had lapsed)
                self._forget(keys=[k.due, k.since, k.body, k.attempts], args=[name])
                continue
            raw = body if isinstance(body, bytes) else str(body).encode()
            parsed = json.loads(raw)
            claimed.append(Claimed(name, float(since or 0.0), raw, int(attempts or 0),
                                   str(parsed.get("result_id", "")),
                                   int(parsed.get("delivery", 0)), parsed.get("shop")))
        # In the order they were published, as far as one claim goes (the shop relies on
        # ``delivery``, never on the order of arrival).
        return sorted(claimed, key=lambda item: item.delivery)

    def _round(self, claimed: list[Claimed], report: RunReport) -> None:
        now = self._clock()
        holds = self._holds()
        by_url: dict[str, list[Claimed]] = {}
        for item in claimed:
            url = url_for(self._config.routes, item.shop)
            if url is None:
                self._drop(item, "no_url", report, "no callback URL is set for its shop now")
            elif now - item.since > self._config.keep_for:
                self._drop(item, "expired", report,
                           f"not delivered within FULFILMENT_CALLBACK_FOR "
                           f"({self._config.keep_for:g} s)")
            elif holds.get(url, {}).get("until", 0.0) > now:
                self._reschedule(item, holds[url]["until"])
                report.deferred += 1
            else:
                by_url.setdefault(url, []).append(item)
        if not by_url:
            return
        with ThreadPoolExecutor(max_workers=min(ENDPOINT_THREADS, len(by_url)),
                                thread_name_prefix="callback") as pool:
            for _ in pool.map(lambda pair: self._serve(pair[0], pair[1], holds, report),
                              by_url.items()):
                pass

    def _serve(self, url: str, items: list[Claimed], holds: dict[str, dict[str, Any]],
               report: RunReport) -> None:
        """One endpoint's callbacks, in order, until the endpoint fails (the rest wait)."""
        endpoint = _Endpoint(url, self._config, self._resolver)
        try:
            for index, item in enumerate(items):
                if time.monotonic() > self._deadline:
                    # The run's time is up: the rest go first next run, no try counted.
                    now = self._clock()
                    for rest in items[index:]:
                        self._reschedule(rest, now)
                    report.deferred += len(items) - index
                    return
                try:
                    endpoint.post(item, self._sign(item))
                except _Failure as failure:
                    metrics.callback_failed(failure.reason)
                    report.failed += 1
                    if failure.endpoint:
                        self._hold(url, failure.reason, holds.get(url), items[index:], report)
                        return
                    self._answered(url, holds)
                    self._item_failed(item, failure.reason)
                    continue
                self._forget(keys=self._forget_keys, args=[item.member])
                metrics.callback_delivered()
                report.delivered += 1
                self._answered(url, holds)
        finally:
            endpoint.close()

    def _answered(self, url: str, holds: dict[str, dict[str, Any]]) -> None:
        """The endpoint answers (whatever it said of one callback): it is held no more."""
        if holds.pop(url, None) is not None:
            self._redis.hdel(self._keys.hold, url)
            log.warning("callback endpoint %s answers again", _shown(url))

    @property
    def _forget_keys(self) -> list[str]:
        k = self._keys
        return [k.due, k.since, k.body, k.attempts]

    def _sign(self, item: Claimed) -> str:
        return signature(self._config.secret, item.body, int(self._clock()))

    def _holds(self) -> dict[str, dict[str, Any]]:
        raw = self._redis.hgetall(self._keys.hold)
        return {text(url): json.loads(value) for url, value in raw.items()}

    def _hold(self, url: str, reason: str, held: dict[str, Any] | None,
              waiting: list[Claimed], report: RunReport) -> None:
        """The endpoint failed: hold it, doubling, and put its callbacks off until then."""
        now = self._clock()
        failures = int(held["failures"]) + 1 if held else 1
        until = now + backoff(failures, self._config.max_delay)
        since = float(held["since"]) if held else now
        self._redis.hset(self._keys.hold, url, json.dumps(
            {"until": until, "failures": failures, "since": since, "reason": reason}))
        report.endpoints_failing.append(url)
        if failures == 1:
            log.warning("callback endpoint %s failed (%s): its callbacks wait, tried again "
                        "with backoff", _shown(url), reason)
        else:
            log.info("callback endpoint %s still failing (%s, %d in a row); next try in %.0f s",
                     _shown(url), reason, failures, until - now)
        for item in waiting:
            if now - item.since > self._config.keep_for:
                self._drop(item, "expired", report, "not delivered within "
                           f"FULFILMENT_CALLBACK_FOR ({self._config.keep_for:g} s)")
            else:
                self._reschedule(item, until)

    def _item_failed(self, item: Claimed, reason: str) -> None:
        """The endpoint answered, refusing this callback: it alone backs off."""
        attempts = item.attempts + 1
        k = self._keys
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(k.attempts, item.member, attempts)
        pipe.zadd(k.due, {item.member: self._clock() + backoff(attempts, self._config.max_delay)},
                  xx=True)
        pipe.execute()
        log.warning("callback %s (result %s) refused by its endpoint (%s), try %d",
                    item.delivery, item.result_id, reason, attempts)

    def _reschedule(self, item: Claimed, at: float) -> None:
        self._redis.zadd(self._keys.due, {item.member: at}, xx=True)

    def _drop(self, item: Claimed, reason: str, report: RunReport, why: str) -> None:
        self._forget(keys=self._forget_keys, args=[item.member])
        metrics.callback_dropped(reason)
        report.dropped += 1
        log.warning("callback %s (result %s) dropped: %s; the outcome is still on the results "
                    "queue", item.delivery, item.result_id, why)


class _Endpoint:
    """POSTs to one callback URL, at the address checked for it, for the length of a round."""

    def __init__(self, url: str, config: SenderConfig, resolver: Callable[..., Any]) -> None:
        parts = urlsplit(url)
        self.url = url
        self._config = config
        self._resolver = resolver
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._https else 80)
        default_port = (self._https and self._port == 443) or \
            (not self._https and self._port == 80)
        shown_host = f"[{self._host}]" if ":" in self._host else self._host
        self._host_header = shown_host if default_port else f"{shown_host}:{self._port}"
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._pool: urllib3.HTTPConnectionPool | None = None

    def _connection(self) -> urllib3.HTTPConnectionPool:
        if self._pool is not None:
            return self._pool
        try:
            self._config.allow.check_url(self.url)
            address = self._config.allow.resolve(self._host, self._port, self._resolver)
        except CallbackRefused as exc:
            log.warning("callback to %s refused: %s", _shown(self.url), exc)
            raise _Failure("refused", endpoint=True) from None
        timeout = urllib3.Timeout(total=self._config.timeout,
                                  connect=min(self._config.timeout, 3.05))
        if self._https:
            self._pool = urllib3.HTTPSConnectionPool(
                address, self._port, timeout=timeout, retries=False, maxsize=1,
                server_hostname=self._host, assert_hostname=self._host,
                cert_reqs="CERT_REQUIRED", ca_certs=certifi.where())
        else:
            self._pool = urllib3.HTTPConnectionPool(address, self._port, timeout=timeout,
                                                    retries=False, maxsize=1)
        return self._pool

    def post(self, item: Claimed, signed: str) -> None:
        """Deliver ``item``; raise ``_Failure`` unless the answer is 2xx."""
        pool = self._connection()
        headers = {"Host": self._host_header, "Content-Type": "application/json",
                   "User-Agent": "fulfilment-callbacks/1", SIGNATURE_HEADER: signed,
                   RESULT_ID_HEADER: item.result_id, DELIVERY_HEADER: str(item.delivery)}
        try:
            answer = pool.urlopen("POST", self._path, body=item.body, headers=headers,
                                  redirect=False, retries=False, preload_content=False,
                                  assert_same_host=False)
        except urllib3.exceptions.NewConnectionError:  # refused (a ConnectTimeoutError too)
            raise _Failure("connection_error", endpoint=True) from None
        except urllib3.exceptions.TimeoutError:
            raise _Failure("timeout", endpoint=True) from None
        except urllib3.exceptions.HTTPError:
            raise _Failure("connection_error", endpoint=True) from None
        status = answer.status
        _finish(answer)
        if 200 <= status < 300:
            return
        trouble = status >= 500 or status in ENDPOINT_TROUBLE
        raise _Failure(f"http_{status}", endpoint=trouble)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()


def _finish(answer: Any) -> None:
    """Read a short answer and keep the connection; close it on a long or endless one."""
    try:
        length = int(answer.headers.get("Content-Length", "-1"))
    except ValueError:
        length = -1
    try:
        if 0 <= length <= ANSWER_LIMIT:
            answer.read()
            answer.release_conn()
        else:
            answer.close()
    except urllib3.exceptions.HTTPError:
        answer.close()


def _shown(url: str) -> str:
    """A callback URL as logged: scheme, host and port only (a path may carry a token)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"


# --- what the collector and `fulfilment health` read ----------------------------------------
@dataclass(frozen=True)
class Backlog:
    pending: int
    oldest_age: float
    failing: dict[str, dict[str, Any]]


def backlog(client: redis.Redis, keys: Keys, now: float) -> Backlog:
    """Callbacks waiting, the oldest's age (since its outcome was published), and the
    endpoints now held for failing: three O(1)/O(endpoints) reads in one round trip."""
    k = CallbackKeys.of(keys)
    pipe = client.pipeline(transaction=False)
    pipe.zcard(k.due)
    pipe.zrange(k.since, 0, 0, withscores=True)
    pipe.hgetall(k.hold)
    pending, oldest, holds = pipe.execute()
    age = max(now - float(oldest[0][1]), 0.0) if oldest else 0.0
    failing = {_shown(text(url)): json.loads(value) for url, value in holds.items()}
    return Backlog(int(pending), age, failing)


__all__ = ["AllowList", "Backlog", "CallbackOutbox", "CallbackRefused", "CallbackSender",
           "SenderConfig", "backlog", "backoff", "signature", "url_for", "verify"]
