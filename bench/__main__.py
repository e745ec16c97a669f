"""Run every benchmark, one after another: ``python -m bench`` (about 25 minutes).

Each script prints its table and writes its JSON to bench/results/; the figures of
docs/benchmarks.md (and the README's headline table) come from these.
``python -m bench NAME...`` runs only those named.
Nothing else should run on the machine meanwhile: every table sets its figures
beside a reference measured in the same run, but a busy machine still blurs them.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: name: the script and its arguments, in the order they run.
BENCHMARKS: dict[str, list[str]] = {
    "cost": ["chain_hops.py", "--orders", "400"],
    "cost-2-workers": ["chain_hops.py", "--orders", "400", "--workers", "2"],
    "throughput": ["throughput.py"],
    "submission": ["submission.py", "--intents", "100000"],
    "bulk": ["bulk.py", "--intents", "10000"],
    "ratelimit": ["ratelimit.py"],
    "durability": ["durability_cost.py"],
    "sandbox": ["sandbox_throughput.py"],
    "finished-entry": ["finished_entry.py", "--intents", "200"],
    "intake": ["intake.py", "--intents", "20000"],
    "session-cap": ["session_cap.py", "--intents", "200"],
    "redis-clock": ["redis_clock.py", "--orders", "300", "--rounds", "5"],
    "lanes": ["lanes.py", "--a-lines", "10000", "--b-lines", "1000", "--cancel", "--holds"],
    # Only issue 16's phases of it (cancel a running batch, holds), about 4 minutes.
    "lanes-stops": ["lanes.py", "--skip-lanes", "--cancel", "--holds"],
}


def main(names: list[str]) -> int:
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    failed = []
    for name in names or list(BENCHMARKS):
        script, *args = BENCHMARKS[name]
        print(f"\n=== {name}: python bench/{script} {' '.join(args)}", flush=True)
        started = time.monotonic()
        done = subprocess.run([sys.executable, str(HERE / script), *args], check=False)
        print(f"=== {name}: exit {done.returncode} in {time.monotonic() - started:.0f} s",
              flush=True)
        if done.returncode:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
