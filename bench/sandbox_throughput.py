"""How many requests a second does the sandbox serve, next to an ideal server?

The sandbox runs as a process of its own (``python -m fulfilment.sandbox``);
several client processes each hold one keep-alive ``http.client`` connection
and send requests one after another for a fixed time (or a fixed count).
Scenarios: ``GET /__sandbox/health`` and the full purchase flow (create,
seats-auto, buyer-data, pre-confirm, confirm: five requests per order).

The reference is a bare asyncio server, in its own process, that answers every
request with a fixed 200: the same client load against it shows what this
machine, this client and loopback allow. Ratio = sandbox / ideal.

Usage: python bench/sandbox_throughput.py [--clients 4] [--seconds 5]
Prints a table and writes bench/results/sandbox_throughput.json. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "sandbox_throughput.json"
DIST = "/distribution-api/v1"
TOKEN_FORM = ("grant_type=client_credentials&channel_id=sandbox-channel"
              "&client_id=seller-channel-client&client_secret=sandbox-api-key")
JSON = {"Content-Type": "application/json"}


# -- the ideal server ---------------------------------------------------------------

_IDEAL_BODY = b'{"id":"00000000000000000000000000000000","code":"IDEAL0000000"}'
_IDEAL_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                   + str(len(_IDEAL_BODY)).encode() + b"\r\n\r\n" + _IDEAL_BODY)


class _IdealProtocol(asyncio.Protocol):
    """Answers each request with the same bytes: the least a server can do."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        import socket

        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buf = b""
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            length = 0
            at = head.find(b"content-length:")
            if at >= 0:
                length = int(head[at + 15:].split(b"\r\n", 1)[0])
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            self.transport.write(_IDEAL_RESPONSE)


def _run_ideal(port_queue: Any, stop: Any) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_IdealProtocol, "127.0.0.1", 0)
        port_queue.put(server.sockets[0].getsockname()[1])
        while not stop.is_set():
            await asyncio.sleep(0.1)
        server.close()
        await server.wait_closed()

    asyncio.run(main())


# -- clients ------------------------------------------------------------------------


def _request(conn: http.client.HTTPConnection, method: str, path: str,
             body: bytes | None = None, headers: dict[str, str] | None = None) -> bytes:
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    if response.status != 200:
        raise RuntimeError(f"{method} {path}: {response.status} {data[:200]!r}")
    return data


