"""The ``fulfilment`` commands that enqueue work: demo, submit, sweep.

They sit in ``tasks`` because they need the Celery app; ``main`` adds them to
the Celery-free group in ``fulfilment.cli`` and is the console script.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click
import redis
from kombu import Connection
from kombu.exceptions import OperationalError

from fulfilment.bulk import BATCH_ID, Reader, Record
from fulfilment.cli import batch, cli, load_settings
from fulfilment.config import Settings, mask_url
from fulfilment.errors import ConfigError, FulfilmentError
from fulfilment.keys import Keys
from fulfilment.producer import (
    ACCEPTED,
    CHUNK,
    DUPLICATE,
    REFUSED,
    Submission,
    describe_errors,
)
from fulfilment.progress import Progress
from fulfilment.redact import url_has_password
from fulfilment.results import consume_results
from fulfilment.stops import Answer
from fulfilment.topology import Topology
from schemas.intent import BULK, LANES, LIVE
from schemas.result import CONFIRMED, HELD, OrderResult

if TYPE_CHECKING:
    from fulfilment.settlement import Checked

#: Seconds between two reads of a batch's status while ``submit --wait`` follows it.
WAIT_POLL = 1.0


@cli.command()
@click.option("-n", "--count", default=100, show_default=True, help="How many intents.")
@click.option("--broker", "broker_url", default=None,
              help="Use this broker (a URL without a password) and real Redis with workers "
                   "started by 'celery -A tasks worker' (default: FULFILMENT_BROKER_URL or "
                   "FULFILMENT_BROKER_URL_FILE if set, else everything in this process).")
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

    refuse_password_on_command_line(broker_url)
    if not logging.getLogger().isEnabledFor(logging.INFO):
        # Expected failures are in the summary; keep warnings from tearing the progress bar.
        logging.getLogger("fulfilment").setLevel(logging.ERROR)

    settings = load_settings()
    broker_url = broker_url or settings.broker_url or None
    with environment(settings, broker_url=broker_url, concurrency=concurrency) as env:
        where = ("embedded (in-memory broker, threads)" if env.embedded
                 else mask_url(broker_url or ""))
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


def refuse_password_on_command_line(broker_url: str | None) -> None:
    """A command line is readable by every user of the machine (``ps``): a broker URL
    with a password is refused there, and taken from the environment or a file."""
    if broker_url and url_has_password(broker_url):
        raise click.ClickException(  # one line: no usage text around it
            "--broker: this URL carries a password, and a command line is visible to every "
            "user (ps): set FULFILMENT_BROKER_URL or FULFILMENT_BROKER_URL_FILE instead")


def _collect(connection: Connection, settings: Settings, expected: int,
             timeout: float) -> list[OrderResult]:
    topology = Topology.for_keys(Keys(settings.key_prefix), settings.effective_broker_url)
    outcomes: dict[str, OrderResult] = {}
    deadline = time.monotonic() + timeout
    with click.progressbar(length=expected, label="purchasing", show_pos=True) as bar:
        for result in consume_results(connection, topology, timeout=0.5,
                                      idle_timeout=timeout):
            if result.status == HELD:  # interim: its final outcome follows, same result_id
                continue
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
@click.argument("source", type=click.Path(dir_okay=False, allow_dash=True, path_type=str))
@click.option("--format", "file_format", type=click.Choice(["auto", "jsonl", "csv"]),
              default="auto", show_default=True,
              help="File format; auto: CSV for a name ending in .csv, else JSONL.")
@click.option("--batch", "batch_id", default=None,
              help="Batch id of this upload (intents without one join it; one naming another "
                   "is refused). Default: the batch the first intent names, else the file's "
                   "name and a digest of its resolved path (the same file, even corrected, "
                   "is the same batch).")
@click.option("--wait", is_flag=True,
              help="Then follow the batch until every intent has an outcome; print a summary "
                   "and write the results file.")
@click.option("--results", "results_path", default=None,
              type=click.Path(dir_okay=False, writable=True, path_type=Path),
              help="With --wait: where to write the results, one JSON line each "
                   "[default: BATCH.results.jsonl next to the input file; required when "
                   "reading standard input].")
@click.option("--wait-timeout", type=float, default=None,
              help="With --wait: give up after this many seconds (exit 1) [default: none].")
@click.option("--chunk", type=click.IntRange(1, 10_000), default=CHUNK, show_default=True,
              help="Intents admitted per Redis round trip and started per fan-out message.")
@click.option("--lane", type=click.Choice(LANES), default=BULK, show_default=True,
              help="Lane of intents that name none: bulk waits in Redis and is released "
                   "fairly between shops as workers free up; live is started at once, "
                   "before any bulk work.")
@click.option("--quiet", is_flag=True, help="No duplicate lines, no progress; the summary.")
def submit(*, source: str, file_format: str, batch_id: str | None, wait: bool,
           results_path: Path | None, wait_timeout: float | None, chunk: int,
           lane: str, quiet: bool) -> None:
    """Submit the intents of a JSONL or CSV file ('-' for stdin), streamed in chunks.

    Every line ends accounted for: admitted, duplicate, or refused with its
    line number, field and reason; the rest go on. Admitted is accepted: an
    intent whose dispatch the broker refused is kept and started by the
    recovery sweep, and the summary says how many wait. The exit code is 1 if
    any line was refused (or, with --wait, if any intent is unsettled or the
    wait timed out).
    """
    from fulfilment.bulk import (
        BulkFileError,
        batch_named,
        default_batch,
        format_of,
        reader_for,
    )

    if batch_id is not None and not BATCH_ID.fullmatch(batch_id):
        raise click.BadParameter("a batch id is 1-64 of A-Z a-z 0-9 . _ : -",
                                 param_hint="--batch")
    path = None if source == "-" else Path(source)
    if wait and path is None and results_path is None:
        raise click.BadParameter("with --wait from standard input, say where the results go",
                                 param_hint="--results")
    _require_durable()
    upload = _Upload(quiet=quiet)
    with contextlib.ExitStack() as stack:
        stream: IO[bytes] = sys.stdin.buffer if path is None else \
            stack.enter_context(path.open("rb"))
        reader = reader_for(stream, format_of(source, file_format))
        try:
            records = iter(reader)
            first = next(records, None)  # the upload's batch may be the one it names
            batch = batch_id or (first and batch_named(first)) or default_batch(path)
            click.echo(f"batch {batch}")
            click.echo(_destination())
            click.echo(_lane_note(lane))
            if wait:
                results_path = _results_file(results_path, path, batch)
                click.echo(f"results to {results_path} once every intent has an outcome")
            total = path.stat().st_size if path is not None and path.is_file() else None
            progress = stack.enter_context(
                Progress("submitting", total, "intents", terminal=False if quiet else None,
                         every=3600.0 if quiet else 5.0))
            upload.run(itertools.chain([first] if first else [], records), reader=reader,
                       batch=batch, chunk=chunk, lane=lane, progress=progress)
        except BulkFileError as exc:  # the header: nothing was submitted
            raise click.ClickException(exc.message) from None
        except (redis.RedisError, OperationalError, ConnectionError) as exc:
            upload.stopped(type(exc).__name__)
            raise SystemExit(1) from None
    upload.summary()
    failed = bool(upload.counts[REFUSED])
    if wait:
        failed = not _wait_for_batch(batch, results_path, wait_timeout, quiet) or failed
    if failed:
        raise SystemExit(1)


def _results_file(given: Path | None, source: Path | None, batch: str) -> Path:
    """Where ``--wait`` writes the results: as given, else next to the input file.

    Checked before anything is submitted, so an upload never waits an hour to
    find it cannot write its results.
    """
    path = given or (source or Path()).parent / f"{batch}.results.jsonl"
    folder = path.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise click.ClickException(f"cannot write the results to {path} (no such directory, "
                                   "or not writable): say where with --results PATH")
    return path


class _Upload:
    """One upload's stream of records and what became of each, line by line.

    The records on their way (at most about two chunks: the producer reads one
    ahead) wait in a queue to be matched with their submissions, in order; a
    record refused by the reader itself is reported in its place. The counts
    stay right whatever stops the upload: ``stopped`` says what was taken and
    from which line on nothing is known.
    """

    def __init__(self, *, quiet: bool) -> None:
        self.quiet = quiet
        self.counts: Counter[str] = Counter()
        self.awaiting_dispatch = 0
        self.waiting: deque[Record] = deque()

    def run(self, records: Iterator[Record], *, reader: Reader, batch: str, chunk: int,
            lane: str, progress: Progress) -> None:
        from tasks.producer import producer

        def sendable() -> Iterator[bytes | dict[str, Any]]:
            for record in records:
                self.waiting.append(record)
                if record.raw is not None:
                    yield record.raw

        for number, submission in enumerate(
                producer().submit_many(sendable(), batch=batch, chunk=chunk, lane=lane),
                start=1):
            self._unreadable()
            self._report(self.waiting.popleft(), submission)
            if number % chunk == 0:
                progress.update(reader.bytes_read, sum(self.counts.values()))
        self._unreadable()
        progress.update(reader.bytes_read, sum(self.counts.values()))

    def _report(self, record: Record, submission: Submission) -> None:
        self.counts[submission.status] += 1
        self.awaiting_dispatch += submission.awaiting_dispatch
        if submission.status == REFUSED:
            _say_refused(record.line, submission)
        elif not self.quiet and submission.status == DUPLICATE:
            click.echo(f"line {record.line}: {submission.reference}: duplicate, "
                       "taken once already")

    def _unreadable(self) -> None:
        while self.waiting and self.waiting[0].raw is None:
            record = self.waiting.popleft()
            self._report(record, Submission(record.reference, REFUSED, record.errors,
                                            "invalid purchase intent"))

    def summary(self) -> None:
        """The counts; the last line starts with the number admitted."""
        admitted, awaiting = self.counts[ACCEPTED], self.awaiting_dispatch
        if awaiting:
            from tasks import runtime

            stuck_after = runtime.services().settings.stuck_after
            click.echo(f"the broker did not take the purchases of {awaiting:,} admitted "
                       "intents: they are kept in the ledger and started when the broker is "
                       "back (the recovery sweep resumes an admitted intent without a task "
                       f"after FULFILMENT_STUCK_AFTER, {stuck_after:g} s)", err=True)
            taken = f"{admitted} admitted ({admitted - awaiting} enqueued, {awaiting} wait " \
                    "for dispatch)"
        else:
            taken = f"{admitted} enqueued"
        click.echo(f"{taken}, {self.counts[DUPLICATE]} duplicates, "
                   f"{self.counts[REFUSED]} refused")

    def stopped(self, error: str) -> None:
        """Redis or the broker failed mid-file: what was taken, and where to go on from."""
        where = (f"from line {self.waiting[0].line} on, nothing is known (the last chunk "
                 "may have been admitted)" if self.waiting else "nothing more was read")
        click.echo(f"stopped: {error} talking to Redis or the broker; {where}. Before that:",
                   err=True)
        self.summary()
        click.echo("What was admitted stays admitted (the recovery sweep starts any whose "
                   "dispatch was lost). Run the same command again to go on: it is the same "
                   "batch, and the lines already taken come back as duplicates.", err=True)


def _wait_for_batch(batch: str, results_path: Path | None, timeout: float | None,
                    quiet: bool) -> bool:
    """Follow the batch in the ledger until every intent has an outcome; summary and
    results file. False if it timed out or some intents are unsettled."""
    from fulfilment.batches import batch_outcomes, batch_status, describe
    from tasks import runtime

    services = runtime.services()
    client, keys = services.ledger.redis, services.ledger.keys
    status = batch_status(client, keys, batch)
    deadline = None if timeout is None else time.monotonic() + timeout
    with Progress("purchasing", status.admitted, "outcomes",
                  terminal=False if quiet else None, every=3600.0 if quiet else 10.0) as bar:
        while not status.done and status.exists:
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(WAIT_POLL)  # the ledger is polled: three commands, any batch size
            status = batch_status(client, keys, batch)
            bar.update(status.outcomes, status.outcomes)
    click.echo("\n".join(describe(status)))
    path = results_path or Path(f"{batch}.results.jsonl")  # always given by submit
    written = 0
    with path.open("w", encoding="utf-8") as out:
        for result in batch_outcomes(client, keys, batch):
            out.write(json.dumps(result, sort_keys=True) + "\n")
            written += 1
    click.echo(f"{written:,} results written to {path}")
    if not status.done:
        click.echo(f"gave up waiting: {status.in_progress:,} intents have no outcome yet "
                   f"(fulfilment batch status {batch})", err=True)
    return status.done and not status.unsettled


def _destination() -> str:
    """Where the intents go: the broker (password masked), the queue and the ledger."""
    from tasks import runtime

    settings = runtime.services().settings
    keys = Keys(settings.key_prefix)
    return (f"to broker {mask_url(settings.effective_broker_url)}, queue {keys.task_queue} "
            f"(ledger {mask_url(settings.redis_url)}, prefix {settings.key_prefix})")


def _lane_note(lane: str) -> str:
    """How the upload's intents travel (those that name no lane of their own)."""
    if lane == LIVE:
        return "live lane: each intent is started at once, before any bulk work"
    return ("bulk lane: intents wait in Redis and are released as workers free up, shared "
            "fairly between shops (fulfilment batch status shows how many wait)")


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
@click.argument("references", nargs=-1)
@click.option("--all", "every", is_flag=True,
              help="Every unsettled intent ('fulfilment unsettled' lists them).")
