"""The ``fulfilment`` commands that enqueue work: demo, submit, sweep.

They sit in ``tasks`` because they need the Celery app; ``main`` adds them to
the Celery-free group in ``fulfilment.cli`` and is the console script.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from typing import IO

import click
from kombu import Connection

from fulfilment.cli import cli, load_settings
from fulfilment.config import Settings
from fulfilment.errors import ConfigError, FulfilmentError
from fulfilment.keys import Keys
from fulfilment.producer import ACCEPTED, DUPLICATE, REFUSED, Submission, describe_errors
from fulfilment.results import consume_results
from fulfilment.topology import Topology
from schemas.result import CONFIRMED, OrderResult


@cli.command()
@click.option("-n", "--count", default=100, show_default=True, help="How many intents.")
@click.option("--broker", "broker_url", envvar="FULFILMENT_BROKER_URL", default=None,
              help="Use this broker and real Redis with workers started by "
                   "'celery -A tasks worker' (default: everything in this process).")
@click.option("--concurrency", default=4, show_default=True,
              help="Embedded worker threads.")
@click.option("--timeout", default=300.0, show_default=True,
              help="Give up waiting for outcomes after this many seconds.")
@click.option("--quiet", is_flag=True, help="Only the summary, not every order code.")
def demo(count: int, broker_url: str | None, concurrency: int, timeout: float,
         quiet: bool) -> None:
    """Buy N tickets end to end against the sandbox and print the order codes."""
    from fulfilment.demo import demo_intents, sell_out_recital_front_row
    from tasks.embedded import environment
    from tasks.producer import producer

    if not logging.getLogger().isEnabledFor(logging.INFO):
        # Expected failures are in the summary; keep warnings from tearing the progress bar.
        logging.getLogger("fulfilment").setLevel(logging.ERROR)

    with environment(load_settings(), broker_url=broker_url or None,
                     concurrency=concurrency) as env:
        where = "embedded (in-memory broker, threads)" if env.embedded else broker_url
        click.echo(f"sandbox {env.sandbox_url}; broker {where}")
        intents = demo_intents(count)
        box_office = sell_out_recital_front_row(env.services.client,
                                                f"{intents[0]['batch']}-box-office")
        click.echo(f"box office sold the recital's front row first (order {box_office})")
        started = time.monotonic()
        submitted = Counter(s.status for s in producer().submit_many(intents))
        click.echo(f"submitted {count} intents: {dict(submitted)}")
        outcomes = _collect(env.connection, env.settings, submitted[ACCEPTED], timeout)
        elapsed = time.monotonic() - started
    _report(outcomes, submitted[ACCEPTED], elapsed, quiet)
    if len(outcomes) < submitted[ACCEPTED]:
        raise SystemExit(1)


def _collect(connection: Connection, settings: Settings, expected: int,
             timeout: float) -> list[OrderResult]:
    topology = Topology.for_keys(Keys(settings.key_prefix))
    outcomes: dict[str, OrderResult] = {}
    deadline = time.monotonic() + timeout
    with click.progressbar(length=expected, label="purchasing", show_pos=True) as bar:
        for result in consume_results(connection, topology, timeout=0.5,
                                      idle_timeout=timeout):
            if result.result_id not in outcomes:  # a redelivery is dropped by its id
                outcomes[result.result_id] = result
                bar.update(1)
            if len(outcomes) >= expected or time.monotonic() > deadline:
                break
    return list(outcomes.values())


def _report(outcomes: list[OrderResult], expected: int, elapsed: float, quiet: bool) -> None:
    confirmed = sorted((r for r in outcomes if r.status == CONFIRMED), key=lambda r: r.reference)
    failed = sorted((r for r in outcomes if r.status != CONFIRMED), key=lambda r: r.reference)
    if not quiet:
        for result in confirmed:
            click.echo(f"  confirmed  {result.reference}  order code {result.order_code}")
    for result in failed:
        code = result.error.code if result.error else "?"
        click.echo(f"  failed     {result.reference}  {code}")
    reasons = Counter(r.error.code if r.error else "?" for r in failed)
    click.echo(f"\n{len(confirmed)} confirmed, {len(failed)} failed {dict(reasons)}, "
               f"{expected - len(outcomes)} without outcome; "
               f"{elapsed:.1f}s ({len(outcomes) / elapsed if elapsed else 0:.0f} orders/s)")


@cli.command()
@click.argument("source", type=click.File("r"))
@click.option("--quiet", is_flag=True, help="Only the summary.")
def submit(source: IO[str], quiet: bool) -> None:
    """Enqueue the intents of a JSONL file ('-' for stdin); report what was refused."""
    from tasks.producer import submit_many

    _require_durable()
    counts: Counter[str] = Counter()
    # Streamed: tee keeps one line of lag between the numbers and the submissions.
    numbered, raws = itertools.tee(_lines(source))
    for (number, _), submission in zip(numbered, submit_many(raw for _, raw in raws),
                                       strict=True):
        counts[submission.status] += 1
        if submission.status == REFUSED:
            _say_refused(number, submission)
        elif not quiet and submission.status == DUPLICATE:
            click.echo(f"line {number}: {submission.reference}: duplicate, taken once already")
    click.echo(f"{counts[ACCEPTED]} enqueued, {counts[DUPLICATE]} duplicates, "
               f"{counts[REFUSED]} refused")
    if counts[REFUSED]:
        raise SystemExit(1)


def _lines(source: IO[str]) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(source, start=1):
        if line.strip():
            yield number, line


def _say_refused(number: int, submission: Submission) -> None:
    who = submission.reference or "(no reference)"
    details = describe_errors(dict(submission.errors)) or [submission.reason or "refused"]
    click.echo(f"line {number}: {who}: refused: " + "; ".join(details), err=True)


def _require_durable() -> None:
    """Exit with one line unless Redis keeps what it acknowledges (or the check is waived)."""
    from tasks import runtime

    try:
        runtime.check_durable_once()
    except ConfigError as exc:
        raise click.ClickException(exc.message) from None


@cli.command()
@click.argument("references", nargs=-1, required=True)
def settle(references: tuple[str, ...]) -> None:
    """Settle unsettled purchases: read each order now and publish its final outcome.

    A purchase is unsettled when a confirm was sent and Onebox could not say by
    the deadline whether it went through. Exit code 1 while any stays unsettled.
    """
    from fulfilment import flow
    from tasks import runtime

    open_ones = 0
    for reference in references:
        try:
            outcome = flow.settle(runtime.services(), reference)
        except FulfilmentError as exc:
            click.echo(f"{reference}: not settled: {exc.message}", err=True)
            open_ones += 1
            continue
        if outcome is None:
            click.echo(f"{reference}: no outcome yet (the purchase is still running)")
        elif outcome.status == "confirmed":
            click.echo(f"{reference}: confirmed, order code {outcome.order_code}")
        elif outcome.status == "failed":
            click.echo(f"{reference}: failed, {outcome.error.code if outcome.error else '?'}")
        else:
            click.echo(f"{reference}: still unsettled: Onebox cannot tell yet (order code "
                       f"{outcome.order_code or '?'})")
            open_ones += 1
    if open_ones:
        raise SystemExit(1)


@cli.command()
def sweep() -> None:
    """Resume intents stuck past FULFILMENT_STUCK_AFTER (what celery beat runs)."""
    from fulfilment import recovery
    from tasks import runtime
    from tasks.purchase import dispatch

    resumed = recovery.sweep(runtime.services(), dispatch)
    click.echo(json.dumps({"resumed": resumed}))


def main() -> None:
    cli(prog_name="fulfilment")


if __name__ == "__main__":
    main()
