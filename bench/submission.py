"""How fast does a bulk file go in, and does memory stay flat? Beside a plain send_task loop.

Everything real, on the durable configuration production must run: a private
redis-server with ``appendfsync always`` (ledger and broker, as in
production), no worker (this is the producer's side alone). In one run:

- ``fulfilment submit --quiet FILE`` on 100,000 intents (and on 10,000, for
  the memory comparison), each a process of its own: wall time from start to
  exit (start-up included), peak RSS (``wait4``), Redis commands per intent.
- the reference: a plain loop of ``app.send_task("fulfilment.basket", [ref])``,
  one per intent, the same count, in a process of its own: no validation, no
  ledger; what "just enqueue it" costs.

Targets (issue 8): >= 5,000 intents/s and >= 3x the plain loop; peak memory flat.
Usage: python bench/submission.py [--intents 100000] [--appendfsync always]
Prints a table and writes bench/results/submission.json. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from fulfilment.config import Settings  # noqa: E402
from fulfilment.harness.cluster import env_for  # noqa: E402
from fulfilment.harness.processes import Finished, RedisServer, free_port, run_measured  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "submission.json"


def intent(reference: str) -> dict[str, Any]:
    return {"reference": reference, "buyer": {"email": "bench@example.com", "name": "Ana"},
            "items": [{"session_id": 1002, "price_type_id": 3, "quantity": 2}],
            "metadata": {"row": reference}}


def write_file(path: Path, count: int, tag: str) -> None:
    with path.open("w") as out:
        for i in range(count):
            out.write(json.dumps(intent(f"{tag}-{i}")) + "\n")


def plain_loop(count: int) -> None:
    """The reference, run in a process of its own (``--plain-loop N``)."""
    from tasks.app import app

    for i in range(count):
        app.send_task("fulfilment.basket", args=[f"plain-{i}"])


def commands(client: redis.Redis) -> int:
    return int(client.info("stats")["total_commands_processed"])


def measured(client: redis.Redis, args: list[str], env: dict[str, str], tmp: Path,
             count: int) -> dict[str, float]:
    before = commands(client)
    done: Finished = run_measured(args, env, timeout=1800, directory=tmp)
    if done.returncode != 0:
        raise SystemExit(f"{args[2:5]} failed:\n{done.stderr[-3000:]}")
    return {"intents": count, "wall_s": done.wall, "intents_per_s": count / done.wall,
            "cpu_s": done.cpu, "peak_rss_mib": done.peak_rss_kib / 1024,
            "redis_commands_per_intent": (commands(client) - before - 1) / count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intents", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=10_000,
                        help="The smaller file, for the memory comparison.")
    parser.add_argument("--appendfsync", choices=["always", "everysec"], default="always")
    parser.add_argument("--plain-loop", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_loop is not None:
        plain_loop(args.plain_loop)
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench-submission-"))
    server = RedisServer(tmp / "redis", free_port(), appendfsync=args.appendfsync)
    client = redis.Redis(port=server.port)
    try:
        settings = Settings.defaults().with_overrides(
            redis_url=server.url, broker_url=server.url,
            key_prefix=f"bench-{uuid.uuid4().hex[:6]}",
            require_durable_redis=args.appendfsync == "always")
        env = {**{k: v for k, v in os.environ.items()
                  if not k.startswith(("ONEBOX_", "FULFILMENT_"))},
               **env_for(settings), "PYTHONPATH": str(ROOT)}
        small, large = tmp / "small.jsonl", tmp / "large.jsonl"
        write_file(small, args.small, "small")
        write_file(large, args.intents, "large")
        submit = [sys.executable, "-m", "tasks.commands", "submit", "--quiet"]
        rows: dict[str, dict[str, float]] = {}
        rows["plain send_task loop (reference)"] = measured(
            client, [sys.executable, __file__, "--plain-loop", str(args.intents)], env, tmp,
            args.intents)
        rows[f"fulfilment submit, {args.small:,} lines"] = measured(
            client, [*submit, str(small)], env, tmp, args.small)
        rows[f"fulfilment submit, {args.intents:,} lines"] = measured(
            client, [*submit, str(large)], env, tmp, args.intents)
        rows[f"fulfilment submit, {args.intents:,} lines again (all duplicates)"] = measured(
            client, [*submit, str(large)], env, tmp, args.intents)
    finally:
        client.close()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    reference = rows["plain send_task loop (reference)"]["intents_per_s"]
    print(f"\nRedis appendfsync {args.appendfsync}; wall time from start to exit, start-up "
          "included\n")
    print(f"{'':58} {'intents/s':>10} {'vs loop':>8} {'peak RSS MiB':>13} "
          f"{'CPU s':>7} {'Redis cmds/intent':>18}")
    for name, row in rows.items():
        print(f"{name:58} {row['intents_per_s']:10,.0f} {row['intents_per_s'] / reference:8.2f} "
              f"{row['peak_rss_mib']:13.1f} {row['cpu_s']:7.1f} "
              f"{row['redis_commands_per_intent']:18.2f}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(),
                                   "appendfsync": args.appendfsync, "rows": rows},
                                  indent=2) + "\n")
    print(f"\nwritten to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
