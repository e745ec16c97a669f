"""Every setting, read from the environment in one place into one frozen object.

``SETTINGS`` below is the single list of knobs: name, type, default and what it
is for. ``Settings.from_env()`` reads them, validates them and fails with one
clear line; the settings table of docs/settings.md is generated from the same list
(``fulfilment settings --markdown``) and a test keeps the two in step.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fulfilment import redact
from fulfilment.errors import ConfigError


@dataclass(frozen=True)
class Setting:
    """One environment variable: where it lands and how it is parsed."""

    env: str
    attr: str
    default: str
    help: str
    parse: Callable[[str], Any] = str
    #: Never shown: not in ``fulfilment settings``, not in an error.
    secret: bool = False
    #: May be read from the file ``<env>_FILE`` names instead (secrets, URLs with passwords),
    #: so that it need not sit in the environment of every process that could dump it.
    from_file: bool = False


def _positive_float(raw: str) -> float:
    value = float(raw)
    if value <= 0:
        raise ValueError("must be > 0")
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be > 0")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number, 0 to 65535 (0: off)")
    return value


def _url(raw: str) -> str:
    parts = urlsplit(raw)
    if not parts.scheme or not parts.netloc:
        raise ValueError("must be an absolute URL")
    _numeric_port(raw)
    return raw.rstrip("/")


def _numeric_port(raw: str) -> None:
    """redis-py's and kombu's error for a bad port quotes it: the start of a password."""
    for url in raw.split(";"):
        try:
            urlsplit(url).port  # noqa: B018 - read for its check
        except ValueError:
            raise ValueError("its port is not a number (a / ? or # in a password must be "
                             "percent-encoded: %2F %3F %23)") from None


def _optional_url(raw: str) -> str:
    return _url(raw) if raw else ""


def _http_url(raw: str) -> str:
    """Onebox's host: http(s) only (whether plain http is allowed is checked in ``validate``)."""
    if urlsplit(raw).scheme not in {"http", "https"}:
        raise ValueError("must be an https:// URL (or http:// to a local sandbox)")
    return _url(raw)


def _optional_http_url(raw: str) -> str:
    return _http_url(raw) if raw else ""


def _required(raw: str) -> str:
    if not raw.strip():
        raise ValueError("must not be empty")
    return raw


def _optional_path(raw: str) -> str:
    """A CA bundle (a file, or a directory made with c_rehash) that must exist now."""
    if raw and not Path(raw).exists():
        raise ValueError("no such file or directory")
    return raw


def _host_list(raw: str) -> str:
    """Comma-separated host names, normalised (kept as text, so it survives the env)."""
    return ",".join(sorted({h.strip().lower() for h in raw.split(",") if h.strip()}))


def _shop_urls(raw: str) -> str:
    """``shop=url,shop2=url2``: each shop a reference-like name, each URL http(s)."""
    pairs: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        shop, sep, url = part.partition("=")
        shop = shop.strip()
        if not sep or not re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", shop):
            raise ValueError("must be shop=url pairs separated by commas (a shop: 1-64 of "
                             "A-Za-z0-9._:-)")
        if shop in pairs:
            raise ValueError(f"shop {shop!r} is named twice")
        pairs[shop] = _http_url(url.strip())
    return ",".join(f"{shop}={url}" for shop, url in pairs.items())


def _allow_list(raw: str) -> str:
    """Host names, IP addresses and networks, normalised (kept as text)."""
    entries = set()
    for entry in filter(None, (e.strip().lower() for e in raw.split(","))):
        if "/" not in entry:
            entries.add(entry.strip("[]"))
            continue
        try:
            entries.add(str(ipaddress.ip_network(entry, strict=False)))
        except ValueError:
            raise ValueError(f"{entry!r} is not a network such as 10.1.0.0/16") from None
    return ",".join(sorted(entries))


#: What redis-py connects to: TCP, TLS, a Unix socket.
REDIS_SCHEMES = ("redis", "rediss", "unix")
#: The brokers this project is tested with (Redis, RabbitMQ), and the embedded demo's.
BROKER_SCHEMES = ("redis", "rediss", "amqp", "amqps", "pyamqp", "memory")