@click.option("--batch", "batch_id", default=None, help="The unsettled intents of this batch.")
def settle(references: tuple[str, ...], every: bool, batch_id: str | None) -> None:
    """Settle unsettled purchases: read each order now and publish its final outcome.

    A purchase is unsettled when a confirm was sent and Onebox could not say by
    the deadline whether it went through. Celery beat reads each again by itself
    (FULFILMENT_SETTLE_FIRST, doubling to an hour, for FULFILMENT_SETTLE_FOR);
    this reads them now. Name references, or --all, or --batch ID. Exit code 1
    while any stays unsettled.
    """
    from fulfilment import settlement
    from fulfilment.lookup import REFERENCE, REFERENCE_RULE
    from tasks import runtime

    if sum((bool(references), every, batch_id is not None)) != 1:
        raise click.UsageError("name references, or --all, or --batch ID (one of them)")
    if batch_id is not None and not BATCH_ID.fullmatch(batch_id):
        raise click.BadParameter("a batch id is 1-64 of A-Z a-z 0-9 . _ : -",
                                 param_hint="--batch")
    services = runtime.services()
    index = settlement.index_for(services)
    if not references:
        try:
            references = tuple(u.reference for u in index.all(batch=batch_id))
        except redis.RedisError as exc:
            raise click.ClickException(
                f"cannot read the ledger at {mask_url(services.settings.redis_url)}: "
                f"{type(exc).__name__}") from None
        if not references:
            click.echo("no unsettled intents" + (f" in batch {batch_id}" if batch_id else ""))
            return
    open_ones = settled = 0
    for reference in references:
        if not REFERENCE.fullmatch(reference):
            click.echo(f"{reference!r}: not settled: not a reference ({REFERENCE_RULE})",
                       err=True)
            open_ones += 1
            continue
        try:
            checked = settlement.check(services, reference, index)
        except FulfilmentError as exc:
            click.echo(f"{reference}: not settled: {exc.message}", err=True)
            open_ones += 1
            continue
        except redis.RedisError as exc:
            raise click.ClickException(
                f"cannot reach the ledger at {mask_url(services.settings.redis_url)}: "
                f"{type(exc).__name__}; nothing settled from {reference} on") from None
        line, state = _settled_line(checked)
        click.echo(line, err=checked.gone)
        settled += state == "settled"
        open_ones += state == "open"
    if len(references) > 1:
        click.echo(f"{len(references)} intents: {settled} settled, {open_ones} not")
    if open_ones:
        raise SystemExit(1)


