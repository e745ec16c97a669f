"""Onebox's webhooks in (issue 17, item 4): signature schemes, the receiver's checks and
its dedupe, and the task's once-only after-sale publishing, on fakeredis."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
from dataclasses import dataclass, field
from typing import Any, cast

import fakeredis
import pytest
from click.testing import CliRunner

import tasks.commands  # noqa: F401  (adds the console script's commands to the group)
from fulfilment.cli import cli
from fulfilment.config import Settings, settings_report
from fulfilment.errors import ConfigError, TransientError
from fulfilment.flow import Services
from fulfilment.keys import Keys
from fulfilment.ledger import Ledger
from fulfilment.webhooks import actions, signature
from fulfilment.webhooks.dedupe import Dedupe
from fulfilment.webhooks.notice import Notice, NoticeError
from fulfilment.webhooks.receiver import MAX_BODY, PATH, WebhookReceiver
from schemas.aftersale import AftersaleEvent, aftersale_id_for, dump_aftersale, load_aftersale
from schemas.intent import load_intent

SECRET = "whsec-Unit-7f3a"
PREFIX = "wh-unit"
NOW = 1_780_000_000.0


# --- signature schemes ------------------------------------------------------------------

BODY = b'{"code":"AX59SJ29392X","url":"https://api.oneboxtds.com/orders-mgmt-api/v1/orders/AX59SJ29392X"}'
HEX = hmac.new(SECRET.encode(), BODY, hashlib.sha256).hexdigest()
B64 = base64.b64encode(hmac.new(SECRET.encode(), BODY, hashlib.sha256).digest()).decode()


@pytest.mark.parametrize(("scheme", "header"), [
    ("hmac-sha256", HEX),
    ("hmac-sha256", HEX.upper()),
    ("hmac-sha256", f"sha256={HEX}"),
    ("hmac-sha256", f"SHA256={HEX}"),
    ("hmac-sha256-base64", B64),
    ("hmac-sha256-base64", f"sha256={B64}"),
])
def test_a_signature_made_with_the_secret_is_accepted(scheme: str, header: str) -> None:
    assert signature.verify(scheme, SECRET, BODY, header)
    assert signature.sign(scheme, SECRET, BODY) in {HEX, B64}


@pytest.mark.parametrize("scheme", ["hmac-sha256", "hmac-sha256-base64"])
@pytest.mark.parametrize("header", [
    None, "", "   ", "sha256=", "not-a-digest", "é" * 64, "a" * 1000,
    hmac.new(b"another-secret", BODY, hashlib.sha256).hexdigest(),
])
def test_a_missing_or_forged_signature_is_refused(scheme: str, header: str | None) -> None:
    assert not signature.verify(scheme, SECRET, BODY, header)


def test_a_signature_of_another_body_or_scheme_or_with_no_secret_is_refused() -> None:
    assert not signature.verify("hmac-sha256", SECRET, BODY + b" ", HEX)
    assert not signature.verify("hmac-sha256-base64", SECRET, BODY, HEX)
    assert not signature.verify("hmac-sha256", SECRET, BODY, B64)
    # An empty secret never verifies, even against a digest made with the empty key
    empty = hmac.new(b"", BODY, hashlib.sha256).hexdigest()
    assert not signature.verify("hmac-sha256", "", BODY, empty)


def test_none_accepts_anything_and_signs_nothing() -> None:
    assert signature.verify("none", "", BODY, None)
    assert signature.sign("none", SECRET, BODY) is None
    with pytest.raises(ValueError, match="unknown signature scheme"):
        signature.verify("md5", SECRET, BODY, HEX)


# --- the receiver -----------------------------------------------------------------------

@dataclass
class Answer:
    status: int
    document: dict[str, Any]


@dataclass
class Receiving:
    """A receiver on fakeredis whose hand-over records the notices (or fails on demand)."""

    client: fakeredis.FakeRedis
    receiver: WebhookReceiver
    handed: list[Notice] = field(default_factory=list)
    failing: bool = False

    def call(self, body: bytes, headers: dict[str, str], *, method: str = "POST",
             path: str = PATH) -> Answer:
        environ: dict[str, Any] = {
            "REQUEST_METHOD": method, "PATH_INFO": path, "CONTENT_LENGTH": str(len(body)),
            "wsgi.input": io.BytesIO(body),
            **{f"HTTP_{name.upper().replace('-', '_')}": value for name, value in headers.items()}}
        started: list[str] = []

        def start_response(status: str, headers: list[tuple[str, str]],
                           exc_info: Any = None) -> Any:
            started.append(status)
            return lambda _: None

        chunks = self.receiver(environ, start_response)
        document = json.loads(b"".join(chunks))
        return Answer(int(started[0].split()[0]), document)

    def post(self, action: str, code: str = "AX59SJ29392X", *, delivery: str = "d-1",
             sign_with: str | None = SECRET, body: bytes | None = None) -> Answer:
        raw = body if body is not None else json.dumps(
            {"code": code, "url": f"https://api.oneboxtds.com/orders-mgmt-api/v1/orders/{code}"}
        ).encode()
        headers = {"ob-event": "ORDER", "ob-action": action, "ob-delivery-id": delivery,
                   "ob-hook-id": "hook-1"}
        if sign_with is not None:
            headers["ob-signature"] = hmac.new(sign_with.encode(), raw,
                                               hashlib.sha256).hexdigest()
        return self.call(raw, headers)


@pytest.fixture
def receiving() -> Receiving:
    client = fakeredis.FakeRedis()
    state = Receiving(client, cast(WebhookReceiver, None))

    def hand_over(notice: Notice) -> None:
        if state.failing:
            raise ConnectionError("broker down")
        state.handed.append(notice)

    state.receiver = WebhookReceiver(scheme="hmac-sha256", secret=SECRET,
                                     dedupe=Dedupe(client, Keys(PREFIX), 3600),
                                     hand_over=hand_over, clock=lambda: NOW)
    return state


def test_a_webhook_delivered_three_times_with_three_delivery_ids_is_handed_over_once(
        receiving: Receiving) -> None:
    answers = [receiving.post("REFUND", delivery=f"d-{n}").document["status"] for n in (1, 2, 3)]
    assert answers == ["accepted", "duplicate", "duplicate"]
    assert receiving.handed == [Notice(action="REFUND", code="AX59SJ29392X", received_at=NOW,
                                       delivery_id="d-1")]
    # Another action on the same order is another webhook
    assert receiving.post("CANCEL", delivery="d-4").document["status"] == "accepted"
    assert [n.action for n in receiving.handed] == ["REFUND", "CANCEL"]
    ttl = receiving.client.ttl(Keys(PREFIX).webhook_seen("AX59SJ29392X", "REFUND"))
    assert 0 < ttl <= 3600


@pytest.mark.parametrize("sign_with", [None, "another-secret"], ids=["unsigned", "forged"])
def test_an_unsigned_or_forged_webhook_is_refused_with_401_and_changes_nothing(
        receiving: Receiving, sign_with: str | None) -> None:
    answer = receiving.post("REFUND", sign_with=sign_with)
    assert (answer.status, answer.document) == (401, {"error": "missing or wrong ob-signature"})
    assert receiving.handed == []
    assert receiving.client.keys("*") == []
    # A properly signed delivery of it afterwards is the first one
    assert receiving.post("REFUND").document["status"] == "accepted"


def test_a_failed_hand_over_answers_503_and_marks_nothing_so_the_retry_is_taken(
        receiving: Receiving) -> None:
    receiving.failing = True
    assert receiving.post("CANCEL", delivery="d-1").status == 503
    assert receiving.client.keys("*") == []
    receiving.failing = False
    answer = receiving.post("CANCEL", delivery="d-2")
    assert (answer.status, answer.document["status"]) == (200, "accepted")
    assert [n.delivery_id for n in receiving.handed] == ["d-2"]


def test_redis_unreachable_answers_503_and_hands_nothing_over() -> None:
    handed: list[Notice] = []
    server = fakeredis.FakeServer()
    server.connected = False  # every command raises ConnectionError
    down = fakeredis.FakeRedis(server=server)
    receiver = Receiving(fakeredis.FakeRedis(), WebhookReceiver(
        scheme="hmac-sha256", secret=SECRET, dedupe=Dedupe(down, Keys(PREFIX), 60),
        hand_over=handed.append, clock=lambda: NOW))
    assert receiver.post("REFUND").status == 503
    assert handed == []


def test_actions_nobody_acts_on_are_acknowledged_only(receiving: Receiving) -> None:
    for action in ("PRINT", "BOOKING", "RELOCATE"):
        answer = receiving.post(action)
        assert (answer.status, answer.document["status"]) == (200, "ignored")
    assert receiving.handed == [] and receiving.client.keys("*") == []


@pytest.mark.parametrize(("headers", "body"), [
    ({}, b'{"code":"AX59SJ29392X"}'),  # no ob-action
    ({"ob-action": "refund; drop"}, b'{"code":"AX59SJ29392X"}'),
    ({"ob-action": "REFUND"}, b'{"url":"x"}'),  # no code
    ({"ob-action": "REFUND"}, b'{"code":"AX59 SJ2"}'),
    ({"ob-action": "REFUND"}, b'["AX59SJ29392X"]'),
    ({"ob-action": "REFUND"}, b"not json"),
])
def test_a_signed_but_malformed_webhook_is_400_and_changes_nothing(
        receiving: Receiving, headers: dict[str, str], body: bytes) -> None:
    signed = {**headers, "ob-signature": hmac.new(SECRET.encode(), body,
                                                  hashlib.sha256).hexdigest()}
    assert receiving.call(body, signed).status == 400
    assert receiving.handed == [] and receiving.client.keys("*") == []


def test_a_body_over_the_limit_is_413_before_anything_is_checked(receiving: Receiving) -> None:
    assert receiving.post("REFUND", body=b"x" * (MAX_BODY + 1)).status == 413
    assert receiving.handed == []


def test_health_and_other_paths(receiving: Receiving) -> None:
    assert receiving.call(b"", {}, method="GET", path="/healthz").document == {"ok": True}
    assert receiving.call(b"", {}, method="GET").status == 405
    assert receiving.call(b"", {}, path="/other").status == 404


def test_the_notice_keeps_identifiers_only(receiving: Receiving) -> None:
    raw = b'{"code":"AX59SJ29392X","url":"u"}'
    digest = hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
    receiving.call(raw, {"ob-action": "refund", "ob-subtype": "PARTIAL",
                         "ob-delivery-id": "<script>", "ob-signature": f"sha256={digest}"})
    [notice] = receiving.handed
    assert notice == Notice(action="REFUND", code="AX59SJ29392X", received_at=NOW,
                            delivery_id=None, subtype="PARTIAL")
    assert Notice.from_dict(json.loads(json.dumps(notice.to_dict()))) == notice
    for bad in ({"action": "REFUND"}, {**notice.to_dict(), "extra": 1},
                {**notice.to_dict(), "code": "a b"}, {**notice.to_dict(), "received_at": "x"}):
        with pytest.raises(NoticeError):
            Notice.from_dict(bad)


# --- the task's actions ------------------------------------------------------------------

class Publisher:
    def __init__(self) -> None:
        self.events: list[AftersaleEvent] = []

    def publish_aftersale(self, event: AftersaleEvent) -> None:
        self.events.append(event)


@dataclass
class Acting:
    services: Services
    publisher: Publisher
    client: fakeredis.FakeRedis


@pytest.fixture
def acting() -> Acting:
    client = fakeredis.FakeRedis()
    ledger = Ledger(client, Keys(PREFIX), 3600, clock=lambda: NOW)
    publisher = Publisher()
    settings = Settings.defaults().with_overrides(key_prefix=PREFIX, ledger_retention=3600)
    # Only what the after-sale actions read: the ledger, the publisher, the settings.
    services = cast(Services, type("S", (), {"ledger": ledger, "publisher": publisher,
                                             "settings": settings})())
    return Acting(services, publisher, client)


def notice(action: str, code: str = "AX59SJ29392X", subtype: str | None = None) -> Notice:
    return Notice(action=action, code=code, received_at=NOW, delivery_id="d", subtype=subtype)


def test_an_after_sale_event_is_published_once_per_code_and_action(acting: Acting) -> None:
    # The receiver may hand one webhook over more than once (see its docstring)
    assert [actions.act(acting.services, notice("CANCEL")) for _ in range(3)] == [
        "published", "duplicate", "duplicate"]
    assert actions.act(acting.services, notice("REFUND", subtype="PARTIAL")) == "published"
    cancel, refund = acting.publisher.events
    assert (cancel.action, refund.action, refund.subtype) == ("cancel", "refund", "PARTIAL")
    assert cancel.event_id == aftersale_id_for("AX59SJ29392X", "cancel") != refund.event_id
    assert (cancel.reference, cancel.shop) == (None, None)  # not an order of ours


def test_an_event_names_the_intent_and_shop_when_the_order_is_ours(acting: Acting) -> None:
    ledger = acting.services.ledger
    ledger.admit(load_intent({"reference": "ref-9", "shop": "web-7",
                              "buyer": {"email": "ana@example.com"},
                              "items": [{"session_id": 1002, "price_type_id": 3,
                                         "quantity": 1}]}))
    ledger.index_code("ref-9", "ZZ11")
    actions.act(acting.services, notice("REFUND", code="ZZ11"))
    [event] = acting.publisher.events
    assert (event.reference, event.shop, event.order_code) == ("ref-9", "web-7", "ZZ11")
    assert load_aftersale(dump_aftersale(event)) == event
    assert "ana@example.com" not in json.dumps(dump_aftersale(event))


def test_while_another_worker_publishes_the_task_is_retried(acting: Acting) -> None:
    acting.client.set(Keys(PREFIX).aftersale_lock("AX59SJ29392X", "CANCEL"), "theirs")
    with pytest.raises(TransientError, match="another worker"):
        actions.act(acting.services, notice("CANCEL"))
    assert acting.publisher.events == []
    assert acting.client.get(Keys(PREFIX).aftersale_lock("AX59SJ29392X", "CANCEL")) == b"theirs"


def test_a_purchase_of_an_order_not_ours_is_nothing_to_do(acting: Acting) -> None:
    assert actions.act(acting.services, notice("PURCHASE")) == "unknown order"
    assert actions.act(acting.services, notice("PRINT")) == "ignored"
    assert acting.publisher.events == []


# --- settings --------------------------------------------------------------------------

def test_the_secret_is_never_shown_and_none_is_refused_against_the_real_onebox() -> None:
    env = {"FULFILMENT_WEBHOOK_SECRET": SECRET}
    lines, problems = settings_report(env)
    assert problems == [] and "FULFILMENT_WEBHOOK_SECRET = <secret>" in lines
    assert SECRET not in repr(Settings.from_env(env))
    with pytest.raises(ConfigError, match="FULFILMENT_WEBHOOK_SIGNATURE=none"):
        Settings.from_env({"FULFILMENT_WEBHOOK_SIGNATURE": "none",
                           "ONEBOX_API_URL": "https://api.oneboxtds.com",
                           "ONEBOX_API_KEY": "real-key"})
    assert Settings.from_env({"FULFILMENT_WEBHOOK_SIGNATURE": "none"}).webhook_signature == "none"
    with pytest.raises(ConfigError, match="FULFILMENT_WEBHOOK_SIGNATURE"):
        Settings.from_env({"FULFILMENT_WEBHOOK_SIGNATURE": "md5"})
    for bad in ("9660", "0.0.0.0", "host:port", "0.0.0.0:70000", "http://x:1"):
        with pytest.raises(ConfigError, match="FULFILMENT_WEBHOOKS_ADDRESS"):
            Settings.from_env({"FULFILMENT_WEBHOOKS_ADDRESS": bad})
    ipv6 = Settings.from_env({"FULFILMENT_WEBHOOKS_ADDRESS": "[::1]:0"})
    assert ipv6.webhooks_address == "[::1]:0"


def test_the_receiver_will_not_start_without_its_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FULFILMENT_WEBHOOK_SECRET", raising=False)
    monkeypatch.delenv("FULFILMENT_WEBHOOK_SECRET_FILE", raising=False)
    done = CliRunner().invoke(cli, ["webhooks", "--address", "127.0.0.1:0"])
    assert done.exit_code == 1
    assert "needs the secret: set FULFILMENT_WEBHOOK_SECRET" in done.output