def _redis_url(raw: str) -> str:
    """The ledger's Redis: a scheme redis-py knows, checked now rather than at first use."""
    parts = urlsplit(raw)
    if parts.scheme not in REDIS_SCHEMES:
        raise ValueError("must be a redis://, rediss:// or unix:// URL, such as "
                         "redis://127.0.0.1:6379/0")
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("must name the socket, such as unix:///run/redis.sock")
        return raw
    return _url(raw)


def _broker_url(raw: str) -> str:
    """A broker URL; ``memory://`` (the embedded demo's) has no host."""
    if raw and urlsplit(raw).scheme not in BROKER_SCHEMES:
        raise ValueError("must be a redis://, rediss://, amqp:// or amqps:// URL, such as "
                         "redis://host:6379/0 or amqp://host (empty: FULFILMENT_REDIS_URL)")
    _numeric_port(raw)
    return raw


_HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def _listen_address(raw: str) -> str:
    """An IP address or a host name to listen on: no scheme, no port (that is a setting)."""
    value = raw.strip()
    try:
        ipaddress.ip_address(value.strip("[]"))
        return value.strip("[]")
    except ValueError:
        pass
    if not _HOST_NAME.fullmatch(value):
        raise ValueError("must be an IP address or a host name, such as 0.0.0.0 or 127.0.0.1 "
                         "(no scheme; the port is FULFILMENT_METRICS_PORT)")
    return value


def _log_format(raw: str) -> str:
    value = raw.strip().lower()
    if value not in {"text", "json"}:
        raise ValueError("must be text or json")
    return value


def _traces(raw: str) -> str:
    value = raw.strip().lower()
    if value not in {"none", "otlp", "console"}:
        raise ValueError("must be none, otlp or console")
    return value


#: How ``ob-signature`` is checked (``fulfilment.webhooks.signature``): Onebox does not say.
WEBHOOK_SIGNATURES = ("hmac-sha256", "hmac-sha256-base64", "none")


def _webhook_signature(raw: str) -> str:
    value = raw.strip().lower()
    if value not in WEBHOOK_SIGNATURES:
        raise ValueError(f"must be one of {', '.join(WEBHOOK_SIGNATURES)}")
    return value


def _host_port(raw: str) -> str:
    """``HOST:PORT`` to listen on (``[::1]:9660`` for IPv6); the port may be 0 (any free)."""
    host, sep, port = raw.strip().rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError("must be HOST:PORT, such as 0.0.0.0:9660 or 127.0.0.1:9660")
    _port(port)
    listen = _listen_address(host)
    return f"[{listen}]:{int(port)}" if ":" in listen else f"{listen}:{int(port)}"


def split_host_port(value: str) -> tuple[str, int]:
    """``FULFILMENT_WEBHOOKS_ADDRESS`` as (host, port); IPv6 brackets dropped."""
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def _bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("must be true or false")


#: The sandbox's API key, ``ONEBOX_API_KEY``'s default: refused with an https:// Onebox.
SANDBOX_API_KEY = "sandbox-api-key"