def _settled_line(checked: Checked) -> tuple[str, str]:
    """What became of one intent ``settle`` read (``settlement.Checked``): the line to
    print, and ``settled``, ``open`` (still unsettled, or unknown) or ``running``."""
    reference, outcome = checked.reference, checked.outcome
    if checked.gone:
        return (f"{reference}: unknown (no ledger entry: never admitted, or past "
                "FULFILMENT_LEDGER_RETENTION)", "open")
    if outcome is None:
        return f"{reference}: no outcome yet (the purchase is still running)", "running"
    if outcome.status == "confirmed":
        return f"{reference}: confirmed, order code {outcome.order_code}", "settled"
    if outcome.status == "failed":
        return (f"{reference}: failed, {outcome.error.code if outcome.error else '?'}",
                "settled")
    return (f"{reference}: still unsettled: Onebox cannot tell yet (order code "
            f"{outcome.order_code or '?'}; {checked.answer or 'not read'})", "open")


@cli.command()
@click.argument("references", nargs=-1, required=True)
def cancel(references: tuple[str, ...]) -> None:
    """Cancel purchases before their confirm is sent: the seats are released, and each
    one's outcome is 'cancelled'. Once a confirm was sent it is too late: refused, and
    nothing changes. Asking twice gives the same answer. Exit 1 if any was refused."""
    from tasks.stops import stops

    _answer_each(references, lambda good: stops().cancel(good))


