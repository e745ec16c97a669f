"""``fulfilment submit`` stopped midway by Redis: what was taken, and from which line nothing
is known, are printed, never a traceback (fakeredis; the command in this process)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
from click.testing import CliRunner

from fulfilment.cli import cli
from fulfilment.keys import Keys
from fulfilment.ledger import Ledger, PreparedAdmission
from fulfilment.producer import Producer

KEYS = Keys("stops")


class FailingLedger(Ledger):
    """Redis goes away before the third round trip of admissions."""

    round_trips = 0

    def send_admissions(self, prepared: Sequence[PreparedAdmission]) -> list[Any]:
        type(self).round_trips += 1
        if type(self).round_trips >= 3:
            raise redis.ConnectionError("Connection refused")
        return super().send_admissions(prepared)


def test_redis_going_away_mid_file_prints_the_counts_and_where_to_go_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.commands as commands
    import tasks.producer

    ledger = FailingLedger(fakeredis.FakeRedis(), KEYS, 3600)
    started: list[str] = []
    monkeypatch.setattr(tasks.producer, "producer", lambda: Producer(
        ledger, started.append, max_quantity=50, dispatch_many=started.extend))
    monkeypatch.setattr(commands, "_require_durable", lambda: None)
    monkeypatch.setattr(commands, "_destination", lambda: "to nowhere")
    source = tmp_path / "file.jsonl"
    source.write_text("".join(json.dumps({
        "reference": f"s-{n}", "buyer": {"email": "a@example.com"},
        "items": [{"session_id": 1002, "price_type_id": 3, "quantity": 1}]}) + "\n"
        for n in range(1, 11)))
    done = CliRunner().invoke(cli, [
        "submit", "--quiet", "--chunk", "3", str(source)])
    assert done.exit_code == 1, done.output
    assert "Traceback" not in done.stderr
    assert "stopped: ConnectionError talking to Redis or the broker; from line 7 on, " \
           "nothing is known" in done.stderr
    assert done.stdout.splitlines()[-1] == "6 enqueued, 0 duplicates, 0 refused"
    assert "Run the same command again to go on" in done.stderr
    assert started == [f"s-{n}" for n in range(1, 7)]
