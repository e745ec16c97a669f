"""``fulfilment sandbox``: run the sandbox as a process of its own.

It prints exactly one line, ``sandbox listening on http://HOST:PORT``, once it
listens, so a parent process (a benchmark, a chaos test) can read the port it
picked with ``--port 0``. SIGTERM or SIGINT stop it cleanly.

Its port is, by default, the one ``ONEBOX_API_URL`` names, so that one
variable moves the sandbox and the workers that call it together. It listens
on 127.0.0.1 unless told otherwise. When a sandbox already answers on that
port (a second ``honcho start``, a demo left running), this process stands by
instead of exiting, and takes over if that one stops: under honcho, an exiting
process stops every other, the workers included. The API key it accepts comes
from ``ONEBOX_API_KEY`` or ``ONEBOX_API_KEY_FILE``, never from the command line
(which any user of the machine can read in ``ps``); so does the secret its
webhooks are signed with (``FULFILMENT_WEBHOOK_SECRET`` or its ``_FILE``, the
receiver's own setting), sent to ``--webhook-url`` when one is given.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

import click
import requests

from fulfilment.config import env_value
from fulfilment.errors import ConfigError
from fulfilment.sandbox import serve_forever
from fulfilment.sandbox.api import SandboxOptions
from fulfilment.sandbox.behaviour import Behaviour, BehaviourError
from fulfilment.sandbox.catalogue import Catalogue, CatalogueError
from fulfilment.sandbox.faults import FaultPlan
from fulfilment.sandbox.webhooks import WebhookConfigError, WebhookTarget


def _load_faults(value: str) -> FaultPlan:
    """A fault plan from inline JSON (starts with ``{``) or from a file."""
    text = value if value.lstrip().startswith("{") else Path(value).read_text("utf-8")
    return FaultPlan.from_dict(json.loads(text))


#: The port when ``ONEBOX_API_URL`` names none.
DEFAULT_PORT = 8650
#: Seconds between two looks, while standing by, at the sandbox that holds the port.
STANDBY_POLL = 2.0


def port_of_api_url() -> int:
    """The port ``ONEBOX_API_URL`` names when it is plain http with a port, else 8650."""
    try:
        parts = urlsplit(env_value("ONEBOX_API_URL"))
        port = parts.port
    except (ConfigError, ValueError):
        return DEFAULT_PORT
    return port if parts.scheme == "http" and port is not None else DEFAULT_PORT


def _sandbox_answers(host: str, port: int) -> bool:
    """Whether what listens on ``host:port`` is a sandbox (its health check answers)."""
    near = "127.0.0.1" if host in {"", "0.0.0.0"} else "::1" if host == "::" else host  # noqa: S104
    url = f"http://[{near}]:{port}" if ":" in near else f"http://{near}:{port}"
    try:
        answer = requests.get(f"{url}/__sandbox/health", timeout=1.0)
        return answer.status_code == 200 and bool(answer.json().get("ok"))
    except (requests.RequestException, ValueError, AttributeError):
        return False


def _stand_by(host: str, port: int) -> bool:
    """Wait while another sandbox answers on the port; True if SIGTERM or SIGINT came."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop.wait(STANDBY_POLL):
            if not _sandbox_answers(host, port):
                return False
        return True
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@click.command("sandbox")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback: only this machine can call it).")
@click.option("--port", default=None, type=int,
              help="Port to listen on; 0 picks a free one. [default: the port of "
                   f"ONEBOX_API_URL, else {DEFAULT_PORT}]")
@click.option("--catalogue", "catalogue_path", type=click.Path(exists=True, dir_okay=False),
              help="Catalogue JSON file (default: the bundled catalogue).")
@click.option("--faults", "faults_spec", help="Fault plan: a JSON file or inline JSON.")
@click.option("--channel-id", default=lambda: env_value("ONEBOX_CHANNEL_ID"),
              show_default="env ONEBOX_CHANNEL_ID or sandbox-channel",
              help="The channel id the token endpoint accepts.")
@click.option("--token-ttl", default=43199.0, show_default=True, type=float,
              help="Seconds a token lives.")
