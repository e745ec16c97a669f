"""An Onebox that echoes the buyer in its error messages: a proxy in front of the sandbox.

Nothing says Onebox's error messages never repeat what it was sent ("invalid
buyer data {...}", "order for ana@example.com cannot be confirmed"), so every
message of theirs that reaches a log line, an exception or a result must be
scrubbed. The sandbox never echoes anything, so without this proxy no test
ever made the scrub run. The proxy forwards every request to the sandbox over
loopback, remembers the buyer data sent for each order, and answers the calls
a rule names with an error whose message repeats that buyer data verbatim.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests

#: The method and path of each step a rule may name (as the sandbox's fault plan names them).
STEPS = {"buyer_data": ("POST", "/orders/buyer-data"), "confirm": ("POST", "/orders/confirm"),
         "pre_confirm": ("POST", "/orders/pre-confirm"),
         "seats_auto": ("POST", "/orders/seats-auto"), "release": ("DELETE", "/orders/seats")}
ORDER_HEADER = "ob-order-id"


@dataclass
class Echo:
    """Answer the next ``times`` calls of ``step`` with ``status`` and a message echoing
    the order's buyer; with ``forward`` the call reaches the sandbox first (done, then
    the answer is replaced), else it never does. With ``match``, only an order whose
    buyer data holds that text."""

    step: str
    status: int
    code: str
    times: int = 1
    forward: bool = False
    match: str = ""


@dataclass
class EchoProxy:
    upstream: str
    url: str = ""
    rules: list[Echo] = field(default_factory=list)
    #: The buyer-data body last sent for each order id, as text.
    buyers: dict[str, str] = field(default_factory=dict)
    #: How many answers echoed a buyer, per step.
    echoed: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, *rules: Echo) -> None:
        with self.lock:
            self.rules.extend(rules)

    def _take(self, method: str, path: str, order_id: str) -> Echo | None:
        with self.lock:
            buyer = self.buyers.get(order_id, "")
            for rule in self.rules:
                step_method, step_path = STEPS[rule.step]
                if rule.times > 0 and method == step_method and path.endswith(step_path) \
                        and rule.match in buyer:
                    rule.times -= 1
                    return rule
        return None

    def handle(self, method: str, path: str, headers: dict[str, str],
               body: bytes) -> tuple[int, dict[str, str], bytes]:
        order_id = headers.get(ORDER_HEADER, "")
        if path.endswith(STEPS["buyer_data"][1]) and body:
            with self.lock:
                self.buyers[order_id] = body.decode()
        rule = self._take(method, path.split("?", 1)[0], order_id)
        if rule is None or rule.forward:
            answer = requests.request(method, self.upstream + path, data=body or None,
                                      headers=headers, timeout=30)
            if rule is None:
                return answer.status_code, dict(answer.headers), answer.content
        assert rule is not None
        with self.lock:
            buyer = self.buyers.get(order_id, "{}")
            self.echoed[rule.step] = self.echoed.get(rule.step, 0) + 1
        message = f"{rule.step} refused for buyer {buyer} (order {order_id})"
        document = json.dumps({"code": rule.code, "message": message}).encode()
        return rule.status, {"Content-Type": "application/json", "Retry-After": "0.2"}, document


_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length",
               "content-encoding", "host"}


def _handler(proxy: EchoProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            status, answer_headers, content = proxy.handle(self.command, self.path, headers,
                                                           body)
            self.send_response(status)
            for name, value in answer_headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        do_GET = do_POST = do_DELETE = do_PUT = _any

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the test's output is the workers' logs."""

    return Handler


@contextmanager
def echo_proxy(upstream: str) -> Iterator[EchoProxy]:
    """An ``EchoProxy`` in front of ``upstream`` on a loopback port of its own."""
    proxy = EchoProxy(upstream.rstrip("/"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(proxy))
    server.daemon_threads = True
    proxy.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="echo-proxy", daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
