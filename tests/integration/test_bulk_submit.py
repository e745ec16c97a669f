"""Bulk files end to end: `fulfilment submit` processes, real Redis, real workers, the sandbox."""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fulfilment.harness.cluster import Cluster, env_for
from fulfilment.harness.processes import (
    Child,
    Finished,
    run_measured,
    wait_for,
)
from tests.deployment import deployment

pytestmark = pytest.mark.integration

COMMAND = [sys.executable, "-m", "tasks.commands"]


@pytest.fixture
def cluster(redis_url: str, prefix: str, tmp_path: Path) -> Iterator[Cluster]:
    with deployment(tmp_path, redis_url, prefix, retry_deadline=300,
                    onebox_read_timeout=5.0) as running:
        yield running


def env(cluster: Cluster) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ONEBOX_", "FULFILMENT_"))}
    return {**base, **env_for(cluster.settings)}


def run(cluster: Cluster, *args: str, timeout: float = 120) -> Finished:
    return run_measured([*COMMAND, *args], env(cluster), timeout=timeout, directory=cluster.tmp)


def intent(reference: str, **extra: Any) -> dict[str, Any]:
    return {"reference": reference, "items": [{"session_id": 1002, "price_type_id": 3,
                                               "quantity": 1}],
            "buyer": {"email": f"{reference}@example.com", "phone": "+34 600 000 000"}, **extra}