@click.option("--basket-ttl", default=600.0, show_default=True, type=float,
              help="Seconds an untouched basket lives.")
@click.option("--seed", type=int, default=None, help="Seed for ids and random faults.")
@click.option("--behaviour", "switches", multiple=True, metavar="KEY=VALUE",
              help="Set a switch where the real API is unknown (repeatable), e.g. "
                   "--behaviour repeat_status_call=idempotent; see docs/sandbox.md, "
                   f"Switches. Keys: {', '.join(Behaviour.keys())}.")
@click.option("--webhook-url", default="",
              help="Send Onebox's webhooks here (PURCHASE on confirm, REFUND, CANCEL), signed "
                   "with FULFILMENT_WEBHOOK_SECRET as the webhook_signature switch says "
                   "[default: none sent].")
@click.option("--webhook-retries", default=3, show_default=True, type=click.IntRange(0, 10),
              help="Sends after a failed one, each with a new delivery id; then dropped.")
@click.option("--webhook-backoff", default=(1.0, 10.0), show_default=True, type=(float, float),
              metavar="MIN MAX", help="Seconds before the first retry (doubled each retry) "
                                      "and at most.")
def sandbox(*, host: str, port: int | None, catalogue_path: str | None,
            faults_spec: str | None, channel_id: str, token_ttl: float, basket_ttl: float,
            seed: int | None, switches: tuple[str, ...], webhook_url: str,
            webhook_retries: int, webhook_backoff: tuple[float, float]) -> None:
    """Serve the Onebox sandbox until SIGTERM or SIGINT.

    The token endpoint accepts the key in ONEBOX_API_KEY (or the file
    ONEBOX_API_KEY_FILE names), default sandbox-api-key.
    """
    try:
        api_key = env_value("ONEBOX_API_KEY")
        webhook_secret = env_value("FULFILMENT_WEBHOOK_SECRET") if webhook_url else ""
    except ConfigError as exc:
        raise click.ClickException(exc.message) from None
    try:
        webhooks = WebhookTarget(url=webhook_url, secret=webhook_secret,
                                 retries=webhook_retries, backoff_min=webhook_backoff[0],
                                 backoff_max=webhook_backoff[1])
    except WebhookConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--webhook-url/--webhook-backoff") from None
    port = port_of_api_url() if port is None else port
    try:
        catalogue = Catalogue.load(catalogue_path) if catalogue_path else Catalogue.default()
    except (OSError, CatalogueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--catalogue") from exc
    try:
        faults = _load_faults(faults_spec) if faults_spec else FaultPlan()
    except (OSError, ValueError) as exc:  # FaultPlanError and JSONDecodeError are ValueErrors
        raise click.BadParameter(str(exc), param_hint="--faults") from exc
    if token_ttl <= 0 or basket_ttl <= 0:
        raise click.BadParameter("TTLs must be > 0")
    try:
        behaviour = Behaviour().with_assignments(switches)
    except BehaviourError as exc:
        raise click.BadParameter(str(exc), param_hint="--behaviour") from exc
    options = SandboxOptions(api_key=api_key, channel_id=channel_id, token_ttl=token_ttl,
                             basket_ttl=basket_ttl, catalogue=catalogue, faults=faults,
                             seed=seed, behaviour=behaviour, webhooks=webhooks)

    def ready(url: str) -> None:
        sys.stdout.write(f"sandbox listening on {url}\n")
        sys.stdout.flush()

    standing_by = False
    while True:
        try:
            serve_forever(options, host, port, ready)
            return
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or not _sandbox_answers(host, port):
                what = " (and what listens there is not a sandbox: move both with " \
                       "ONEBOX_API_URL)" if exc.errno == errno.EADDRINUSE else ""
                reason = os.strerror(exc.errno) if exc.errno else str(exc)
                raise click.ClickException(f"cannot listen on {host}:{port}: {reason}{what}"
                                           ) from None
        if not standing_by:
            click.echo(f"sandbox already running on port {port} (another process): standing "
                       "by, taking over if it stops", err=True)
            standing_by = True
        if _stand_by(host, port):
            return

