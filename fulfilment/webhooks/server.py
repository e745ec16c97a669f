"""Serve the receiver with waitress, a production WSGI server in pure Python.

waitress (not ``http.server``) because this faces Onebox in production: it
buffers each request whole before the app sees it (a slow client holds no
worker thread), bounds request bodies and headers, times out idle
connections and serves requests from a pool of threads. The app answers
in a few milliseconds (one Redis read, one broker publish, one Redis write).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

import redis
from waitress.server import TcpWSGIServer, create_server

from fulfilment.config import Settings, split_host_port
from fulfilment.keys import Keys
from fulfilment.webhooks.dedupe import Dedupe
from fulfilment.webhooks.receiver import MAX_BODY, HandOver, WebhookReceiver

if TYPE_CHECKING:
    from wsgiref.types import WSGIApplication

log = logging.getLogger(__name__)

#: Request threads: each request is a few milliseconds, mostly waiting on Redis and the broker.
THREADS = 8
#: Seconds an idle connection is kept open.
CHANNEL_TIMEOUT = 30


def build_receiver(settings: Settings, client: redis.Redis, hand_over: HandOver,
                   clock: Callable[[], float]) -> WebhookReceiver:
    """The receiver for these settings: signature scheme, secret, dedupe under the prefix."""
    return WebhookReceiver(
        scheme=settings.webhook_signature, secret=settings.webhook_secret,
        dedupe=Dedupe(client, Keys(settings.key_prefix), settings.ledger_retention),
        hand_over=hand_over, clock=clock)


class Server:
    """A listening waitress server; ``port`` is the one bound (useful with port 0)."""

    def __init__(self, app: WSGIApplication, host: str, port: int, *,
                 threads: int = THREADS) -> None:
        server = create_server(
            app, host=host, port=port, threads=threads, ident="fulfilment-webhooks",
            max_request_body_size=MAX_BODY, channel_timeout=CHANNEL_TIMEOUT,
            clear_untrusted_proxy_headers=True)
        if not isinstance(server, TcpWSGIServer):  # one host and port: one TCP socket
            server.close()
            raise RuntimeError(f"expected one listening socket on {host}:{port}")
        self._server = server
        bound_host, bound_port = server.getsockname()
        self.host, self.port = str(bound_host), int(bound_port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def serve(self) -> None:
        """Serve until ``close`` (or SIGTERM / SIGINT with ``serve_until_signalled``)."""
        self._server.run()

    def close(self) -> None:
        self._server.close()


def serve_until_signalled(server: Server, ready: Callable[[str], None] | None = None) -> None:
    """Serve in this (main) thread until SIGTERM or SIGINT; ``ready(url)`` once listening."""
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not stopping.is_set():
            stopping.set()
            raise SystemExit(0)  # waitress's loop ends on it and shuts its threads down

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if ready is not None:
            ready(server.url)
        server.serve()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        server.close()
        log.info("webhooks receiver stopped")


def listen(settings: Settings) -> tuple[str, int]:
    """Where ``FULFILMENT_WEBHOOKS_ADDRESS`` says to listen."""
    return split_host_port(settings.webhooks_address)