SETTINGS: tuple[Setting, ...] = (
    # --- Onebox ---------------------------------------------------------------
    Setting("ONEBOX_API_URL", "onebox_api_url", "http://127.0.0.1:8650",
            "Onebox host the distribution API is called on (production: "
            "`https://api.oneboxtds.com`). The default is a local sandbox, whose port "
            "`fulfilment sandbox` takes from here. Plain `http://` only to this machine "
            "or to a host in `ONEBOX_PLAIN_HTTP_HOSTS`.", _http_url),
    Setting("ONEBOX_AUTH_URL", "onebox_auth_url", "",
            "Host of `/oauth/token`; empty means the API host (the token must come "
            "from the same domain as the API).", _optional_http_url),
    Setting("ONEBOX_CHANNEL_ID", "onebox_channel_id", "sandbox-channel",
            "Sales channel id sent with the client-credentials grant.", _required),
    Setting("ONEBOX_API_KEY", "onebox_api_key", SANDBOX_API_KEY,
            "The channel's API key (the OAuth client secret); must not be empty. Secret: "
            "never logged or shown. Or `ONEBOX_API_KEY_FILE`: a file holding it.",
            _required, secret=True, from_file=True),
    Setting("ONEBOX_CA_BUNDLE", "onebox_ca_bundle", "",
            "CA certificates (a PEM file, or a directory) to verify Onebox's TLS certificate "
            "with; empty means the system's (requests' `REQUESTS_CA_BUNDLE` is not read). "
            "Verification is always on.", _optional_path),
    Setting("ONEBOX_PLAIN_HTTP_HOSTS", "onebox_plain_http_hosts", "",
            "Comma-separated hosts that Onebox URLs may reach over plain `http://` besides "
            "this machine (a sandbox on a private network, such as compose's `sandbox`); "
            "any other `http://` Onebox URL stops start-up.", _host_list),
    Setting("ONEBOX_CONNECT_TIMEOUT", "onebox_connect_timeout", "3.05",
            "Seconds to open a connection to Onebox.", _positive_float),
    Setting("ONEBOX_READ_TIMEOUT", "onebox_read_timeout", "15",
            "Seconds to wait for Onebox's answer; past it the outcome is unknown.",
            _positive_float),
    Setting("ONEBOX_TOKEN_RENEW_MARGIN", "onebox_token_renew_margin", "300",
            "Renew the access token this many seconds before it expires.",
            _non_negative_float),
    # --- Onebox: limits the whole fleet shares (fulfilment.onebox.guard) --------
    Setting("ONEBOX_RATE_LIMIT", "onebox_rate_limit", "0",
            "Calls per second to Onebox for all workers together, every call counted (the "
            "token's too), shared through Redis: a call waits for its turn. 0 means no "
            "limit, the default because Onebox publishes none: set the figure Onebox gives "
            "your channel.", _non_negative_float),
    Setting("ONEBOX_RATE_LIMIT_MAX_WAIT", "onebox_rate_limit_max_wait", "10",
            "Longest a call waits for its turn under `ONEBOX_RATE_LIMIT`; when its turn is "
            "further off, the step is retried then instead (`RATE_LIMITED`, not counted as "
            "a failure).", _positive_float),
    Setting("ONEBOX_BREAKER_FAILURES", "onebox_breaker_failures", "10",
            "Failed calls (5xx, timeouts, connection failures; not 4xx answers) within "
            "`ONEBOX_BREAKER_WINDOW`, if they are also at least half of the calls there, "
            "that open the circuit breaker for the whole fleet. 0 turns the breaker off.",
            _non_negative_int),
    Setting("ONEBOX_BREAKER_WINDOW", "onebox_breaker_window", "10",
            "Seconds over which the circuit breaker counts calls and failures.",
            _positive_float),
    Setting("ONEBOX_BREAKER_COOLDOWN", "onebox_breaker_cooldown", "15",
            "Seconds an open breaker holds every call back (`CIRCUIT_OPEN`: retried after "
            "it, not counted as a failure); then one probe call goes through: success "
            "closes the breaker, failure opens it again.", _positive_float),
    # --- Redis and the broker -------------------------------------------------
    Setting("FULFILMENT_REDIS_URL", "redis_url", "redis://127.0.0.1:6379/0",
            "Redis for the ledger and the shared token cache; `rediss://` for TLS, "
            "`redis://:PASSWORD@host:6379/0` with a password (masked wherever shown). Or "
            "`FULFILMENT_REDIS_URL_FILE`: a file holding it.", _redis_url, from_file=True),
    Setting("FULFILMENT_BROKER_URL", "broker_url", "",
            "Celery broker (and results queue); empty means `FULFILMENT_REDIS_URL`. Or "
            "`FULFILMENT_BROKER_URL_FILE`: a file holding it.", _broker_url, from_file=True),
    Setting("FULFILMENT_REQUIRE_DURABLE_REDIS", "require_durable_redis", "true",
            "Refuse to start unless Redis fsyncs every write before answering "
            "(`appendonly yes`, `appendfsync always`): what a host crash can take back "
            "was never recorded. `false` waives the check (a warning at every start).",
            _bool),
    Setting("FULFILMENT_KEY_PREFIX", "key_prefix", "fulfilment",
            "Prefix of every Redis key and queue name this project owns; one "
            "deployment (or one test run) per prefix."),
    # --- Contracts -----------------------------------------------------------
    Setting("FULFILMENT_MAX_QUANTITY", "max_quantity", "50",
            "Largest `quantity` an automatic-seats item may ask for.", _positive_int),
    # --- Retries -------------------------------------------------------------
    Setting("FULFILMENT_RETRY_MAX_ATTEMPTS", "retry_max_attempts", "10",
            "Attempts of one step before the purchase fails.", _positive_int),
    Setting("FULFILMENT_RETRY_BASE_DELAY", "retry_base_delay", "0.5",
            "First retry's backoff in seconds; it doubles each attempt (full jitter).",
            _non_negative_float),
    Setting("FULFILMENT_RETRY_MAX_DELAY", "retry_max_delay", "60",
            "Longest backoff between two attempts, in seconds.", _non_negative_float),
    Setting("FULFILMENT_RETRY_DEADLINE", "retry_deadline", "900",
            "Seconds after submission past which no retry is started: the purchase fails.",
            _positive_float),
    # --- Ledger and queues ----------------------------------------------------
    Setting("FULFILMENT_LEDGER_RETENTION", "ledger_retention", "604800",
            "Seconds a ledger entry (and so duplicate detection) is kept; default 7 days.",
            _positive_int),
    Setting("FULFILMENT_STUCK_AFTER", "stuck_after", "300",
            "Seconds without progress after which the recovery sweep resumes an intent.",
            _positive_float),
    Setting("FULFILMENT_LEASE_TTL", "lease_ttl", "15",
            "Seconds a worker's hold on an intent lasts unless renewed (it is renewed "
            "while the work runs): how long an intent waits after its worker is killed.",
            _positive_float),
    Setting("FULFILMENT_SESSION_CAP", "session_cap", "0",
            "Purchases in flight at once for one Onebox session (an event's `session_id`), "
            "fleet-wide; 0 means no cap. An intent takes a slot in every session it touches "
            "before its basket is created and gives them back with its outcome; one that "
            "finds a session full waits in line (`SESSION_CAP`, not counted as a failure, "
            "bounded by `FULFILMENT_RETRY_DEADLINE`). A basket already open is never held "
            "back.", _non_negative_int),
    Setting("FULFILMENT_VISIBILITY_TIMEOUT", "visibility_timeout", "3600",
            "Redis broker: seconds before an unacknowledged task is redelivered (a worker "
            "died holding it). Must exceed the longest retry countdown plus the task time "
            "limit.", _positive_int),
    Setting("FULFILMENT_TASK_SOFT_TIME_LIMIT", "task_soft_time_limit", "120",
            "Seconds a task may run before it is asked to stop.", _positive_int),
    Setting("FULFILMENT_TASK_TIME_LIMIT", "task_time_limit", "150",
            "Seconds after which a task's process is killed; Celery then acknowledges "
            "it as failed and the recovery sweep resumes the intent from the ledger.",
            _positive_int),
    Setting("FULFILMENT_SWEEP_INTERVAL", "sweep_interval", "30",
            "Seconds between two recovery sweeps (celery beat).", _positive_float),
    Setting("FULFILMENT_INTAKE_INTERVAL", "intake_interval", "1",
            "Seconds between two drains of the Redis-list intake (celery beat).",
            _positive_float),
    Setting("FULFILMENT_SETTLE_FIRST", "settle_first", "60",
            "Seconds after an intent ends `unsettled` before its order is read again by "
            "itself (celery beat); the wait then doubles up to an hour between reads.",
            _positive_float),
    Setting("FULFILMENT_SETTLE_FOR", "settle_for", "259200",
            "Seconds an `unsettled` intent is read again on that schedule; default 72 h. "
            "Past it the intent stays `unsettled`, listed by `fulfilment unsettled`, until "
            "`fulfilment settle` (and `fulfilment health` says so).", _positive_float),
    Setting("FULFILMENT_BULK_IN_FLIGHT", "bulk_in_flight", "64",
            "Bulk intents released to the broker and not yet finished, fleet-wide, at most; "
            "the rest wait in Redis, shared fairly between shops (fulfilment.release). "
            "About twice the fleet's worker slots keeps them busy.", _positive_int),
    Setting("FULFILMENT_RELEASE_INTERVAL", "release_interval", "1",
            "Seconds between two releases of waiting bulk intents by celery beat (a safety "
            "net: producers and workers release as they admit and finish).", _positive_float),
    # --- Outcomes POSTed to the shop (fulfilment.callbacks) --------------------------
    Setting("FULFILMENT_CALLBACK_URL", "callback_url", "",
            "URL every outcome is POSTed to (signed JSON, `docs/results.md`), for shops "
            "without one of their own in `FULFILMENT_CALLBACK_URLS`; empty: none. `https://` "
            "only, unless its host is in `FULFILMENT_CALLBACK_ALLOW`.", _optional_http_url),
    Setting("FULFILMENT_CALLBACK_URLS", "callback_urls", "",
            "Per-shop callback URLs, `shop=url,shop2=url2`: a shop's outcomes go to its "
            "own URL instead of `FULFILMENT_CALLBACK_URL`.", _shop_urls),
    Setting("FULFILMENT_CALLBACK_SECRET", "callback_secret", "",
            "Shared secret the callbacks are signed with (HMAC-SHA256, at least 16 "
            "characters); required when a callback URL is set. Secret: never logged or "
            "shown. Or `FULFILMENT_CALLBACK_SECRET_FILE`: a file holding it.",
            str, secret=True, from_file=True),
    Setting("FULFILMENT_CALLBACK_FOR", "callback_for", "86400",
            "Seconds a callback is retried after its outcome was published; past them it is "
            "dropped with a warning (`fulfilment_callbacks_dropped`). The outcome is still "
            "on the results queue.", _positive_float),
    Setting("FULFILMENT_CALLBACK_ALLOW", "callback_allow", "",
            "Comma-separated hosts (names, addresses or networks such as `10.1.0.0/16`) "
            "a callback may reach over plain `http://` or at a private, loopback or "
            "link-local address; any other such callback is refused (no request forgery "
            "through a callback URL).", _allow_list),
    Setting("FULFILMENT_CALLBACK_TIMEOUT", "callback_timeout", "5",
            "Seconds one callback POST may take, connection included; slower counts as a "
            "failure of the endpoint.", _positive_float),
    Setting("FULFILMENT_CALLBACK_MAX_DELAY", "callback_max_delay", "60",
            "Longest wait between two tries of a failing callback endpoint, in seconds (from "
            "1 s, doubling): once the endpoint is back, its backlog goes out within this.",
            _positive_float),
    Setting("FULFILMENT_CALLBACK_INTERVAL", "callback_interval", "1",
            "Seconds between two runs of the callback sender (celery beat), when a callback "
            "URL is set.", _positive_float),
    # --- Metrics (tasks.metrics) ---------------------------------------------------
    Setting("FULFILMENT_METRICS_PORT", "metrics_port", "9650",
            "Port each worker serves Prometheus metrics on (`/metrics`, summed over its pool "
            "processes); 0 turns it off. Workers sharing a host need a port each.", _port),
    # Prometheus scrapes from another machine; the metrics hold no secret or personal data.
    Setting("FULFILMENT_METRICS_ADDRESS", "metrics_address", "0.0.0.0",  # noqa: S104
            "Address the metrics port listens on (`127.0.0.1`: this machine only).",
            _listen_address),
    # --- Onebox's webhooks (fulfilment.webhooks, `fulfilment webhooks`) -----------
    # Onebox calls in from outside: the receiver sits behind the TLS proxy that faces it.
    Setting("FULFILMENT_WEBHOOKS_ADDRESS", "webhooks_address", "0.0.0.0:9660",
            "`HOST:PORT` the `fulfilment webhooks` receiver listens on (plain HTTP: put a "
            "TLS-terminating proxy in front of it for Onebox). `127.0.0.1:9660`: this "
            "machine only.", _host_port),
    Setting("FULFILMENT_WEBHOOK_SECRET", "webhook_secret", "",
            "The secret Onebox's webhooks are signed with (`ob-signature`); required by "
            "`fulfilment webhooks` unless `FULFILMENT_WEBHOOK_SIGNATURE` is `none`. Secret: "
            "never logged or shown. Or `FULFILMENT_WEBHOOK_SECRET_FILE`: a file holding it.",
            secret=True, from_file=True),
    Setting("FULFILMENT_WEBHOOK_SIGNATURE", "webhook_signature", "hmac-sha256",
            "How `ob-signature` is checked (Onebox does not publish it): `hmac-sha256` (hex "
            "HMAC-SHA256 of the raw body with the secret, an optional `sha256=` prefix "
            "accepted), `hmac-sha256-base64` (the same digest in base64) or `none` (no check: "
            "refused unless `ONEBOX_API_URL` is a plain-http sandbox).", _webhook_signature),
    # --- Logs ------------------------------------------------------------------
    Setting("FULFILMENT_LOG_FORMAT", "log_format", "text",
            "`text`: one line per event with reference, order id, step, attempt and Onebox "
            "trace id in brackets; `json`: one JSON object per line with the same fields.",
            _log_format),
    # --- Traces (fulfilment.tracing) --------------------------------------------
    Setting("FULFILMENT_TRACES", "traces", "none",
            "OpenTelemetry traces, one per intent (needs the `trace` extra): `none`, `otlp` "
            "(to `OTEL_EXPORTER_OTLP_ENDPOINT`, OpenTelemetry's own variables apply) or "
            "`console` (spans on standard error).", _traces),
)


