"""No secret and no buyer data in any log line, over whole flows with real processes.

A worker (at DEBUG, JSON lines), celery beat (at DEBUG) and the producer
command (``fulfilment -vv submit``) run against real Redis, reached with a
password of its own, and the sandbox with an API key of this test's own. The
flows: purchases confirmed, one failed with its seats released, one through
retries (503, 429, a 500 on pre-confirm, a lost confirm, a revoked token),
one taken in from the Redis-list intake, and two whose Onebox answers echo
the buyer (a proxy in front of the sandbox): one refused at the buyer-data
call and at the release of its seats, one through a 503 there and another on
its confirm. Then every line of the
three, and every result, is searched for the API key, each token Onebox
issued, the Redis password, and each buyer's e-mail, phone and name, as
written and as JSON or a URL would encode them. The scanner itself is shown to
catch a secret planted in a real line.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
import redis

from fulfilment.harness.cluster import Cluster, env_for
from fulfilment.harness.processes import Child, wait_for, worker_args
from fulfilment.redis_text import text as redis_text
from schemas.intent import SeatRef
from schemas.result import dump_result
from tests import services
from tests.deployment import deployment
from tests.echo_proxy import Echo, echo_proxy

pytestmark = pytest.mark.integration

API_KEY = f"sk-logtest-{secrets.token_hex(12)}"
TRACE = re.compile(r"[0-9a-f]{32}")


def buyer(n: int) -> dict[str, str]:
    """Personal data nobody could mistake for anything else in a log."""
    tag = secrets.token_hex(3)
    return {"email": f"leak.probe.{n}.{tag}@example.com",
            "phone": f"+34 6{n:02d} {secrets.randbelow(900) + 100} {secrets.randbelow(900) + 100}",
            "name": f"Zelda{tag}", "surname": f"Quarrington{tag}"}


@pytest.fixture
def redis_password(redis_url: str) -> Iterator[tuple[str, str]]:
    """A Redis user of this test's own with a password; (url with it, the password)."""
    admin = redis.Redis.from_url(redis_url)
    user, password = f"logtest-{secrets.token_hex(4)}", f"pw-{secrets.token_hex(16)}"
    try:
        admin.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=["*"],
                          channels=["*"], commands=["+@all"])
    except redis.ResponseError as exc:  # a Redis without ACLs: nothing to test with
        services.unavailable(f"cannot make a Redis user: {exc}")
    host_part = redis_url.split("//", 1)[1]
    try:
        yield f"redis://{user}:{password}@{host_part}", password
    finally:
        admin.acl_deluser(user)
        admin.close()


def encodings(secret: str) -> set[str]:
    """The ways a secret may be written into a line: as is, JSON-escaped, URL-encoded,
    and a phone number's digits without their separators."""
    forms = {secret, json.dumps(secret)[1:-1], quote(secret, safe=""), quote_plus(secret)}
    if re.fullmatch(r"\+?[\d ().-]{7,}", secret):  # a phone number (not a token that
        forms.add(re.sub(r"\D", "", secret))     # happens to start with a digit)
    return forms


def leaks(logs: dict[str, str], secrets_: dict[str, str]) -> list[str]:
    """Every (log, secret, line) where a secret appears in any of its encodings."""
    found = []
    for log_name, text in logs.items():
        for number, line in enumerate(text.splitlines(), 1):
            for what, secret in secrets_.items():
                if any(form in line for form in encodings(secret)):
                    found.append(f"{log_name}:{number}: {what}: {line[:300]}")
    return found


def intent(reference: str, items: list[dict[str, Any]], person: dict[str, str]) -> dict[str, Any]:
    return {"reference": reference, "items": items, "buyer": person}


def numbered(*seat_ids: int, session: int = 1001) -> dict[str, Any]:
    return {"seats": [{"id": seat, "session_id": session} for seat in seat_ids]}


def auto(quantity: int, price_type: int = 3, session: int = 1002) -> dict[str, Any]:
    return {"session_id": session, "price_type_id": price_type, "quantity": quantity}


