"""Callbacks to shops: signatures, what may be reached, backoff, per-shop URLs, and the
outbox and sender on fakeredis against a real HTTP endpoint on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fakeredis
import pytest

from fulfilment import metrics
from fulfilment.callbacks import (
    DELIVERY_HEADER,
    RESULT_ID_HEADER,
    SIGNATURE_HEADER,
    AllowList,
    CallbackOutbox,
    CallbackRefused,
    CallbackSender,
    SenderConfig,
    backlog,
    backoff,
    signature,
    url_for,
    verify,
)
from fulfilment.config import Settings
from fulfilment.errors import ConfigError
from fulfilment.harness.callback_endpoint import CallbackEndpoint, callback_endpoint
from fulfilment.keys import Keys
from schemas.result import OrderResult, ResultError, result_id_for

SECRET = "callback-secret-0123456789"
KEYS = Keys("cbtest")


# --- signatures ----------------------------------------------------------------------
def test_the_signature_is_t_and_an_hmac_of_the_time_and_the_body() -> None:
    import hashlib
    import hmac

    body = b'{"delivery":1}'
    header = signature(SECRET, body, 1_700_000_000)
    expected = hmac.new(SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"


def test_verify_accepts_the_signed_body_and_nothing_else() -> None:
    body = b'{"delivery":1,"status":"confirmed"}'
    header = signature(SECRET, body, 1000)
    assert verify(SECRET, header, body, now=1000)
    assert verify(SECRET, header, body, tolerance=300, now=1299)
    assert not verify(SECRET, header, body, tolerance=300, now=1301)  # too old: a replay
    assert not verify(SECRET, header, body.replace(b"confirmed", b"failed"), now=1000)
    assert not verify("another-secret-0123456789", header, body, now=1000)
    assert not verify(SECRET, header.replace("t=1000", "t=1001"), body, now=1000)
    assert not verify(SECRET, "v1=" + header.split("v1=")[1], body, now=1000)  # no time
    assert not verify(SECRET, "garbage", body, now=1000)
    # A secret being rotated: either signature will do
    rotated = f"{header},v1={'0' * 64}"
    assert verify(SECRET, rotated, body, now=1000)


# --- what may be reached ---------------------------------------------------------------
@pytest.mark.parametrize("url", [
    "http://shop.example/cb",  # plain http, not listed
    "https://10.1.2.3/cb", "https://127.0.0.1:8443/cb", "https://169.254.169.254/latest",
    "https://[::1]/cb", "https://[::ffff:10.0.0.1]/cb", "https://localhost/cb",
    "https://0.0.0.0/cb", "https://224.0.0.1/cb", "https://100.64.0.1/cb",
])
def test_urls_refused_unless_listed(url: str) -> None:
    with pytest.raises(CallbackRefused):
        AllowList.parse("").check_url(url)


def test_listed_hosts_and_networks_are_allowed() -> None:
    allow = AllowList.parse("127.0.0.1, shop.internal, 10.1.0.0/16, ::1")
    allow.check_url("http://127.0.0.1:9000/cb")
    allow.check_url("http://shop.internal/cb")
    allow.check_url("https://10.1.2.3/cb")
    allow.check_url("https://[::1]/cb")
    allow.check_url("https://shop.example/cb")  # a public name: checked when sent
    with pytest.raises(CallbackRefused):
        allow.check_url("https://10.2.0.1/cb")  # outside the listed network
    with pytest.raises(CallbackRefused):
        allow.check_url("http://10.1.2.3/cb")  # http: only a host listed by name/address


def resolver(*addresses: str) -> Any:
    def resolve(host: str, port: int, type: int = 0) -> list[Any]:
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, type, 6, "", (a, port))
                for a in addresses]
    return resolve


def test_a_name_resolving_to_a_private_address_is_refused_at_send_time() -> None:
    allow = AllowList.parse("")
    assert allow.resolve("shop.example", 443, resolver("93.184.215.14")) == "93.184.215.14"
    for private in ("10.0.0.7", "127.0.0.1", "169.254.169.254", "::1", "fd00::1"):
        with pytest.raises(CallbackRefused, match="private"):
            allow.resolve("shop.example", 443, resolver(private))
    # One bad address among good ones is enough to refuse (the connection could take it)
    with pytest.raises(CallbackRefused):
        allow.resolve("shop.example", 443, resolver("93.184.215.14", "10.0.0.7"))
    # Listed by name, or its network listed: allowed
    assert AllowList.parse("shop.example").resolve(
        "shop.example", 443, resolver("10.0.0.7")) == "10.0.0.7"
    assert AllowList.parse("10.0.0.0/8").resolve(
        "shop.example", 443, resolver("10.0.0.7")) == "10.0.0.7"


# --- start-up ---------------------------------------------------------------------------
def test_start_up_refuses_callbacks_without_a_secret_or_to_a_forbidden_host() -> None:
    good = {"FULFILMENT_CALLBACK_URL": "https://shop.example/cb",
            "FULFILMENT_CALLBACK_SECRET": SECRET}
    assert Settings.from_env(good).callback_routes == {None: "https://shop.example/cb"}
    with pytest.raises(ConfigError, match="FULFILMENT_CALLBACK_SECRET must be set"):
        Settings.from_env({"FULFILMENT_CALLBACK_URL": "https://shop.example/cb"})
    with pytest.raises(ConfigError, match="FULFILMENT_CALLBACK_SECRET must be set"):
        Settings.from_env({"FULFILMENT_CALLBACK_URLS": "s1=https://shop.example/cb"})
    with pytest.raises(ConfigError, match=r"FULFILMENT_CALLBACK_URL=.*plain http"):
        Settings.from_env({**good, "FULFILMENT_CALLBACK_URL": "http://shop.example/cb"})
    with pytest.raises(ConfigError, match=r"FULFILMENT_CALLBACK_URLS \(s2\).*private"):
        Settings.from_env({**good, "FULFILMENT_CALLBACK_URLS": "s2=https://192.168.1.9/cb"})
    with pytest.raises(ConfigError, match="shop=url pairs"):
        Settings.from_env({**good, "FULFILMENT_CALLBACK_URLS": "https://shop.example/cb"})
    allowed = Settings.from_env({**good, "FULFILMENT_CALLBACK_URL": "http://127.0.0.1:9/cb",
                                 "FULFILMENT_CALLBACK_ALLOW": "127.0.0.1"})
    assert allowed.callback_routes == {None: "http://127.0.0.1:9/cb"}
    assert SECRET not in repr(allowed)


def test_a_worker_with_a_callback_url_and_no_secret_stops_with_exit_78() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-P", "solo"],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "FULFILMENT_CALLBACK_URL": "https://shop.example/cb"},
        cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 78, done.stderr
    assert done.stderr.strip().count("\n") == 0
    assert "FULFILMENT_CALLBACK_SECRET must be set" in done.stderr


# --- schedule and routes -------------------------------------------------------------------
def test_backoff_doubles_from_one_second_to_the_cap() -> None:
    assert [backoff(n, 60) for n in range(9)] == [0, 1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff(1000, 60) == 60
    assert [backoff(n, 2.5) for n in (1, 2, 3, 4)] == [1, 2, 2.5, 2.5]


def test_a_shop_with_its_own_url_gets_it_the_others_the_deployments() -> None:
    routes = {None: "https://all.example/cb", "s1": "https://s1.example/cb"}
    assert url_for(routes, "s1") == "https://s1.example/cb"
    assert url_for(routes, "s2") == "https://all.example/cb"
    assert url_for(routes, None) == "https://all.example/cb"
    assert url_for({"s1": "https://s1.example/cb"}, "s2") is None


# --- the outbox and the sender (fakeredis, a real endpoint on loopback) -------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def outcome(reference: str, status: str = "confirmed", shop: str | None = None) -> OrderResult:
    moment = datetime(2026, 1, 1, tzinfo=UTC)
    if status == "confirmed":
        return OrderResult(result_id_for(reference), reference, status, order_code="ABC",
                           order_id="1", submitted_at=moment, finished_at=moment, shop=shop)
    return OrderResult(result_id_for(reference), reference, status, order_id="1",
                       error=ResultError("READ_TIMEOUT", "no answer"), submitted_at=moment,
                       finished_at=moment, shop=shop)


@pytest.fixture
def endpoint() -> Iterator[CallbackEndpoint]:
    with callback_endpoint() as running:
        yield running


@pytest.fixture
def fresh_metrics() -> Iterator[metrics.Metrics]:
    mine = metrics.Metrics()
    metrics.install(mine)
    yield mine
    metrics.install(None)


def hold_of(world: World, url: str) -> dict[str, Any]:
    raw = world.redis.hget(KEYS.callbacks("hold"), url)
    assert isinstance(raw, bytes)
    return dict(json.loads(raw))


class World:
    def __init__(self, routes: dict[str | None, str], allow: str = "127.0.0.1",
                 keep_for: float = 3600) -> None:
        self.redis = fakeredis.FakeRedis()
        self.clock = Clock()
        self.outbox = CallbackOutbox(self.redis, KEYS, routes, self.clock)
        self.config = SenderConfig(routes, SECRET, AllowList.parse(allow), keep_for,
                                   timeout=2.0, max_delay=60.0)

    def run(self) -> Any:
        return CallbackSender(self.redis, KEYS, self.config, self.clock).run()


def test_an_outcome_is_posted_signed_with_its_result_id(endpoint: CallbackEndpoint,
                                                        fresh_metrics: metrics.Metrics) -> None:
    world = World({None: endpoint.url})
    result = outcome("cb-1")
    assert world.outbox.add(result) == 1
    report = world.run()
    assert report.delivered == 1
    [got] = endpoint.snapshot()
    assert got.path == "/outcomes"
    assert got.headers[RESULT_ID_HEADER] == result.result_id
    assert got.headers[DELIVERY_HEADER] == "1"
    assert verify(SECRET, got.headers[SIGNATURE_HEADER], got.body, now=world.clock.now)
    body = json.loads(got.body)
    assert body["delivery"] == 1 and body["status"] == "confirmed" and body["final"] is True
    assert body["result"]["order_code"] == "ABC"
    assert fresh_metrics.callbacks_delivered._value.get() == 1
    assert world.redis.zcard(KEYS.callbacks("due")) == 0  # nothing left behind
    assert world.redis.hlen(KEYS.callbacks("body")) == 0


def test_the_same_outcome_queued_twice_is_one_callback_a_settled_one_is_another(
        endpoint: CallbackEndpoint) -> None:
    world = World({None: endpoint.url})
    assert world.outbox.add(outcome("cb-2", "unsettled")) == 1
    assert world.outbox.add(outcome("cb-2", "unsettled")) == 0  # a publish retried
    assert world.outbox.add(outcome("cb-2", "confirmed")) == 2  # settled later
    world.run()
    sent = [json.loads(body) for body in endpoint.bodies()]
    assert [(s["delivery"], s["status"], s["final"]) for s in sent] == [
        (1, "unsettled", False), (2, "confirmed", True)]
    assert len({s["result_id"] for s in sent}) == 1


def test_no_url_for_the_shop_queues_nothing() -> None:
    world = World({"s1": "https://s1.example/cb"})
    assert world.outbox.add(outcome("cb-3", shop="s2")) is None
    assert world.redis.zcard(KEYS.callbacks("due")) == 0


def test_per_shop_urls_receive_their_own_shops_outcomes() -> None:
    with callback_endpoint() as general, callback_endpoint() as own:
        world = World({None: general.url, "s1": own.url})
        world.outbox.add(outcome("cb-s1", shop="s1"))
        world.outbox.add(outcome("cb-s2", shop="s2"))
        world.outbox.add(outcome("cb-none"))
        assert world.run().delivered == 3
        assert [json.loads(b)["reference"] for b in own.bodies()] == ["cb-s1"]
        assert sorted(json.loads(b)["reference"] for b in general.bodies()) == [
            "cb-none", "cb-s2"]


def test_a_failing_endpoint_is_held_with_backoff_and_gets_everything_when_back(
        endpoint: CallbackEndpoint, fresh_metrics: metrics.Metrics) -> None:
    world = World({None: endpoint.url})
    endpoint.down("503")
    for i in range(5):
        world.outbox.add(outcome(f"cb-down-{i}"))
    # One try (the first callback) fails: the endpoint is held 1 s, the rest wait unsent
    report = world.run()
    assert (report.delivered, report.failed) == (0, 1)
    assert endpoint.refused == 1
    hold = hold_of(world, endpoint.url)
    assert hold["failures"] == 1 and hold["until"] == world.clock.now + 1
    # Within the hold nothing is sent, whatever is added
    world.outbox.add(outcome("cb-down-5"))
    report = world.run()
    assert (report.delivered, report.failed, endpoint.refused) == (0, 0, 1)
    # Each failure doubles the hold: 1, 2, 4
    for expected in (2, 4):
        world.clock.now += 60
        world.run()
        hold = hold_of(world, endpoint.url)
        assert hold["until"] - world.clock.now == expected
    assert endpoint.refused == 3
    waiting = backlog(world.redis, KEYS, world.clock.now)
    assert waiting.pending == 6 and waiting.oldest_age == 120
    assert list(waiting.failing) == [endpoint.url.rsplit("/", 1)[0]]
    # When it is back, the next try after the hold delivers every one, in order
    endpoint.up()
    world.clock.now += 4
    assert world.run().delivered == 6
    assert [json.loads(b)["reference"] for b in endpoint.bodies()] == [
        f"cb-down-{i}" for i in range(6)]
    assert world.redis.hlen(KEYS.callbacks("hold")) == 0
    assert fresh_metrics.callback_failures.labels("http_503")._value.get() == 3


def test_a_closed_port_is_a_connection_error_and_holds_the_endpoint(
        endpoint: CallbackEndpoint, fresh_metrics: metrics.Metrics) -> None:
    world = World({None: endpoint.url})
    endpoint.down("closed")
    world.outbox.add(outcome("cb-closed"))
    assert world.run().failed == 1
    assert fresh_metrics.callback_failures.labels("connection_error")._value.get() == 1
    endpoint.up()
    world.clock.now += 1
    assert world.run().delivered == 1


def test_one_endpoint_down_does_not_hold_back_another() -> None:
    with callback_endpoint() as dead, callback_endpoint() as alive:
        dead.down("closed")
        world = World({"dead": dead.url, "alive": alive.url})
        for i in range(3):
            world.outbox.add(outcome(f"cb-dead-{i}", shop="dead"))
            world.outbox.add(outcome(f"cb-alive-{i}", shop="alive"))
        report = world.run()
        assert (report.delivered, report.failed) == (3, 1)
        assert len(alive.bodies()) == 3


def test_a_refused_address_is_never_connected_to(endpoint: CallbackEndpoint,
                                                 fresh_metrics: metrics.Metrics) -> None:
    # An https URL whose name resolves (at send time) to this machine, which is not listed
    world = World({None: f"https://shop.example:{endpoint.port}/outcomes"}, allow="")
    world.outbox.add(outcome("cb-ssrf"))
    sender = CallbackSender(world.redis, KEYS, world.config, world.clock,
                            resolver=resolver("127.0.0.1"))
    assert sender.run().failed == 1
    assert endpoint.connections == 0
    assert fresh_metrics.callback_failures.labels("refused")._value.get() == 1


def test_a_callback_not_delivered_in_time_is_dropped_and_counted(
        endpoint: CallbackEndpoint, fresh_metrics: metrics.Metrics,
        caplog: pytest.LogCaptureFixture) -> None:
    world = World({None: endpoint.url}, keep_for=30)
    endpoint.down("503")
    world.outbox.add(outcome("cb-late"))
    world.run()
    world.clock.now += 31
    report = world.run()
    assert report.dropped == 1
    assert world.redis.zcard(KEYS.callbacks("due")) == 0
    assert fresh_metrics.callbacks_dropped.labels("expired")._value.get() == 1
    assert "dropped" in caplog.text and "still on the results queue" in caplog.text


def test_a_callback_the_endpoint_refuses_backs_off_alone(endpoint: CallbackEndpoint) -> None:
    world = World({None: endpoint.url})
    # The endpoint answers 400 to one callback (a bug at the shop), 200 to the others
    endpoint.status_for = lambda body: 400 if b"cb-bad" in body else 200
    world.outbox.add(outcome("cb-bad"))
    world.outbox.add(outcome("cb-good"))
    report = world.run()
    assert (report.delivered, report.failed) == (1, 1)
    assert world.redis.hlen(KEYS.callbacks("hold")) == 0  # the endpoint is not held
    member = f"{result_id_for('cb-bad')}:confirmed"
    assert world.redis.zscore(KEYS.callbacks("due"), member) == world.clock.now + 1
    world.clock.now += 1
    endpoint.status_for = None
    assert world.run().delivered == 1


# --- visible: health and the scrape-time gauges ---------------------------------------------
def test_health_is_degraded_once_the_oldest_callback_waited_too_long(
        endpoint: CallbackEndpoint) -> None:
    from fulfilment.health import DEGRADED, OK, _check_callbacks, callback_stale_after

    settings = Settings.defaults().with_overrides(
        key_prefix=KEYS.prefix, callback_url=endpoint.url, callback_secret=SECRET,
        callback_allow="127.0.0.1")
    world = World({None: endpoint.url})
    endpoint.down("503")
    world.outbox.add(outcome("cb-health"))
    world.run()
    stale = callback_stale_after(settings)
    assert stale == 300
    check = _check_callbacks(settings, KEYS, world.redis, world.clock.now + stale)
    assert check.status == OK and check.data["pending"] == 1
    assert f"127.0.0.1:{endpoint.port} failing" in check.detail
    check = _check_callbacks(settings, KEYS, world.redis, world.clock.now + stale + 1)
    assert check.status == DEGRADED, check
    assert "older than 300 s" in check.detail


def test_the_collector_reports_the_backlog_its_age_and_failing_endpoints(
        endpoint: CallbackEndpoint) -> None:
    from fulfilment.metrics_collector import RedisCollector

    world = World({None: endpoint.url})
    endpoint.down("closed")
    world.outbox.add(outcome("cb-scrape"))
    world.run()
    collector = RedisCollector(world.redis, KEYS, breaker_key=None)
    seconds = int(world.redis.time()[0])
    world.redis.zadd(KEYS.callbacks("since"), {f"{result_id_for('cb-scrape')}:confirmed":
                                               seconds - 42})
    gauges = {m.name: m.samples[0].value for m in collector.collect()
              if m.name.startswith("fulfilment_callback") or "callback" in m.name}
    assert gauges["fulfilment_callbacks_pending"] == 1
    assert 41 <= gauges["fulfilment_oldest_callback_age_seconds"] <= 44
    assert gauges["fulfilment_callback_endpoints_failing"] == 1