@dataclass(frozen=True)
class Settings:
    """The whole configuration; build with ``from_env`` or ``replace``."""

    onebox_api_url: str
    onebox_auth_url: str
    onebox_channel_id: str
    onebox_api_key: str = field(repr=False)
    onebox_ca_bundle: str
    onebox_plain_http_hosts: str
    onebox_connect_timeout: float
    onebox_read_timeout: float
    onebox_token_renew_margin: float
    onebox_rate_limit: float
    onebox_rate_limit_max_wait: float
    onebox_breaker_failures: int
    onebox_breaker_window: float
    onebox_breaker_cooldown: float
    redis_url: str
    broker_url: str
    require_durable_redis: bool
    key_prefix: str
    max_quantity: int
    retry_max_attempts: int
    retry_base_delay: float
    retry_max_delay: float
    retry_deadline: float
    ledger_retention: int
    stuck_after: float
    lease_ttl: float
    session_cap: int
    visibility_timeout: int
    task_soft_time_limit: int
    task_time_limit: int
    sweep_interval: float
    intake_interval: float
    settle_first: float
    settle_for: float
    bulk_in_flight: int
    release_interval: float
    callback_url: str
    callback_urls: str
    callback_secret: str = field(repr=False)
    callback_for: float
    callback_allow: str
    callback_timeout: float
    callback_max_delay: float
    callback_interval: float
    metrics_port: int
    metrics_address: str
    webhooks_address: str
    webhook_secret: str = field(repr=False)
    webhook_signature: str
    log_format: str
    traces: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every setting; raise ``ConfigError`` naming the bad one."""
        source = os.environ if env is None else env
        values = {s.attr: _parse(s, _raw(s, source)[0]) for s in SETTINGS}
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Cross-field rules; raise ``ConfigError`` naming the settings involved."""
        if self.visibility_timeout <= self.retry_max_delay + self.task_time_limit:
            raise ConfigError("FULFILMENT_VISIBILITY_TIMEOUT must exceed "
                              "FULFILMENT_RETRY_MAX_DELAY plus FULFILMENT_TASK_TIME_LIMIT, "
                              "or a task waiting out its retry is redelivered to another worker")
        if self.task_time_limit <= self.task_soft_time_limit:
            raise ConfigError("FULFILMENT_TASK_TIME_LIMIT must exceed "
                              "FULFILMENT_TASK_SOFT_TIME_LIMIT")
        call = self.onebox_connect_timeout + self.onebox_read_timeout
        if self.onebox_rate_limit and self.onebox_rate_limit_max_wait + call >= \
                self.task_soft_time_limit:
            raise ConfigError("ONEBOX_RATE_LIMIT_MAX_WAIT plus a whole call "
                              "(ONEBOX_CONNECT_TIMEOUT + ONEBOX_READ_TIMEOUT) must fit in "
                              "FULFILMENT_TASK_SOFT_TIME_LIMIT")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.key_prefix):
            raise ConfigError("FULFILMENT_KEY_PREFIX must be 1-64 of A-Za-z0-9_.-")
        for env, url in (("ONEBOX_API_URL", self.onebox_api_url),
                         ("ONEBOX_AUTH_URL", self.onebox_auth_url)):
            host = urlsplit(url).hostname or ""
            if url.startswith("http://") and not is_loopback(host) \
                    and host not in self.plain_http_hosts:
                raise ConfigError(
                    f"{env}={mask_url(url)!r} is plain http:// to another machine: the API key and "
                    f"buyers' data would cross the network unencrypted; use https://, or add "
                    f"{host!r} to ONEBOX_PLAIN_HTTP_HOSTS if it is a sandbox on a private network")

        self._validate_sandbox_key()
        if self.webhook_signature == "none" and not self.onebox_api_url.startswith("http://"):
            raise ConfigError(
                "FULFILMENT_WEBHOOK_SIGNATURE=none accepts any webhook unsigned, and "
                f"ONEBOX_API_URL={self.onebox_api_url!r} is not a sandbox: set "
                "FULFILMENT_WEBHOOK_SIGNATURE to the scheme Onebox signs with")
        self._validate_callbacks()

    def _validate_callbacks(self) -> None:
        """A callback URL needs the secret it is signed with, and a public https:// host
        unless ``FULFILMENT_CALLBACK_ALLOW`` lists it (its addresses are checked again at
        every send: ``fulfilment.callbacks``)."""
        from fulfilment.callbacks import AllowList, CallbackRefused

        urls = self.callback_routes
        if not urls:
            return
        if len(self.callback_secret) < 16:
            raise ConfigError("FULFILMENT_CALLBACK_SECRET must be set (at least 16 characters) "
                              "when FULFILMENT_CALLBACK_URL or FULFILMENT_CALLBACK_URLS is: "
                              "every callback is signed with it")
        allow = AllowList.parse(self.callback_allow)
        for shop, url in urls.items():
            env = "FULFILMENT_CALLBACK_URL" if shop is None else \
                f"FULFILMENT_CALLBACK_URLS ({shop})"
            try:
                allow.check_url(url)
            except CallbackRefused as exc:
                raise ConfigError(f"{env}={mask_url(url)!r}: {exc}") from None

    @property
    def callback_routes(self) -> dict[str | None, str]:
        """Callback URL by shop; the key None: any other shop's (``FULFILMENT_CALLBACK_URL``)."""
        routes: dict[str | None, str] = {}
        if self.callback_url:
            routes[None] = self.callback_url
        for pair in filter(None, self.callback_urls.split(",")):
            shop, _, url = pair.partition("=")
            routes[shop] = url
        return routes

    def _validate_sandbox_key(self) -> None:
        """The sandbox's key is the default, for the sandbox only (always http://): with an
        https:// Onebox a key left unset would go to the real API."""
        if self.onebox_api_key != SANDBOX_API_KEY:
            return
        for env, url in (("ONEBOX_API_URL", self.onebox_api_url),
                         ("ONEBOX_AUTH_URL", self.onebox_auth_url)):
            if url.startswith("https://"):
                raise ConfigError(
                    f"ONEBOX_API_KEY is the sandbox's key (its default) but "
                    f"{env}={url!r} is not the sandbox: set ONEBOX_API_KEY or "
                    f"ONEBOX_API_KEY_FILE to your channel's key")

    @property
    def plain_http_hosts(self) -> frozenset[str]:
        return frozenset(filter(None, self.onebox_plain_http_hosts.split(",")))

    @property
    def tls_verify(self) -> bool | str:
        """What ``requests`` verifies Onebox's certificate with: never ``False``."""
        return self.onebox_ca_bundle or True

    def __repr__(self) -> str:
        shown = ", ".join(f"{s.attr}={self.shown(s)}" for s in SETTINGS if not s.secret)
        return f"Settings({shown})"

    def shown(self, setting: Setting) -> str:
        """A setting's value as it may be shown: secrets hidden, URL passwords masked."""
        if setting.secret:
            return "<secret>"
        return repr(mask_url(str(getattr(self, setting.attr))))

    @classmethod
    def defaults(cls) -> Settings:
        """The settings an empty environment gives (the local sandbox)."""
        return cls.from_env({})

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with some fields changed (tests, the demo)."""
        return replace(self, **changes)

    @property
    def token_url(self) -> str:
        return f"{self.onebox_auth_url or self.onebox_api_url}/oauth/token"

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or self.redis_url


def is_loopback(host: str) -> bool:
    """True for this machine's own addresses (``localhost``, 127.0.0.0/8, ::1)."""
    if host.lower() in {"localhost", "localhost.localdomain"}:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _raw(setting: Setting, source: Mapping[str, str]) -> tuple[str, str]:
    """The setting's text and where it came from ('' for the environment or default).

    A ``<env>_FILE`` variable names a file holding the value (one line; a
    trailing newline is dropped), as Docker and Kubernetes secrets are mounted.
    """
    file_env = f"{setting.env}_FILE"
    path = source.get(file_env, "") if setting.from_file else ""
    if not path:
        return source.get(setting.env, setting.default), ""
    if source.get(setting.env):
        raise ConfigError(f"{setting.env} and {file_env} are both set: set one of them")
    try:
        text = Path(path).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise ConfigError(f"{file_env}={path!r}: cannot read it: {reason}") from None
    value = text.removesuffix("\n").removesuffix("\r")
    if "\n" in value:
        raise ConfigError(f"{file_env}={path!r}: the file must hold one line")
    return value, f"{file_env}={path!r}"