@cli.command("confirm")
@click.argument("reference")
def confirm_hold(reference: str) -> None:
    """Confirm a held purchase (its intent said "hold": true) once the payment is taken.
    Refused once the hold lapsed or it was cancelled (exit 1)."""
    from tasks.stops import stops

    _answer_each((reference,), lambda good: [stops().confirm(ref) for ref in good])


@batch.command("cancel")
@click.argument("batch_id")
def batch_cancel(batch_id: str) -> None:
    """Cancel every intent of a batch that has no outcome yet (as 'fulfilment cancel').

    Prints one line: how many were cancelled, how many were too late (a confirm was
    sent), how many had finished meanwhile. Exit 1 only if the batch is unknown.
    """
    from fulfilment.batches import batch_status as read_status
    from tasks import runtime
    from tasks.stops import stops

    if not BATCH_ID.fullmatch(batch_id):
        raise click.BadParameter("a batch id is 1-64 of A-Z a-z 0-9 . _ : -",
                                 param_hint="BATCH_ID")
    counts: Counter[str] = Counter()
    try:
        for answer in stops().cancel_batch(batch_id):
            counts[_CANCEL_TALLY.get(answer.verdict.split(":")[0], answer.verdict)] += 1
        known = counts or read_status(runtime.services().ledger.redis,
                                      runtime.services().ledger.keys, batch_id).exists
    except redis.RedisError as exc:
        raise click.ClickException(
            f"cannot reach the ledger at {mask_url(runtime.services().settings.redis_url)}: "
            f"{type(exc).__name__}; counts so far: {dict(counts)}") from None
    if not known:
        click.echo(f"batch {batch_id}: no such batch", err=True)
        raise SystemExit(1)
    click.echo(f"batch {batch_id}: " + (", ".join(f"{n:,} {what}" for what, n in
                                                  counts.most_common()) or "nothing open"))


