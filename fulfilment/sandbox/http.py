"""A small HTTP/1.1 server written directly on asyncio.

The standard library's ``http.server`` costs a thread and two sends per request;
this protocol parses requests straight from the socket buffer, answers each in
one ``transport.write`` with Nagle off, keeps connections alive and honours
pipelining, so one event loop serves thousands of requests a second.

A handler returns a ``Response`` right away (the fast path) or a coroutine when
it must wait (injected latency, slow answers). Responses stay in request order:
while a coroutine runs, later requests on that connection wait in the buffer.
A running coroutine is never cancelled because its client went away: a call the
server has started is finished, as on a real server. ``Response.drop`` closes
the connection without an answer (a response lost on the way back).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

log = logging.getLogger(__name__)

MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024
_REASONS = {status.value: status.phrase for status in HTTPStatus}


@dataclass(slots=True)
class Request:
    """One parsed request. Header names are lower-case."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool = True
    http10: bool = False


@dataclass(slots=True)
class Response:
    """What to answer; ``drop`` closes the connection instead of answering."""

    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = "application/json"
    drop: bool = False


Handler = Callable[[Request], "Response | Coroutine[Any, Any, Response]"]


class HttpError(Exception):
    """A request that cannot be parsed; answered, then the connection is closed."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _error_body(code: str, message: str) -> bytes:
    # Plain formatting on purpose: messages here are fixed strings.
    return f'{{"code":"{code}","message":"{message}"}}'.encode()


_INTERNAL_ERROR = Response(500, _error_body("DIST0000", "internal error"))


class HttpProtocol(asyncio.Protocol):
    """One client connection: parse, dispatch, answer in order."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._handler = server.handler
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._busy = False
        self._paused = False
        self.closed = False
        self.last_active = server.loop.time()

    # -- asyncio callbacks --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._buf.clear()
        self._server.forget(self)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self.last_active = self._server.loop.time()
        if not self._busy and not self._paused:
            self._process()

    def pause_writing(self) -> None:
        # The client does not read its answers: stop reading its requests.
        self._paused = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self._transport is not None and not self.closed:
            self._transport.resume_reading()
            if not self._busy:
                self._process()

    # -- request handling -----------------------------------------------------

    def close(self, *, abort: bool = False) -> None:
        """Close the connection (used at shutdown and for idle connections)."""
        self.closed = True
        if self._transport is not None:
            if abort:
                self._transport.abort()
            else:
                self._transport.close()

    @property
    def busy(self) -> bool:
        """Whether a request of this connection is still being handled."""
        return self._busy

    def _process(self) -> None:
        while not self.closed and not self._busy and not self._paused:
            try:
                request = self._parse()
            except HttpError as exc:
                self._send(Response(exc.status, _error_body(exc.code, exc.message)), False, False)
                return
            if request is None:
                return
            try:
                result = self._handler(request)
            except Exception:
                log.exception("sandbox handler failed on %s %s", request.method, request.path)
                result = _INTERNAL_ERROR
            if isinstance(result, Response):
                self._send(result, request.keep_alive, request.http10)
            else:
                self._busy = True
                task = asyncio.ensure_future(result)
                task.add_done_callback(functools.partial(self._finish, request))
                self._server.track(task)

    def _finish(self, request: Request, task: asyncio.Future[Response]) -> None:
        if task.cancelled():  # the server is shutting down
            return
        error = task.exception()
        if error is not None:
            log.error("sandbox handler failed on %s %s", request.method, request.path,
                      exc_info=error)
            response = _INTERNAL_ERROR
        else:
            response = task.result()
        self._busy = False
        self.last_active = self._server.loop.time()
        self._send(response, request.keep_alive, request.http10)
        if self._buf:
            self._process()

    def _parse(self) -> Request | None:
        buf = self._buf
        while buf[:2] == b"\r\n":  # empty lines before a request line are allowed
            del buf[:2]
        end = buf.find(b"\r\n\r\n")
        if end < 0 or end > MAX_HEAD:
            if len(buf) > MAX_HEAD:
                raise HttpError(431, "HEADERS_TOO_LARGE", "request head too large")
            return None
        lines = buf[:end].decode("latin-1").split("\r\n")
        method, target, http10 = _parse_request_line(lines[0])
        headers = _parse_headers(lines)
        if "transfer-encoding" in headers:
            raise HttpError(411, "LENGTH_REQUIRED", "send the body with a Content-Length")
        length = 0
        raw_length = headers.get("content-length")
        if raw_length is not None:
            if not (raw_length.isascii() and raw_length.isdigit()):
                raise HttpError(400, "BAD_REQUEST", "malformed Content-Length")
            length = int(raw_length)
            if length > MAX_BODY:
                raise HttpError(413, "PAYLOAD_TOO_LARGE", "request body too large")
        start = end + 4
        if len(buf) < start + length:
            return None
        body = bytes(buf[start:start + length])
        del buf[:start + length]
        if target.startswith(("http://", "https://")):  # absolute form
            target = "/" + target.split("/", 3)[3] if target.count("/") >= 3 else "/"
        path, _, query = target.partition("?")
        connection = headers.get("connection", "").lower()
        keep_alive = "keep-alive" in connection if http10 else "close" not in connection
        return Request(method, path, query, headers, body, keep_alive, http10)

    def _send(self, response: Response, keep_alive: bool, http10: bool) -> None:
        transport = self._transport
        if self.closed or transport is None or transport.is_closing():
            self.closed = True
            return
        if response.drop:
            self.close()
            return
        body = response.body
        head = (f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Unknown')}\r\n"
                f"Server: onebox-sandbox\r\nDate: {self._server.http_date()}\r\n"
                f"Content-Type: {response.content_type}\r\nContent-Length: {len(body)}\r\n")
        for name, value in response.headers:
            head += f"{name}: {value}\r\n"
        if not keep_alive:
            head += "Connection: close\r\n"
        elif http10:
            head += "Connection: keep-alive\r\n"
        transport.write((head + "\r\n").encode("latin-1") + body)
        if not keep_alive:
            self.close()


