"""A broker outage for the processes of one test: a TCP proxy that can be cut.

The machine's RabbitMQ (and Redis) serve every test running at once, so a
test cannot stop them. Its workers reach the broker through this proxy
instead; ``cut()`` closes every connection through it and stops listening
(a new connection is refused, as with a broker that is down), ``restore()``
listens again on the same port. To the processes that is a broker killed
and, later, started again.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from urllib.parse import urlsplit, urlunsplit


class BrokerProxy:
    """Forwards 127.0.0.1:``port`` to ``target``; ``cut()`` and ``restore()`` it."""

    def __init__(self, target_url: str) -> None:
        parts = urlsplit(target_url)
        self._target = (parts.hostname or "127.0.0.1", int(parts.port or 5672))
        self._parts = parts
        self._lock = threading.Lock()
        self._pairs: dict[socket.socket, socket.socket] = {}
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._listener: socket.socket | None = None
        self.port = 0
        self._listen()
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="broker-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """``target_url`` with this proxy's address in it (credentials and path kept)."""
        auth = self._parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@127.0.0.1:{self.port}" if auth else f"127.0.0.1:{self.port}"
        return urlunsplit(self._parts._replace(netloc=netloc))

    def cut(self) -> None:
        """Refuse new connections and close every open one."""
        with self._lock:
            if self._listener is not None:
                self._selector.unregister(self._listener)
                self._listener.close()
                self._listener = None
            for sock in list(self._pairs):
                self._drop(sock)
        self._wake()

    def restore(self) -> None:
        """Listen again, on the same port."""
        with self._lock:
            if self._listener is None:
                self._listen()
        self._wake()

    def close(self) -> None:
        self._running = False
        self.cut()
        self._thread.join(timeout=5)
        self._wake_r.close()
        self._wake_w.close()

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.setblocking(False)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._selector.register(listener, selectors.EVENT_READ)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _drop(self, sock: socket.socket) -> None:
        peer = self._pairs.pop(sock, None)
        for one in (sock, peer):
            if one is None:
                continue
            self._pairs.pop(one, None)
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(one)
            with contextlib.suppress(OSError):
                one.shutdown(socket.SHUT_RDWR)
            one.close()

    def _loop(self) -> None:
        while self._running:
            for key, _ in self._selector.select(timeout=0.5):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                with self._lock:
                    if sock is self._wake_r:
                        with contextlib.suppress(OSError):
                            sock.recv(4096)
                    elif sock is self._listener:
                        self._accept(sock)
                    elif sock in self._pairs:
                        self._pump(sock)

    def _accept(self, listener: socket.socket) -> None:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        try:
            upstream = socket.create_connection(self._target, timeout=5)
        except OSError:
            client.close()
            return
        for one in (client, upstream):
            one.setblocking(True)
            one.settimeout(5)
            one.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._pairs[client], self._pairs[upstream] = upstream, client
        self._selector.register(client, selectors.EVENT_READ)
        self._selector.register(upstream, selectors.EVENT_READ)

    def _pump(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
            if data:
                self._pairs[sock].sendall(data)
                return
        except OSError:
            pass
        self._drop(sock)