#: A cancel's verdict, as the batch's summary counts it.
_CANCEL_TALLY = {"finished": "cancelled", "stopping": "cancelled",
                 "too_late": "too late (confirm sent)", "done": "finished meanwhile",
                 "unknown": "gone"}


def _answer_each(given: Sequence[str],
                 ask: Callable[[list[str]], Iterable[Answer]]) -> None:
    """Ask for the well-formed references; one line per answer, refusals (and each
    reference that is not one) on stderr; exit 1 if any was refused."""
    from fulfilment.lookup import REFERENCE, REFERENCE_RULE
    from tasks import runtime

    good = [reference for reference in given if REFERENCE.fullmatch(reference)]
    refused = len(given) - len(good)
    for reference in given:
        if not REFERENCE.fullmatch(reference):
            click.echo(f"{reference!r}: not a reference ({REFERENCE_RULE})", err=True)
    try:
        for answer in ask(good):
            refused += not answer.ok
            click.echo(str(answer), err=not answer.ok)
    except redis.RedisError as exc:
        raise click.ClickException(
            f"cannot reach the ledger at {mask_url(runtime.services().settings.redis_url)}: "
            f"{type(exc).__name__}") from None
    if refused:
        raise SystemExit(1)


@cli.command()
@click.argument("target")
@click.option("--item", "items", type=click.IntRange(min=1), multiple=True,
              help="Refund only this Onebox item id (repeat for more); default: the whole order.")