def _parse_request_line(line: str) -> tuple[str, str, bool]:
    """Method, target, and whether the client speaks HTTP/1.0."""
    parts = line.split(" ")
    if len(parts) != 3:
        raise HttpError(400, "BAD_REQUEST", "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(400, "BAD_REQUEST", "unsupported HTTP version")
    return method, target, version == "HTTP/1.0"


def _parse_headers(lines: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name[-1] in " \t":
            raise HttpError(400, "BAD_REQUEST", "malformed header line")
        name = name.lower()
        value = value.strip()
        if name in headers:
            if name == "content-length" and headers[name] != value:
                raise HttpError(400, "BAD_REQUEST", "conflicting Content-Length")
            if name != "content-length":
                headers[name] += ", " + value
        else:
            headers[name] = value
    return headers


class HttpServer:
    """The listening socket, its connections and the tasks they started."""

    def __init__(self, handler: Handler, *, idle_timeout: float = 75.0) -> None:
        self.handler = handler
        self.idle_timeout = idle_timeout
        self.connections: set[HttpProtocol] = set()
        self._tasks: set[asyncio.Future[Any]] = set()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._all_closed = asyncio.Event()
        self._date_second = 0
        self._date = ""
        self.loop = asyncio.get_running_loop()

    async def start(self, host: str, port: int) -> int:
        """Listen; return the port (useful when ``port`` is 0)."""
        self._server = await self.loop.create_server(
            lambda: HttpProtocol(self), host, port, backlog=1024, reuse_address=True)
        self._sweeper = self.loop.create_task(self._close_idle())
        port_number: int = self._server.sockets[0].getsockname()[1]
        return port_number

    def track(self, task: asyncio.Future[Any]) -> None:
        """Keep a reference to a running handler so it finishes (and is not collected)."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def forget(self, connection: HttpProtocol) -> None:
        """A connection is gone."""
        self.connections.discard(connection)
        if not self.connections:
            self._all_closed.set()

    def http_date(self) -> str:
        """The Date header, formatted once per second."""
        now = int(time.time())
        if now != self._date_second:
            self._date_second = now
            self._date = formatdate(now, usegmt=True)
        return self._date

    async def _close_idle(self) -> None:
        period = min(5.0, self.idle_timeout / 2)
        while True:
            await asyncio.sleep(period)
            deadline = self.loop.time() - self.idle_timeout
            for connection in list(self.connections):
                if not connection.busy and connection.last_active < deadline:
                    connection.close()

    async def close(self) -> None:
        """Stop listening, close every connection, cancel what still runs."""
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        pending = [*self._tasks, *([self._sweeper] if self._sweeper else [])]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self.connections:
            self._all_closed.clear()
            for connection in list(self.connections):
                connection.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), 1.0)
            for connection in list(self.connections):
                connection.close(abort=True)
            await asyncio.sleep(0)
        if self._server is not None:
            await self._server.wait_closed()


async def serve(
    handler: Handler,
    host: str,
    port: int,
    stop: asyncio.Event,
    ready: Callable[[int], None] | None = None,
    *,
    idle_timeout: float = 75.0,
) -> None:
    """Serve until ``stop`` is set; ``ready(port)`` is called once listening."""
    server = HttpServer(handler, idle_timeout=idle_timeout)
    bound_port = await server.start(host, port)
    try:
        if ready is not None:
            ready(bound_port)
        await stop.wait()
    finally:
        await server.close()
