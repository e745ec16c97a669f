"""The ``fulfilment`` command: the parts that need no Celery.

Commands that enqueue work (``demo``, ``submit``, ``sweep``) live in
``tasks.commands``, which adds them to this group: ``fulfilment`` never imports
Celery, and the console script starts from ``tasks.commands:main``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC
from typing import IO, Any

import click
import redis

from fulfilment.bulk import BATCH_ID
from fulfilment.config import Settings, mask_url, settings_report, settings_table
from fulfilment.errors import ConfigError
from fulfilment.keys import Keys
from fulfilment.logcontext import configure_logging
from fulfilment.sandbox.command import sandbox
from fulfilment.topology import Topology
from schemas.result import (
    CANCELLED,
    CONFIRMED,
    EXPIRED,
    HELD,
    UNSETTLED,
    OrderResult,
    dump_result,
)


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
@click.option("--markdown", is_flag=True, help="Print docs/settings.md's table.")
def settings(markdown: bool) -> None:
    """Show every setting: its value here (secrets hidden), or the table of docs/settings.md.

    Works whatever the environment holds: a bad value is shown with what is
    wrong with it, and the exit code is then 78 (EX_CONFIG)."""
    if markdown:
        click.echo(settings_table())
        return
    lines, problems = settings_report()
    click.echo("\n".join(lines))
    for problem in problems:
        click.echo(f"invalid: {problem}", err=True)
    if problems:
        raise SystemExit(78)


@cli.command()
@click.option("--jsonl", "jsonl", type=click.File("a"), default=None,
              help="Append each result as a JSON line to this file ('-' for stdout).")
@click.option("--count", type=click.IntRange(min=1), default=None,
              help="Stop after this many results (each acknowledged, the last too).")
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
    topology = Topology.for_keys(Keys(settings_.key_prefix), settings_.effective_broker_url)
    seen = 0
    # Iterated to its end, never broken off: the generator acknowledges each
    # message, the last one too, when asked for the next (``limit``).
    with broker_connection(settings_) as connection:
        if failures:
            for failure in consume_failures(connection, topology, idle_timeout=idle_timeout,
                                            limit=count):
                # Failures hold raw payloads (personal data): only to an explicit file.
                _emit(jsonl, json.dumps(failure), describe_failure(failure))
                seen += 1
        else:
            for result in consume_results(connection, topology, idle_timeout=idle_timeout,
                                          limit=count):
                line = json.dumps(dump_result(result), sort_keys=True)
                _emit(jsonl, line, describe_result(result))
                seen += 1
    click.echo(f"{seen} message(s) read", err=True)


@contextmanager
def ledger_client(settings_: Settings) -> Iterator[redis.Redis]:
    """A Redis client on the ledger, for one command; Redis unreachable is one line."""
    from fulfilment.wiring import redis_client

    client = redis_client(settings_)
    try:
        yield client
    except redis.RedisError as exc:
        raise click.ClickException(f"cannot read the ledger at {mask_url(settings_.redis_url)}: "
                                   f"{type(exc).__name__}") from None
    finally:
        client.close()


@cli.group()
def batch() -> None:
    """How a batch of intents stands (the intents' 'batch' field; 'submit --batch')."""


@batch.command("status")
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
def batch_status(batch_id: str, as_json: bool) -> None:
    """Counts by state and the oldest open intent, from the ledger (exit 1 if unknown)."""
    from fulfilment.batches import batch_status as read_status
    from fulfilment.batches import describe

    settings_ = load_settings()
    if not BATCH_ID.fullmatch(batch_id):
        raise click.BadParameter("a batch id is 1-64 of A-Z a-z 0-9 . _ : -",
                                 param_hint="BATCH_ID")
    with ledger_client(settings_) as client:
        status = read_status(client, Keys(settings_.key_prefix), batch_id)
    if as_json:
        click.echo(json.dumps(status.as_dict(), sort_keys=True))
    else:
        click.echo("\n".join(describe(status)))
    if not status.exists:
        raise SystemExit(1)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--no-onebox", is_flag=True,
              help="Skip the Onebox check (it fetches a token: one call each run).")