@click.option("--order-code", "by_code", is_flag=True,
              help="TARGET is an Onebox order code, not a purchase reference.")
@click.option("--id", "refund_id", default=None,
              help="The refund's id: the same id again is the same refund [default: derived "
                   "from the target and the items].")
@click.option("--reason", default=None, help="Why (no personal data); kept with the refund.")
@click.option("--wait", is_flag=True, help="Then wait for the outcome and print it (exit 1 if "
                                           "it failed or did not come in time).")
@click.option("--wait-timeout", type=float, default=120.0, show_default=True,
              help="With --wait: give up after this many seconds.")
def refund(*, target: str, items: tuple[int, ...], by_code: bool, refund_id: str | None,
           reason: str | None, wait: bool, wait_timeout: float) -> None:
    """Refund a confirmed purchase (TARGET: its reference), whole or some items, once.

    The refund is recorded, then queued; a worker sends it to Onebox and
    publishes its outcome (refund.refunded or refund.failed on the results
    exchange). Asking again for the same refund (same --id, or same target and
    items) is the same refund; an order refunded already is success.
    """
    from fulfilment.refunds import RefundConflictError, RefundRefusedError
    from tasks.refunds import refund as request_refund

    _require_durable()
    try:
        submission = request_refund(None if by_code else target,
                                    order_code=target if by_code else None, items=items,
                                    refund_id=refund_id, reason=reason)
    except FulfilmentError as exc:
        if isinstance(exc, RefundRefusedError | RefundConflictError):
            raise click.ClickException(f"refused: {exc.message}") from None
        details = describe_errors(getattr(exc, "errors", {})) or [exc.message]
        raise click.ClickException("refused: " + "; ".join(details)) from None
    what = f"order {target}" if by_code else f"purchase {target}"
    which = f"items {', '.join(map(str, sorted(set(items))))}" if items else "whole order"
    if submission.outcome is not None:
        click.echo(f"refund {submission.refund_id} of {what} ({which}): done already")
        _say_refund(submission.outcome)
        return
    click.echo(f"refund {submission.refund_id} of {what} ({which}): {submission.status}, "
               "queued")
    if wait:
        _wait_for_refund(submission.refund_id, wait_timeout)


def _wait_for_refund(refund_id: str, timeout: float) -> None:
    """Follow the refund's ledger entry until it has an outcome (polled, like batches)."""
    from fulfilment.refunds import RefundLedger
    from tasks import runtime

    store = RefundLedger.of(runtime.services())
    deadline = time.monotonic() + timeout
    while True:
        entry = store.get(refund_id)
        if entry is not None and entry.outcome is not None:
            _say_refund(entry.outcome)
            return
        if time.monotonic() > deadline:
            state = entry.state if entry is not None else "unknown"
            raise click.ClickException(f"no outcome after {timeout:g}s (the refund is "
                                       f"{state}); it goes on without you")
        time.sleep(WAIT_POLL / 4)