def env_value(name: str, env: Mapping[str, str] | None = None) -> str:
    """One setting's text, unparsed: from the environment, its ``_FILE``, or the default.

    For a process that needs one value and none of the rest (the sandbox).
    """
    setting = next(s for s in SETTINGS if s.env == name)
    return _raw(setting, os.environ if env is None else env)[0]


def _shown_raw(setting: Setting, raw: str) -> str:
    return "<secret>" if setting.secret else repr(mask_url(raw))


def _parse(setting: Setting, raw: str) -> Any:
    try:
        return setting.parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{setting.env}={_shown_raw(setting, raw)}: {exc}") from None


def settings_report(env: Mapping[str, str] | None = None) -> tuple[list[str], list[str]]:
    """``fulfilment settings``: each setting as ``NAME = value`` (secrets hidden, URL
    passwords masked), a bad one marked with what is wrong, and the list of problems.

    It never raises, so the command that should help fix a bad setting still works.
    """
    source = os.environ if env is None else env
    lines: list[str] = []
    problems: list[str] = []
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        try:
            raw, origin = _raw(setting, source)
            shown = _shown_raw(setting, raw) + (f" (from {origin})" if origin else "")
        except ConfigError as exc:
            lines.append(f"{setting.env} = ?  <- {exc.message}")
            problems.append(exc.message)
            continue
        try:
            values[setting.attr] = setting.parse(raw)
        except ValueError as exc:
            lines.append(f"{setting.env} = {shown}  <- invalid: {exc}")
            problems.append(f"{setting.env}={_shown_raw(setting, raw)}: {exc}")
            continue
        lines.append(f"{setting.env} = {shown}")
    if not problems:
        try:
            Settings(**values).validate()
        except ConfigError as exc:
            problems.append(exc.message)
    return lines, problems


def mask_url(value: str) -> str:
    """A URL setting with its password, in any spelling a client accepts, shown as ``***``
    (``fulfilment.redact.mask_url``)."""
    return redact.mask_url(value)


def settings_table() -> str:
    """The settings table of docs/settings.md, in Markdown."""
    rows = ["| variable | default | what it is for |", "| --- | --- | --- |"]
    for setting in SETTINGS:
        default = f"`{setting.default}`" if setting.default else "(empty)"
        rows.append(f"| `{setting.env}` | {default} | {setting.help} |")
    return "\n".join(rows)


assert {s.attr for s in SETTINGS} == {f.name for f in fields(Settings)}, "SETTINGS differ"