def produce(cluster: Cluster, intents: Iterable[dict[str, Any]], name: str) -> str:
    """``fulfilment -vv submit FILE`` as a process of its own; its whole output."""
    path = cluster.tmp / f"{name}.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in intents))
    env = {**clean_env(), **env_for(cluster.settings)}
    done = subprocess.run([sys.executable, "-m", "tasks.commands", "-vv", "submit", str(path),
                           "--batch", name], capture_output=True, text=True, env=env,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("ONEBOX_", "FULFILMENT_"))}


def cached_token(redis_client: redis.Redis, prefix: str) -> str:
    """The access token the workers share, as Onebox issued it (their Redis cache)."""
    def read() -> str | None:
        for key in redis_client.scan_iter(match=f"{prefix}:onebox:token:*"):
            if key.endswith(b":lock"):
                continue
            value = redis_client.hget(key, "access_token")
            if value:
                return redis_text(value)
        return None
    token = wait_for(read, timeout=20, what="the shared Onebox token")
    assert token is not None  # wait_for returns only a truthy value
    return token


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON log lines of a worker's output (its start-up banner is not logging)."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_no_secret_or_buyer_data_in_any_log(redis_url: str, redis_password: tuple[str, str],
                                           prefix: str, tmp_path: Path,
                                           redis_client: redis.Redis,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    url_with_password, password = redis_password
    monkeypatch.setenv("ONEBOX_API_KEY", API_KEY)  # what the sandbox process accepts
    people = {n: buyer(n) for n in range(8)}
    with echo_proxy("http://upstream.invalid") as proxy, \
            deployment(tmp_path, url_with_password, prefix, "--basket-ttl", "3",
                       onebox_api_key=API_KEY, retry_deadline=60, onebox_read_timeout=2.0,
                       lease_ttl=3.0, onebox_api_url=proxy.url) as cluster:
        proxy.upstream = cluster.sandbox.url  # the workers reach the sandbox through it
        # Given seat 5 sold at the box office, a worker and beat at DEBUG
        cluster.sell_at_box_office(SeatRef(id=5, session_id=1001))
        keys = cluster.keys
        env = {**env_for(cluster.settings), "FULFILMENT_LOG_FORMAT": "json"}
        args = worker_args([queue.name for queue in cluster.topology.consumed],
                           f"logs-{prefix}@%h")
        args[args.index("INFO")] = "DEBUG"
        worker = Child(args, tmp_path / "worker.log", env)
        beat = Child([sys.executable, "-m", "celery", "-A", "tasks", "beat", "-l", "DEBUG",
                      "-s", str(tmp_path / "beat-schedule")], tmp_path / "beat.log",
                     env_for(cluster.settings))
        cluster.workers += [worker, beat]

        # When a producer process submits purchases that succeed and one that fails,
        produced = produce(cluster, [
            intent("log-ok-1", [auto(2)], people[0]),
            intent("log-ok-2", [numbered(20, 21)], people[1]),
            intent("log-sold", [numbered(6), numbered(5)], people[2]),
        ], "logs-first")
        # another comes in through the Redis-list intake (drained by beat's task),
        intake = intent("log-intake", [auto(1)], people[3])
        redis_client.lpush(keys.intake, json.dumps(intake))
        first = cluster.collect({"log-ok-1", "log-ok-2", "log-sold", "log-intake"})
        token_before = cached_token(redis_client, prefix)
        # and one goes through retries: a revoked token, a 503, a 429, a 500 on
        # pre-confirm (a new basket) and a confirm whose answer is lost
        assert cluster.sandbox.admin.revoke_tokens() >= 1
        cluster.sandbox.admin.set_faults({"endpoints": {
            "seats_auto": {"script": ["error_503"], "retry_after": 0.2},
            "buyer_data": {"script": ["throttle_429"], "retry_after": 0.2},
            "pre_confirm": {"script": ["error_500"]},
            "confirm": {"script": ["lost_response"]},
        }})
        produced += produce(cluster, [intent("log-retry", [auto(2)], people[4])], "logs-retry")
        retried = cluster.collect({"log-retry"})["log-retry"]
        token_after = cached_token(redis_client, prefix)
        faults = cluster.sandbox.admin.audit()["faults"]
        # and two meet Onebox answers that repeat their buyer data: one refused at the
        # buyer-data call (and its seats' release refused too), one through a 503 there
        # and a 503 on its confirm
        cluster.sandbox.admin.set_faults({})
        proxy.add(Echo("buyer_data", 400, "DIST0005", match=people[6]["email"]),
                  Echo("release", 503, "DIST0000", match=people[6]["email"]),
                  Echo("buyer_data", 503, "DIST0000", match=people[7]["email"]),
                  Echo("confirm", 503, "DIST0000", match=people[7]["email"]))
        produced += produce(cluster, [intent("log-echo-refused", [auto(1)], people[6]),
                                      intent("log-echo-retry", [auto(1)], people[7])],
                            "logs-echo")
        echoed = cluster.collect({"log-echo-refused", "log-echo-retry"})
        inventory = cluster.sandbox.admin.inventory(1001)
    results = "\n".join(json.dumps(dump_result(outcome))
                        for outcomes in cluster.results.values() for outcome in outcomes)
    logs = {"worker": worker.output(), "beat": beat.output(), "producer": produced,
            "results": results}

    # Then the flows went as meant
    assert {r: first[r].status for r in first} == {
        "log-ok-1": "confirmed", "log-ok-2": "confirmed", "log-sold": "failed",
        "log-intake": "confirmed"}
    assert first["log-sold"].error is not None
    assert first["log-sold"].error.code == "ORDER_SEAT_NOT_AVAILABLE"
    assert inventory["seats"]["6"] == "FREE"  # the failed purchase's seat released
    assert retried.status == "confirmed" and retried.attempts > 4
    injected = {"seats_auto": {"error_503"}, "buyer_data": {"throttle_429"},
                "pre_confirm": {"error_500"}, "confirm": {"lost_response"}}
    assert {endpoint: set(faults.get(endpoint, {})) for endpoint in injected} == injected
    assert token_before != token_after  # the revoked token was renewed
    assert proxy.echoed == {"buyer_data": 2, "confirm": 1, "release": 1}
    refused = echoed["log-echo-refused"]
    assert refused.status == "failed" and refused.error is not None
    assert refused.error.code == "DIST0005" and "refused for buyer" in refused.error.message
    assert echoed["log-echo-retry"].status == "confirmed"
    # (Onebox's echoing messages reached the logs, scrubbed)
    echoing = ("buyer_data", "confirm", "release")
    assert {step for step in echoing if f"{step} refused for buyer" in logs["worker"]} == \
        set(echoing)
    # and the logs are there to search: DEBUG lines, every step with its trace id
    worker_lines = json_lines(logs["worker"])
    assert any(line["level"] == "DEBUG" for line in worker_lines)
    assert " DEBUG " in logs["beat"] and " DEBUG " in logs["producer"]
    steps = {(line["reference"], line["step"]) for line in worker_lines
             if line["logger"] == "fulfilment.onebox.client" and line["order_id"]
             and line["attempt"] and TRACE.fullmatch(line["trace"] or "")}
    for step in ("create", "seats", "buyer_data", "pre_confirm", "confirm"):
        assert ("log-retry", step) in steps and ("log-ok-1", step) in steps
    # and Celery's own lines name the intent
    celery_lines = [line for line in worker_lines if line["logger"].startswith("celery.")]
    assert any(line["reference"] == "log-ok-2" and line["message"].endswith(" received")
               for line in celery_lines)
    assert any(line["reference"] == "log-sold" and "succeeded" in line["message"]
               and "failed: ORDER_SEAT_NOT_AVAILABLE" in line["message"]
               for line in celery_lines)
    assert any(line["reference"] == "log-retry" and " retry: " in line["message"]
               for line in celery_lines)

    # And none of them holds a secret or a buyer's e-mail or phone
    hidden = {"API key": API_KEY, "Redis password": password, "token before": token_before,
              "token after": token_after}
    for n, person in people.items():
        hidden |= {f"{what} {n}": value for what, value in person.items()}
    assert leaks(logs, hidden) == []

    # (and the scanner finds one planted in a real line, however it is encoded)
    line = next(text for text in logs["worker"].splitlines() if "log-ok-1" in text)
    for planted in (f"{line} {people[0]['email']}", f"{line} {quote(API_KEY)}",
                    f"{line} tel={re.sub(r'[^0-9]', '', people[1]['phone'])}",
                    json.dumps({"message": f"Bearer {token_after}"})):
        assert len(leaks({**logs, "planted": planted}, hidden)) == 1, planted
