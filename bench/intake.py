"""The intake for any language while the workers buy: intents admitted per second from the
Redis list, beside ``submit_many()`` of the same intents in the same run.

Everything real, on the durable configuration production must run: a private
redis-server with ``appendfsync always`` (ledger and broker), the sandbox as a
process of its own adding 50 ms to every call, Celery workers as processes of
their own (``-P threads -c 16`` each) and celery beat as its own process,
draining the list every second (``FULFILMENT_INTAKE_INTERVAL``). First a load
of intents is submitted so that the workers are buying throughout; then, in
turn:

- ``submit_many()`` of N intents from this process (the Python path, a dict
  each), timed from the call to its last answer: the reference;
- the same N intents as plain JSON text, pushed onto ``<prefix>:intake`` in
  one go (``LPUSH``, 1,000 a command, as a PHP backend would), timed from the
  first push to the last admission (the batch's ``admitted`` counter, read
  every 10 ms): what the drains take in, a beat tick's wait included;
- ``submit_many()`` again: the reference once more, after the intake (the
  workers' load grows as the fan-outs of each run are expanded).

Goal (issue 15): the intake >= 0.8x ``submit_many()``.
Usage: python bench/intake.py [--intents 20000] [--load 3000] [--workers 2]
Prints a table and writes bench/results/intake.json. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from fulfilment.config import Settings  # noqa: E402
from fulfilment.harness.cluster import Cluster  # noqa: E402
from fulfilment.harness.processes import (  # noqa: E402
    RedisServer,
    SandboxProcess,
    free_port,
    wait_for,
)
from fulfilment.keys import Keys  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "intake.json"
LATENCY_MS = 50


def intent(reference: str, batch: str) -> dict[str, Any]:
    return {"reference": reference, "batch": batch, "buyer": {"email": "bench@example.com"},
            "items": [{"session_id": 1002, "price_type_id": 3, "quantity": 1}]}


def admitted(client: redis.Redis, keys: Keys, batch: str) -> int:
    return int(client.hget(keys.batch(batch), "admitted") or 0)


def bought(client: redis.Redis, keys: Keys, batches: list[str]) -> int:
    return sum(int(client.hget(keys.batch(b), "confirmed") or 0)
               + int(client.hget(keys.batch(b), "failed") or 0) for b in batches)


def run_submit_many(count: int, batch: str) -> float:
    """``submit_many()`` of ``count`` intents (dicts): seconds to its last answer."""
    from tasks import submit_many

    documents = [intent(f"{batch}-{i}", batch) for i in range(count)]
    started = time.monotonic()
    answers = list(submit_many(documents, batch=batch))
    wall = time.monotonic() - started
    assert sum(a.status == "accepted" for a in answers) == count, batch
    return wall


class Holders:
    """How many drainers held a chunk at once, sampled from a thread."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.most = 0
        self._client, self._pattern = client, f"{keys.intake}:processing:*"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            holding = sum(1 for k in self._client.scan_iter(self._pattern) if self._client.llen(k))
            self.most = max(self.most, holding)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.most