def health(as_json: bool, no_onebox: bool) -> None:
    """Check Redis, the broker, Onebox, queue depths, stuck intents and the intake.

    Exit code 0 when every check is ok; 1 when any is degraded (stuck intents,
    an intake celery beat has not drained lately) or unhealthy (Redis, the
    broker or Onebox unreachable or refusing).
    """
    from fulfilment.health import check_health

    report = check_health(load_settings(), onebox=not no_onebox)
    if as_json:
        click.echo(json.dumps(report.as_dict(), sort_keys=True))
    else:
        click.echo("\n".join(report.lines()))
    if not report.healthy:
        raise SystemExit(1)


@cli.command()
@click.argument("references", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object per reference, one a line.")
def status(references: tuple[str, ...], as_json: bool) -> None:
    """Where each intent stands, from the ledger (no buyer data). Exit 1 if any is unknown."""
    from fulfilment.lookup import as_json as status_json
    from fulfilment.lookup import describe, intent_status

    settings_ = load_settings()
    keys = Keys(settings_.key_prefix)
    unknown = 0
    with ledger_client(settings_) as client:
        for reference in references:
            found = intent_status(client, keys, reference)
            unknown += not found.found
            click.echo(status_json(found) if as_json else "\n".join(describe(found)))
    if unknown:
        raise SystemExit(1)


def describe_result(result: OrderResult) -> str:
    """A result for people, one line: what it means and what to do next, if anything."""
    head = f"{result.reference}: {result.status}"
    code = result.order_code or "?"
    if result.status == CONFIRMED:
        return f"{head}, order code {code}"
    if result.status == HELD:
        until = result.hold_expires_at
        when = until.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z") \
            if until else "?"
        return f"{head}, order code {code} until {when} (confirm or cancel it by then)"
    line = f"{head}, {result.error.code if result.error else '?'}"
    if result.status == UNSETTLED:
        line += f" (order code {code}: fulfilment settle {result.reference})"
    elif result.order_code and result.status in (CANCELLED, EXPIRED):
        line += f" (order code {code}, not bought)"
    return line


@cli.command()
@click.option("--batch", "batch_id", default=None, help="Only this batch's.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object per intent, one a line.")
def unsettled(batch_id: str | None, as_json: bool) -> None:
    """List the unsettled intents, oldest first: age, order code, reads, the last answer.

    Each is read again by itself (celery beat: FULFILMENT_SETTLE_FIRST, doubling
    to an hour, for FULFILMENT_SETTLE_FOR); 'fulfilment settle' reads them now.
    No buyer data: the last answer holds Onebox's codes and statuses only.
    """
    from fulfilment.clock import redis_time
    from fulfilment.unsettled import UnsettledIndex, describe_age

    settings_ = load_settings()
    with ledger_client(settings_) as client:
        now = redis_time(client)
        found = UnsettledIndex(client, Keys(settings_.key_prefix)).all(batch=batch_id)
    if as_json:
        for item in found:
            click.echo(json.dumps(item.as_dict(now), sort_keys=True))
        return
    rows = [("reference", "age", "order code", "reads", "next read", "last answer")]
    rows += [(item.reference, describe_age(now - item.since), item.order_code or "?",
              str(item.checks),
              "off schedule" if item.next_check is None
              else f"in {describe_age(item.next_check - now)}", item.last_answer or "?")
             for item in found]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for *cells, last in rows if found else []:
        click.echo("  ".join([*(cell.ljust(width) for cell, width in zip(cells, widths,
                                                                         strict=True)), last]))
    off = sum(item.next_check is None for item in found)
    click.echo(f"{len(found)} unsettled" + (f" in batch {batch_id}" if batch_id else "") +
               (f", {off} off the schedule (past FULFILMENT_SETTLE_FOR: 'fulfilment settle' "
                "once Onebox support has answered)" if off else ""))


def describe_failure(failure: Mapping[str, Any]) -> str:
    """A refused message for people: its reason and each field's error, never its payload."""
    from fulfilment.producer import describe_errors

    errors = failure.get("errors")
    details = describe_errors(errors) if isinstance(errors, Mapping | list) else []
    line = f"refused: {failure.get('reason', '?')}"
    if details:
        line += " (" + "; ".join(details) + ")"
    if failure.get("payload_truncated"):
        line += f" [payload cut from {failure.get('payload_size')} characters]"
    return line


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
