"""``fulfilment sandbox``: run the sandbox as a process of its own.

It prints exactly one line, ``sandbox listening on http://HOST:PORT``, once it
listens, so a parent process (a benchmark, a chaos test) can read the port it
picked with ``--port 0``. SIGTERM or SIGINT stop it cleanly.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from fulfilment.sandbox import serve_forever
from fulfilment.sandbox.api import SandboxOptions
from fulfilment.sandbox.behaviour import Behaviour, BehaviourError
from fulfilment.sandbox.catalogue import Catalogue, CatalogueError
from fulfilment.sandbox.faults import FaultPlan


def _load_faults(value: str) -> FaultPlan:
    """A fault plan from inline JSON (starts with ``{``) or from a file."""
    text = value if value.lstrip().startswith("{") else Path(value).read_text("utf-8")
    return FaultPlan.from_dict(json.loads(text))


@click.command("sandbox")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8650, show_default=True, type=int,
              help="Port to listen on; 0 picks a free one.")
@click.option("--catalogue", "catalogue_path", type=click.Path(exists=True, dir_okay=False),
              help="Catalogue JSON file (default: the bundled catalogue).")
@click.option("--faults", "faults_spec", help="Fault plan: a JSON file or inline JSON.")
@click.option("--api-key", default=lambda: os.environ.get("ONEBOX_API_KEY", "sandbox-api-key"),
              show_default="env ONEBOX_API_KEY or sandbox-api-key",
              help="The API key (client_secret) the token endpoint accepts.")
@click.option("--channel-id",
              default=lambda: os.environ.get("ONEBOX_CHANNEL_ID", "sandbox-channel"),
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
def sandbox(*, host: str, port: int, catalogue_path: str | None, faults_spec: str | None,
            api_key: str, channel_id: str, token_ttl: float, basket_ttl: float,
            seed: int | None, switches: tuple[str, ...]) -> None:
    """Serve the Onebox sandbox until SIGTERM or SIGINT."""
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
                             seed=seed, behaviour=behaviour)

    def ready(url: str) -> None:
        sys.stdout.write(f"sandbox listening on {url}\n")
        sys.stdout.flush()

    try:
        serve_forever(options, host, port, ready)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}") from exc