def run_intake(client: redis.Redis, keys: Keys, count: int, batch: str) -> dict[str, float]:
    """Push ``count`` plain JSON intents onto the list; seconds until the last is admitted."""
    messages = [json.dumps(intent(f"{batch}-{i}", batch)) for i in range(count)]
    holders = Holders(client, keys)
    started = time.monotonic()
    pipe = client.pipeline(transaction=False)
    for start in range(0, count, 1000):
        pipe.lpush(keys.intake, *messages[start:start + 1000])
    pipe.execute()
    pushed = time.monotonic() - started
    wait_for(lambda: admitted(client, keys, batch) >= count, timeout=1800, interval=0.01,
             what=f"{count} intents admitted from the list")
    wall = time.monotonic() - started
    return {"wall_s": wall, "push_s": pushed, "most_drainers_at_once": holders.stop()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intents", type=int, default=20_000)
    parser.add_argument("--load", type=int, default=3_000,
                        help="Intents submitted first, so that the workers are buying.")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16, help="Per worker process.")
    parser.add_argument("--latency-ms", type=int, default=LATENCY_MS,
                        help="Added by the sandbox to every call.")
    args = parser.parse_args()
    from tasks.app import configure

    tmp = Path(tempfile.mkdtemp(prefix="bench-intake-"))
    server = RedisServer(tmp / "redis", free_port(), appendfsync="always")
    sandbox = SandboxProcess(tmp / "sandbox.log")
    settings = Settings.defaults().with_overrides(
        onebox_api_url=sandbox.url, redis_url=server.url, broker_url=server.url,
        key_prefix=f"bench-{uuid.uuid4().hex[:6]}", require_durable_redis=True)
    keys = Keys(settings.key_prefix)
    configure(settings)  # this process is the Python producer
    cluster = Cluster(settings, sandbox, tmp)
    client = redis.Redis.from_url(server.url)
    runs: dict[str, dict[str, float]] = {}
    try:
        sandbox.admin.set_faults({"endpoints": {"*": {"latency_ms": args.latency_ms}}})
        workers = [cluster.start_worker(concurrency=args.concurrency, pool="threads")
                   for _ in range(args.workers)]
        for worker in workers:
            wait_for(lambda w=worker: "ready." in w.output(), timeout=120,  # type: ignore[misc]
                     what="a worker")
        cluster.start_beat()
        # The workers buying: a load first, and its first outcomes
        run_submit_many(args.load, "load")
        wait_for(lambda: bought(client, keys, ["load"]) >= 100, timeout=300,
                 what="the workers to be buying")
        batches = ["load"]
        for name in ("submit_many", "intake", "submit_many again"):
            batch = name.replace(" ", "-").replace("_", "-")
            before, started = bought(client, keys, batches), time.monotonic()
            if name == "intake":
                runs[name] = run_intake(client, keys, args.intents, batch)
            else:
                runs[name] = {"wall_s": run_submit_many(args.intents, batch)}
            window = time.monotonic() - started
            runs[name].update(intents=args.intents,
                              intents_per_s=args.intents / runs[name]["wall_s"],
                              bought_per_s_meanwhile=(bought(client, keys, batches) - before)
                              / window)
            batches.append(batch)
        outcomes_left = admitted(client, keys, "load") - bought(client, keys, ["load"])
    finally:
        client.close()
        cluster.stop()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    reference = (runs["submit_many"]["intents_per_s"]
                 + runs["submit_many again"]["intents_per_s"]) / 2
    print(f"\n{args.intents:,} intents each, {args.workers} workers -P threads "
          f"-c {args.concurrency}, sandbox {args.latency_ms} ms a call, appendfsync always")
    print(f"{'':44} {'seconds':>8} {'intents/s':>10} {'vs ref':>7} {'bought/s':>9}")
    for name, label in (("submit_many", "submit_many() (reference)"),
                        ("intake", "Redis intake list, plain JSON"),
                        ("submit_many again", "submit_many() again (reference)")):
        run = runs[name]
        note = (f"  push {run['push_s']:.2f} s, at most {int(run['most_drainers_at_once'])} "
                f"drainers holding a chunk at once" if name == "intake" else "")
        print(f"{label:44} {run['wall_s']:8.2f} {run['intents_per_s']:10.0f} "
              f"{run['intents_per_s'] / reference:7.2f} {run['bought_per_s_meanwhile']:9.1f}"
              f"{note}")
    ratio = runs["intake"]["intents_per_s"] / reference
    print(f"intake / submit_many (mean of both): {ratio:.2f} (goal >= 0.8)")
    written = RESULTS if args.intents == 20_000 else RESULTS.with_name(
        f"intake-{args.intents}.json")
    written.parent.mkdir(exist_ok=True)
    written.write_text(json.dumps({
        "machine": platform.platform(), "cpus": os.cpu_count(), "latency_ms": args.latency_ms,
        "workers": args.workers, "pool": "threads", "concurrency": args.concurrency,
        "intents": args.intents, "load": args.load, "load_without_outcome_at_end": outcomes_left,
        "runs": runs, "reference_intents_per_s": reference, "intake_vs_reference": ratio},
        indent=2) + "\n")
    print(f"\nwritten to {written.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