def _say_refund(outcome: Any) -> None:
    if outcome.status == "refunded":
        note = " (Onebox had them refunded already)" if outcome.already_refunded else ""
        click.echo(f"refunded: order {outcome.order_code}, items "
                   f"{', '.join(map(str, outcome.items))}{note}")
        return
    error = outcome.error
    click.echo(f"failed: {error.code if error else '?'}: {error.message if error else ''}",
               err=True)
    raise SystemExit(1)


@cli.command()
@click.option("--address", default=None, metavar="HOST:PORT",
              help="Listen here instead (port 0: any free port, printed on start-up) "
                   "[default: FULFILMENT_WEBHOOKS_ADDRESS].")
def webhooks(address: str | None) -> None:
    """Receive Onebox's webhooks on POST /webhooks/onebox until SIGTERM or SIGINT.

    Each is checked (ob-signature, FULFILMENT_WEBHOOK_SIGNATURE), deduplicated on
    its order code and action, and handed to a worker: PURCHASE settles an
    unsettled purchase, REFUND and CANCEL reach the shop as after-sale events.
    Prints one line, 'webhooks listening on http://HOST:PORT', once it listens.
    """
    from fulfilment.clock import RedisClock
    from fulfilment.config import split_host_port
    from fulfilment.webhooks.server import Server, build_receiver, serve_until_signalled
    from fulfilment.wiring import redis_client
    from tasks.webhooks import hand_over

    settings = load_settings()
    if address is not None:
        try:
            settings = settings.with_overrides(webhooks_address=_host_port_option(address))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--address") from None
    if settings.webhook_signature != "none" and not settings.webhook_secret:
        raise click.ClickException(
            f"FULFILMENT_WEBHOOK_SIGNATURE={settings.webhook_signature} needs the secret: set "
            "FULFILMENT_WEBHOOK_SECRET or FULFILMENT_WEBHOOK_SECRET_FILE")
    log = logging.getLogger("fulfilment.webhooks")
    if not log.isEnabledFor(logging.INFO):
        log.setLevel(logging.INFO)  # a server says what it receives (never the body)
    if settings.webhook_signature == "none":
        log.warning("FULFILMENT_WEBHOOK_SIGNATURE=none: webhooks are accepted unsigned "
                    "(a sandbox only)")
    client = redis_client(settings)
    app = build_receiver(settings, client, hand_over, RedisClock(client))
    host, port = split_host_port(settings.webhooks_address)
    try:
        server = Server(app, host, port)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {settings.webhooks_address}: "
                                   f"{exc.strerror or exc}") from None

    def ready(url: str) -> None:
        click.echo(f"webhooks listening on {url}")
        sys.stdout.flush()

    serve_until_signalled(server, ready)


def _host_port_option(value: str) -> str:
    from fulfilment.config import SETTINGS

    setting = next(s for s in SETTINGS if s.env == "FULFILMENT_WEBHOOKS_ADDRESS")
    return str(setting.parse(value))


@cli.command()
def sweep() -> None:
    """Resume intents and refunds stuck past FULFILMENT_STUCK_AFTER (what celery beat runs)."""
    from fulfilment import recovery
    from tasks import runtime
    from tasks.purchase import dispatch
    from tasks.refunds import dispatch_refund

    swept = recovery.sweep_all(runtime.services(), dispatch, dispatch_refund)
    click.echo(json.dumps({"resumed": swept.intents, "refunds": swept.refunds}))


def main() -> None:
    """The console script. A bad setting stops any command before it starts, with one
    line and exit 78 (EX_CONFIG); ``--help`` and ``settings`` (which shows what is
    wrong) work whatever the environment holds."""
    from tasks.startup import refuse

    args = sys.argv[1:]
    command = next((arg for arg in args if not arg.startswith("-")), None)
    if command not in (None, "settings") and "--help" not in args:
        try:
            Settings.from_env()
        except ConfigError as exc:
            refuse(f"fulfilment {command}", exc.message)
    cli(prog_name="fulfilment")


if __name__ == "__main__":
    main()