def write_jsonl(path: Path, count: int, bad_every: int = 0) -> dict[int, str]:
    """``count`` lines, one in ``bad_every`` bad in a way of its own; the bad lines' numbers."""
    bad: dict[int, str] = {}
    kinds = [("JSON", None), ("buyer.email", {"buyer": {"email": "nope"}}),
             ("notes", {"notes": "aisle"}), ("batch", {"batch": "another-batch"})]
    with path.open("w") as out:
        for number in range(1, count + 1):
            if bad_every and number % bad_every == 0:
                field, change = kinds[(number // bad_every) % len(kinds)]
                bad[number] = field
                line = "not json" if change is None else \
                    json.dumps({**intent(f"bulk-{number}"), **change})
            else:
                line = json.dumps(intent(f"bulk-{number}"))
            out.write(line + "\n")
    return bad


#: Lines in the file bought end to end (bench/bulk.py buys 10,000 and 100,000; a
#: test need not take minutes to show every valid line gets one outcome).
LINES = 2_000


@pytest.mark.timeout(1200)
def test_a_file_with_bad_lines_gets_every_valid_intent_an_outcome(cluster: Cluster) -> None:
    # Given two workers and a 2,000-line file, one line in 100 bad
    for _ in range(2):
        cluster.start_worker(concurrency=3)
    source = cluster.tmp / "intents.jsonl"
    bad = write_jsonl(source, LINES, bad_every=100)
    results = cluster.tmp / "results.jsonl"
    # When it is submitted with --wait, in another process
    submit = Child([*COMMAND, "submit", str(source), "--batch", "big-1", "--wait",
                    "--results", str(results)], cluster.tmp / "submit.log", env(cluster))
    # Then another terminal sees the batch in the ledger while it runs
    def seen() -> dict[str, Any] | None:
        done = run(cluster, "batch", "status", "big-1", "--json")
        status: dict[str, Any] = json.loads(done.stdout) if done.returncode == 0 else {}
        return status if status.get("admitted") == LINES - len(bad) else None
    status = wait_for(seen, timeout=120, what="the batch's status from another process",
                      interval=0.5)
    assert status is not None  # wait_for returns only a truthy value
    assert status["in_progress"] + status["confirmed"] + status["failed"] == LINES - len(bad)
    assert submit.process.wait(timeout=1100) == 1, submit.output()[-3000:]  # 1: lines refused
    submit.stop()
    output = submit.output()
    # Each bad line is reported with its number, field and reason, no buyer data
    for number, field in bad.items():
        line = next(x for x in output.splitlines() if x.startswith(f"line {number}:"))
        assert "refused" in line and field.split(".")[-1] in line, line
    assert "@example.com" not in output and "600 000 000" not in output
    assert f"{LINES - len(bad)} enqueued, 0 duplicates, {len(bad)} refused" in output
    # And every valid intent has an outcome, in the results file and in the summary
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    expected = {f"bulk-{n}" for n in range(1, LINES + 1) if n not in bad}
    assert {row["reference"] for row in rows} == expected and len(rows) == len(expected)
    assert Counter(row["status"] for row in rows) == {"confirmed": len(expected)}
    assert all(row["batch"] == "big-1" for row in rows)
    assert re.search(rf"confirmed +{len(expected):,}\n", output), output[-2000:]
    # And Onebox holds one order per confirmed intent, under its code
    audit = cluster.sandbox.admin.audit()
    assert audit["duplicates"] == {}
    assert {row["reference"]: [row["order_code"]] for row in rows} == \
        {ref: codes for ref, codes in audit["confirmed"].items() if ref.startswith("bulk-")}
    final = json.loads(run(cluster, "batch", "status", "big-1", "--json").stdout)
    assert (final["in_progress"], final["confirmed"], final["oldest_open"]) == \
        (0, len(expected), None)


@pytest.mark.timeout(600)
def test_memory_stays_flat_however_long_the_file_and_a_resubmission_is_all_duplicates(
        cluster: Cluster) -> None:
    # Given files of 10,000 and 50,000 intents (no worker: submission alone)
    small, large = cluster.tmp / "small.jsonl", cluster.tmp / "large.jsonl"
    write_jsonl(small, 10_000)
    with large.open("w") as out:
        for number in range(50_000):
            out.write(json.dumps(intent(f"large-{number}")) + "\n")
    # When each is submitted
    first = run(cluster, "submit", "--quiet", str(small))
    second = run(cluster, "submit", "--quiet", str(large), timeout=300)
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert "50000 enqueued, 0 duplicates, 0 refused" in second.stdout
    # Then the process's peak memory does not grow with the file: five times the
    # lines, a few MiB at most (holding 40,000 more intents would take hundreds)
    growth = second.peak_rss_kib - first.peak_rss_kib
    assert growth < 12 * 1024, (first.peak_rss_kib, second.peak_rss_kib)
    # And the same file again is all duplicates, in the same batch (its default id)
    again = run(cluster, "submit", "--quiet", str(small))
    assert again.returncode == 0, again.stderr
    assert "0 enqueued, 10000 duplicates, 0 refused" in again.stdout
    assert again.stdout.splitlines()[0] == first.stdout.splitlines()[0]  # "batch <id>"


def test_a_csv_file_is_bought_and_its_status_read_from_another_process(
        cluster: Cluster) -> None:
    # Given a worker and a CSV file: numbered and automatic items, a two-row
    # intent, and a row whose seats cannot be read
    cluster.start_worker()
    incoming = cluster.tmp / "incoming"
    incoming.mkdir()
    source = incoming / "orders.csv"
    source.write_text(
        "reference,session_id,price_type_id,quantity,rate_id,seats,buyer_email,buyer_name,"
        "metadata_row\n"
        "csv-1,1002,3,2,,,ana@example.com,Ana,one\n"
        "csv-2,,,,1,1001:3101 1001:3102,luis@example.org,,two\n"
        "csv-2,1002,4,1,,,,,\n"
        "csv-3,,,,,1001-3103,eva@example.net,,three\n"
        "csv-4,1002,3,1,3,,eva@example.net,,four\n")
    # When it is submitted with --wait (run from another directory, no --results)
    done = run(cluster, "submit", str(source), "--batch", "csv-b", "--wait", timeout=240)
    # Then the results go next to the input file, as the output says from the start
    results = incoming / "csv-b.results.jsonl"
    assert f"results to {results} once every intent has an outcome" in done.stdout
    assert f"3 results written to {results}" in done.stdout
    assert not (Path.cwd() / results.name).exists()  # never where it is run
    # And the bad row is reported by line and field, the rest are confirmed
    assert done.returncode == 1, done.stderr
    assert "line 5: csv-3: refused: items.0.seats: Each seat must be" in done.stderr
    assert "3 enqueued, 0 duplicates, 1 refused" in done.stdout
    rows = {row["reference"]: row for row in map(json.loads, results.read_text().splitlines())}
    assert sorted(rows) == ["csv-1", "csv-2", "csv-4"]
    assert {row["status"] for row in rows.values()} == {"confirmed"}
    assert rows["csv-2"]["metadata"] == {"row": "two"}
    # And another process reads the same from the ledger
    status = json.loads(run(cluster, "batch", "status", "csv-b", "--json").stdout)
    assert (status["admitted"], status["confirmed"], status["in_progress"]) == (3, 3, 0)
    inventory = cluster.sandbox.admin.inventory(1001)
    assert inventory["seats"]["3101"] == inventory["seats"]["3102"] == "SOLD"
    assert run(cluster, "batch", "status", "no-such-batch").returncode == 1


CSV_HEADER = "reference,session_id,price_type_id,quantity,buyer_email,buyer_name\n"


def csv_line(number: int, name: str = "Ana") -> str:
    return f"fix-{number},1002,3,1,fix-{number}@example.com,{name}\n"


def test_every_line_of_a_broken_csv_is_accounted_for_and_the_corrected_file_is_its_batch(
        cluster: Cluster) -> None:
    # Given a CSV file (no worker: submission alone) with a stray quote on line 4 and a
    # cell over the csv module's 131,072 characters on line 7, between valid lines
    source = cluster.tmp / "orders.csv"
    lines = [csv_line(n) for n in range(2, 12)]
    lines[2] = csv_line(4, '"Luis')
    lines[5] = csv_line(7, "x" * 140_000)
    source.write_text(CSV_HEADER + "".join(lines))
    # When it is submitted
    first = run(cluster, "submit", "--quiet", str(source))
    # Then both bad lines are refused by number, every other line is admitted, and the
    # counts are printed
    assert first.returncode == 1, first.stderr
    assert "line 4: fix-4: refused: message: Line 4 cannot be read as CSV" in first.stderr
    assert "line 7: fix-7: refused: message: Line 7 is 140" in first.stderr
    assert "Luis" not in first.stderr and "xxxx" not in first.stderr
    assert first.stdout.splitlines()[-1] == "8 enqueued, 0 duplicates, 2 refused"
    batch = first.stdout.splitlines()[0]
    # When the file is corrected in place and submitted again, without naming a batch
    lines[2], lines[5] = csv_line(4, "Luis"), csv_line(7, "Eva")
    source.write_text(CSV_HEADER + "".join(lines))
    again = run(cluster, "submit", "--quiet", str(source))
    # Then it is the same batch: the lines taken before are duplicates, the corrected
    # ones join them, and the batch holds each intent once
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[0] == batch
    assert again.stdout.splitlines()[-1] == "2 enqueued, 8 duplicates, 0 refused"
    status = json.loads(run(cluster, "batch", "status", batch.split()[1], "--json").stdout)
    assert status["admitted"] == 10


def test_submit_counts_what_it_admitted_while_the_broker_is_away(cluster: Cluster) -> None:
    # Given a file of 50 intents and a broker nobody listens on
    source = cluster.tmp / "away.jsonl"
    with source.open("w") as out:
        for number in range(50):
            out.write(json.dumps(intent(f"away-{number}")) + "\n")
    away = {**env(cluster), "FULFILMENT_BROKER_URL": "redis://127.0.0.1:9/0"}
    # When it is submitted
    done = run_measured([*COMMAND, "submit", "--chunk", "20", str(source)], away,
                        timeout=180, directory=cluster.tmp)
    # Then each intent is counted as admitted, and the output says they wait for dispatch
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == \
        "50 admitted (0 enqueued, 50 wait for dispatch), 0 duplicates, 0 refused", done.stdout
    assert "the broker did not take the purchases of 50 admitted intents" in done.stderr
    assert "submitting: 50 intents" in done.stderr
    assert "Traceback" not in done.stderr
    batch = done.stdout.splitlines()[0].split()[1]
    status = json.loads(run(cluster, "batch", "status", batch, "--json").stdout)
    assert (status["admitted"], status["in_progress"]) == (50, 50)
    # (bulk lane: those released to the broker are in flight, the rest wait in Redis)
    released = status["bulk_in_flight"]
    assert released > 0 and status["bulk_waiting"] == {"default": 50 - released}
    # And once the broker is back, the recovery sweep starts the released ones, the rest
    # follow as those finish, and each is bought once
    cluster.start_worker(concurrency=3)
    swept = run_measured([*COMMAND, "sweep"], {**env(cluster), "FULFILMENT_STUCK_AFTER": "0.01"},
                         timeout=60, directory=cluster.tmp)
    assert len(json.loads(swept.stdout)["resumed"]) == released, swept.stderr

    def bought() -> dict[str, Any] | None:
        now = json.loads(run(cluster, "batch", "status", batch, "--json").stdout)
        return now if now["in_progress"] == 0 else None

    final = wait_for(bought, timeout=180, what="the swept intents' outcomes", interval=0.5)
    assert final is not None and final["confirmed"] == 50
    assert cluster.sandbox.admin.audit()["duplicates"] == {}


def test_waiting_on_standard_input_needs_a_results_file(cluster: Cluster) -> None:
    done = run(cluster, "submit", "-", "--wait")
    assert done.returncode == 2
    assert "--results" in done.stderr and "standard input" in done.stderr
