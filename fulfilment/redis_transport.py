"""kombu's Redis transport, made to survive Redis going away with tasks in flight.

With late acknowledgement, kombu 5.7 crashes a Celery worker on a Redis
restart ("Unrecoverable error: AttributeError ... 'hostname'"): when the
connection is lost, closing the task channel fails in its pending BRPOP
read, ``Connection.collect()`` then drops the transport's client, and the
channel's second close tries to put the unacknowledged messages back on their
queue, which needs a new Redis pool built from that client, now None.

The same path (a channel closed after its connection was collected reads
``conninfo.hostname`` of None) is kombu's https://github.com/celery/kombu/issues/582,
closed without a fix for it; kombu 5.7.0 still has it. Drop ``Channel.close``
below once kombu skips the restore itself, and widen ``pyproject.toml``'s
kombu pin (``>=5.7,<5.8``: the minor CI tests) only with a CI run on the new one.

Our channel skips that restore once its transport has been collected. Nothing
is lost: the messages stay in Redis's unacked hash, and any worker restores
them after the visibility timeout. Running them again is harmless (the
ledger and the per-intent lease make a purchase happen once), and the
recovery sweep resumes a stalled intent sooner.

It also keeps one Redis client per channel: kombu builds a new one (a dict of
some two hundred response callbacks) for every publish and every
acknowledgement, measured at a tenth of a worker's CPU per order. A client
holds no connection of its own (it borrows from the channel's pool per
command), so sharing it between threads is safe.
"""

from __future__ import annotations

import ssl
from typing import Any

from kombu.transport import redis as kombu_redis

from fulfilment.broker_envelopes import SafeEnvelopes

#: What ``broker_transport`` (Celery) or ``Connection(transport=...)`` names.
TRANSPORT = "fulfilment.redis_transport:Transport"


class Channel(SafeEnvelopes, kombu_redis.Channel):
    """Also: an item on a queue that is not a message is delivered as a stand-in that
    says so, rather than stopping the worker (``fulfilment.broker_envelopes``)."""

    def close(self) -> None:
        if getattr(self.connection, "client", None) is None:
            # Collected after a lost connection: there is no Redis to restore to.
            self.do_restore = False
        super().close()

    def _create_client(self, asynchronous: bool = False) -> Any:
        create = kombu_redis.Channel._create_client  # type: ignore[attr-defined]
        if asynchronous:
            return create(self, asynchronous=True)
        client = self.__dict__.get("_shared_client")
        if client is None or client.connection_pool is not self.pool:
            client = self.__dict__["_shared_client"] = create(self)
        return client


class Transport(kombu_redis.Transport):
    Channel = Channel


#: The schemes of a Redis broker: plain, and over TLS (the same kombu transport underneath).
REDIS_SCHEMES = ("redis://", "rediss://")


def transport_for(url: str) -> str | None:
    """Our transport for a Redis broker URL (``rediss://`` too); None lets kombu pick by
    the scheme."""
    return TRANSPORT if url.startswith(REDIS_SCHEMES) else None


def ssl_for(url: str) -> dict[str, Any] | bool:
    """TLS for a ``rediss://`` broker, its certificate verified (False: no TLS).

    kombu turns TLS on from the scheme only when it picks the transport itself:
    once ``transport_for`` names ours, it must be asked for (Celery's
    ``broker_use_ssl``, ``Connection(ssl=...)``), or the connection would be
    plain TCP. kombu's own default for ``rediss://`` skips verification (with a
    warning); we verify, as the ledger's redis-py client does (system CAs, or
    ``SSL_CERT_FILE``; the host name checked)."""
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED} if url.startswith("rediss://") else False