def _client(port: int, scenario: str, ideal: bool, seconds: float, max_requests: int,
            index: int, start: Any, results: Any) -> None:
    """One client process: one keep-alive connection, requests back to back."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    auth: dict[str, str] = {}
    if scenario == "flow":
        token = json.loads(_request(conn, "POST", "/oauth/token", TOKEN_FORM.encode(),
                                    {"Content-Type": "application/x-www-form-urlencoded"}))
        auth = {"Authorization": f"Bearer {token.get('access_token', 'ideal')}", **JSON}
    start.wait()
    latencies: list[float] = []
    began = time.perf_counter()
    deadline = began + seconds
    done = 0
    orders = 0
    while done < max_requests and time.perf_counter() < deadline:
        if scenario == "health":
            t0 = time.perf_counter()
            _request(conn, "GET", "/__sandbox/health")
            latencies.append(time.perf_counter() - t0)
            done += 1
            continue
        t0 = time.perf_counter()
        order = json.loads(_request(conn, "POST", f"{DIST}/orders", None, auth))
        latencies.append(time.perf_counter() - t0)
        headers = {**auth, "ob-order-id": order["id"]}
        steps = [
            ("seats-auto", {"session_id": 1002, "price_type_id": 3, "quantity": 1}),
            ("buyer-data", {"email": "buyer@example.com", "name": "Bench"}),
            ("pre-confirm", {}),
            ("confirm", {"external_code": f"bench-{index}-{orders}"}),
        ]
        for step, body in steps:
            t0 = time.perf_counter()
            _request(conn, "POST", f"{DIST}/orders/{step}", json.dumps(body).encode(), headers)
            latencies.append(time.perf_counter() - t0)
        done += 5
        orders += 1
    elapsed = time.perf_counter() - began
    conn.close()
    latencies.sort()
    results.put({"requests": done, "elapsed": elapsed, "orders": orders,
                 "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else 0.0,
                 "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else 0.0})
    del ideal


@dataclass
class Row:
    """One measured scenario."""

    server: str
    scenario: str
    clients: int
    requests: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float


def _drive(port: int, server: str, scenario: str, clients: int, seconds: float,
           max_requests: int) -> Row:
    start = mp.Event()
    results: Any = mp.Queue()
    procs = [mp.Process(target=_client, args=(port, scenario, server == "ideal", seconds,
                                              max_requests, i, start, results))
             for i in range(clients)]
    for proc in procs:
        proc.start()
    time.sleep(0.5)  # let every client connect (and get its token) before the clock starts
    start.set()
    parts = [results.get(timeout=seconds + 60) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    total = sum(p["requests"] for p in parts)
    elapsed = max(p["elapsed"] for p in parts)
    return Row(server, scenario, clients, total, round(elapsed, 3), round(total / elapsed, 1),
               round(statistics.median(p["p50_ms"] for p in parts), 3),
               round(max(p["p99_ms"] for p in parts), 3))


def _start_sandbox() -> tuple[subprocess.Popen[str], int]:
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(
        [sys.executable, "-m", "fulfilment.sandbox", "--host", "127.0.0.1", "--port", "0",
         "--seed", "1"],
        stdout=subprocess.PIPE, text=True, cwd=root)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("sandbox listening on http://"):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"sandbox did not start: {line!r}")
    return proc, int(line.rsplit(":", 1)[1])


def _audit(port: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        return dict(json.loads(_request(conn, "GET", "/__sandbox/audit")))
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--max-requests", type=int, default=200_000,
                        help="per client and scenario")
    args = parser.parse_args()

    rows: list[Row] = []
    stop = mp.Event()
    port_queue: Any = mp.Queue()
    ideal = mp.Process(target=_run_ideal, args=(port_queue, stop))
    ideal.start()
    ideal_port = port_queue.get(timeout=10)
    sandbox, sandbox_port = _start_sandbox()
    try:
        for scenario in ("health", "flow"):
            rows.append(_drive(ideal_port, "ideal", scenario, args.clients, args.seconds,
                               args.max_requests))
            rows.append(_drive(sandbox_port, "sandbox", scenario, args.clients, args.seconds,
                               args.max_requests))
        audit = _audit(sandbox_port)
    finally:
        sandbox.terminate()
        sandbox.wait(timeout=10)
        stop.set()
        ideal.join(timeout=10)

    ideal_rate = {r.scenario: r.requests_per_s for r in rows if r.server == "ideal"}
    print(f"{'server':8} {'scenario':8} {'clients':>7} {'requests':>9} {'req/s':>9} "
          f"{'p50 ms':>7} {'p99 ms':>7} {'vs ideal':>8}")
    for r in rows:
        ratio = r.requests_per_s / ideal_rate[r.scenario]
        print(f"{r.server:8} {r.scenario:8} {r.clients:7} {r.requests:9} "
              f"{r.requests_per_s:9.0f} {r.p50_ms:7.3f} {r.p99_ms:7.3f} {ratio:8.2f}")
    flow_rate = next(r.requests_per_s for r in rows
                     if r.server == "sandbox" and r.scenario == "flow")
    print(f"sandbox confirmed {audit['orders']['CONFIRM']} orders, "
          f"duplicates {len(audit['duplicates'])}, seats sold twice {audit['seats_sold_twice']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "params": vars(args),
        "rows": [{**asdict(r), "ratio_vs_ideal": round(r.requests_per_s
                                                        / ideal_rate[r.scenario], 3)}
                 for r in rows],
        "flow_requests_per_s": flow_rate,
        "flow_meets_2000": flow_rate >= 2000,
        "audit": {k: audit[k] for k in ("orders", "seats_sold_twice", "requests")},
    }, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
