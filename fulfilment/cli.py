"""The ``fulfilment`` command: the parts that need no Celery.

Commands that enqueue work (``demo``, ``submit``, ``sweep``) live in
``tasks.commands``, which adds them to this group: ``fulfilment`` never imports
Celery, and the console script starts from ``tasks.commands:main``.
"""

from __future__ import annotations

import json
from typing import IO

import click

from fulfilment.bulk import BATCH_ID
from fulfilment.config import SETTINGS, Settings, settings_table
from fulfilment.errors import ConfigError
from fulfilment.keys import Keys
from fulfilment.logcontext import configure_logging
from fulfilment.sandbox.command import sandbox
from fulfilment.topology import Topology
from schemas.result import dump_result


def load_settings() -> Settings:
    """Settings from the environment, or exit with the one line that says why."""
    try:
        return Settings.from_env()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Buy event tickets through Onebox, exactly once, with Celery workers."""
    configure_logging(("WARNING", "INFO", "DEBUG")[min(verbose, 2)])


cli.add_command(sandbox)


@cli.command()
@click.option("--markdown", is_flag=True, help="Print the README's table.")
def settings(markdown: bool) -> None:
    """Show every setting: its value here (secrets hidden), or the README table."""
    if markdown:
        click.echo(settings_table())
        return
    current = load_settings()
    for setting in SETTINGS:
        click.echo(f"{setting.env} = {current.shown(setting)}")


@cli.command()
@click.option("--jsonl", "jsonl", type=click.File("a"), default=None,
              help="Append each result as a JSON line to this file ('-' for stdout).")
@click.option("--count", type=int, default=None, help="Stop after this many results.")
@click.option("--idle-timeout", type=float, default=None,
              help="Stop after this many seconds without a result (default: run until stopped).")
@click.option("--failures", is_flag=True,
              help="Read refused messages from the failures queue instead.")
def results(jsonl: IO[str] | None, count: int | None, idle_timeout: float | None,
            failures: bool) -> None:
    """Read outcomes from the results queue (each acknowledged once written)."""
    from fulfilment.results import consume_failures, consume_results
    from fulfilment.wiring import broker_connection

    settings_ = load_settings()
    topology = Topology.for_keys(Keys(settings_.key_prefix))
    seen = 0
    with broker_connection(settings_) as connection:
        if failures:
            for failure in consume_failures(connection, topology, idle_timeout=idle_timeout):
                # Failures hold raw payloads (personal data): only to an explicit file.
                _emit(jsonl, json.dumps(failure), f"refused: {failure['reason']}")
                seen += 1
                if count is not None and seen >= count:
                    break
        else:
            for result in consume_results(connection, topology, idle_timeout=idle_timeout):
                line = json.dumps(dump_result(result), sort_keys=True)
                if result.status == "confirmed":
                    summary = f"{result.reference}: confirmed, order code {result.order_code}"
                else:
                    error = result.error
                    summary = f"{result.reference}: {result.status}, " \
                              f"{error.code if error else '?'}"
                    if result.status == "unsettled":
                        summary += f" (order code {result.order_code or '?'}: " \
                                   f"fulfilment settle {result.reference})"
                _emit(jsonl, line, summary)
                seen += 1
                if count is not None and seen >= count:
                    break
    click.echo(f"{seen} message(s) read", err=True)


@cli.group()
def batch() -> None:
    """How a batch of intents stands (the intents' ``batch`` field; ``submit --batch``)."""


@batch.command("status")
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
def batch_status(batch_id: str, as_json: bool) -> None:
    """Counts by state and the oldest open intent, from the ledger (exit 1 if unknown)."""
    from fulfilment.batches import batch_status as read_status
    from fulfilment.batches import describe
    from fulfilment.wiring import redis_client

    settings_ = load_settings()
    if not BATCH_ID.fullmatch(batch_id):
        raise click.BadParameter("a batch id is 1-64 of A-Z a-z 0-9 . _ : -",
                                 param_hint="BATCH_ID")
    client = redis_client(settings_)
    try:
        status = read_status(client, Keys(settings_.key_prefix), batch_id)
    finally:
        client.close()
    if as_json:
        click.echo(json.dumps(status.as_dict(), sort_keys=True))
    else:
        click.echo("\n".join(describe(status)))
    if not status.exists:
        raise SystemExit(1)


def _emit(jsonl: IO[str] | None, line: str, summary: str) -> None:
    if jsonl is not None:
        jsonl.write(line + "\n")
        jsonl.flush()
    else:
        click.echo(summary)


def main() -> None:  # pragma: no cover - the console script uses tasks.commands:main
    cli(prog_name="fulfilment")


if __name__ == "__main__":  # pragma: no cover
    main()
