"""Does the ledger's Redis keep what it acknowledged, through a host crash?

"Recorded" means durable: a write Redis answered but had not yet fsynced can
vanish with the host (power cut, kernel panic), and with it a "confirm sent"
mark or an admission a producer was told about. Redis answers a write only
after fsyncing it with the append-only file on and ``appendfsync always``;
that is what workers and producers demand at start-up (measured cost: see
docs/benchmarks.md). ``FULFILMENT_REQUIRE_DURABLE_REDIS=false`` waives the check, with a
warning every time.
"""

from __future__ import annotations

import logging

import redis

from fulfilment.config import Settings, mask_url
from fulfilment.errors import ConfigError
from fulfilment.redis_text import text

log = logging.getLogger(__name__)

#: What ``CONFIG GET`` must answer, and why.
REQUIRED = {"appendonly": "yes", "appendfsync": "always"}


def missing(client: redis.Redis) -> list[str]:
    """What this Redis lacks to fsync every write before answering it ([] when nothing)."""
    found = {text(k): text(v) for k, v in client.config_get("append*").items()}
    return [f"{name} is {found.get(name, 'unset')!r}, needs {wanted!r}"
            for name, wanted in REQUIRED.items() if found.get(name) != wanted]


def require_durable(settings: Settings, client: redis.Redis) -> None:
    """Raise ``ConfigError`` (one line) unless Redis is durable or the check is waived."""
    where = mask_url(settings.redis_url)
    if not settings.require_durable_redis:
        log.warning("FULFILMENT_REQUIRE_DURABLE_REDIS=false: not checking that %s fsyncs "
                    "every write; a host crash may then lose recorded work and buy twice",
                    where)
        return
    try:
        lacking = missing(client)
    except redis.ResponseError as exc:
        raise ConfigError(f"cannot check that Redis at {where} is durable (CONFIG GET refused: "
                          f"{type(exc).__name__}); make sure it runs appendonly yes and "
                          f"appendfsync always, then set FULFILMENT_REQUIRE_DURABLE_REDIS=false"
                          ) from None
    except redis.RedisError as exc:
        raise ConfigError(f"cannot reach Redis at {where} to check it is durable: "
                          f"{type(exc).__name__}") from None
    if lacking:
        raise ConfigError(f"Redis at {where} does not fsync every write: "
                          f"{'; '.join(lacking)} (run redis-server --appendonly yes "
                          f"--appendfsync always, or set FULFILMENT_REQUIRE_DURABLE_REDIS=false "
                          f"to accept losing work in a host crash)")
