"""A shop's callback endpoint for tests and benchmarks: records every POST, can go down.

A thread of the test process on a loopback port. ``down("503")`` answers 503;
``down("closed")`` stops listening (connections are refused) and ``up()``
listens again on the same port. It checks nothing itself: the tests verify
the signatures with ``fulfilment.callbacks.verify``, as a shop would.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class CallbackEndpoint:
    def __init__(self) -> None:
        self.received: list[Received] = []
        self.refused = 0
        #: Connections accepted, whatever came on them (a TLS handshake too).
        self.connections = 0
        self.mode = "up"
        #: When set: the status to answer a body with (while up).
        self.status_for: Callable[[bytes], int] | None = None
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self._listen()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/outcomes"

    def _listen(self) -> None:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            disable_nagle_algorithm = True
            protocol_version = "HTTP/1.1"

            def handle(self) -> None:
                with endpoint._lock:
                    endpoint.connections += 1
                super().handle()

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                with endpoint._lock:
                    if endpoint.mode == "closed":  # a keep-alive connection from before
                        self.close_connection = True
                        return
                    status = 503 if endpoint.mode == "503" else \
                        endpoint.status_for(body) if endpoint.status_for else 200
                    if status == 200:
                        endpoint.received.append(Received(self.path, dict(self.headers), body))
                    else:
                        endpoint.refused += 1
                self.wfile.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode())

            def log_message(self, *_: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def down(self, how: str = "closed") -> None:
        """``503``: answer 503 to everything; ``closed``: refuse connections."""
        with self._lock:
            was_closed, self.mode = self.mode == "closed", how
        if how == "closed":
            self._close()
        elif was_closed:
            self._listen()

    def up(self) -> None:
        with self._lock:
            closed, self.mode = self.mode == "closed", "up"
        if closed:
            self._listen()

    def _close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def bodies(self) -> list[bytes]:
        with self._lock:
            return [r.body for r in self.received]

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.received)


@contextmanager
def callback_endpoint() -> Iterator[CallbackEndpoint]:
    endpoint = CallbackEndpoint()
    try:
        yield endpoint
    finally:
        endpoint._close()
