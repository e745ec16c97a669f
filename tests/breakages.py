"""Named breakages: break each promise's mechanism once, and show a test goes red.

``python -m tests.breakages [NAME ...]`` copies the source tree to a temporary
directory, applies one breakage there (a regular-expression substitution that
must match exactly once: otherwise "anchor not found", and the run fails), runs
the tests named with it, and prints a table: breakage, tests, caught. The tree
itself is never touched. A breakage is caught when every test named with it
fails (each parametrised instance of it). Before any breakage, the same tests
run on the unbroken copy and must all pass, so a failure under a breakage is
the breakage's doing, not the machine's. Runs with ``CI=true``: a test that
would skip for want of Redis or RabbitMQ fails instead, and the baseline says so.

Exit status: 0 when every breakage was caught, 1 when one was not, 2 when an
anchor no longer matches or the baseline fails.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET  # our own pytest's junit report
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Not copied: environments, caches, the repository itself.
IGNORED = shutil.ignore_patterns(".venv", ".git", "__pycache__", ".pytest_cache", ".mypy_cache",
                                 ".ruff_cache", "*.egg-info", "results")

FLOW = "tests/unit/test_flow.py"
ECHO = "tests/integration/test_onebox_echo.py::test_an_error_echoing_the_buyer_holds_none_of_it"
LOGS = "tests/integration/test_log_redaction.py::test_no_secret_or_buyer_data_in_any_log"
LEDGER = "tests/integration/test_ledger_scripts.py"
REFUNDS = "tests/unit/test_refunds.py"
REFUNDS_E2E = "tests/integration/test_refunds_e2e.py"
TABLE = "tests/integration/test_purchase_table.py"
STOPS = "tests/unit/test_stops.py"
CONTENTION = ("tests/integration/test_lease_contention.py::"
              "test_a_stale_holder_cannot_buy_the_intent_a_second_time")
CALLBACKS = "tests/unit/test_callbacks.py"
CALLBACKS_E2E = ("tests/integration/test_callbacks_e2e.py::"
                 "test_an_endpoint_down_gets_every_outcome_once_back_and_purchases_went_on")


@dataclass(frozen=True)
class Breakage:
    name: str
    promise: str
    path: str
    #: A regular expression (multi-line mode) that must match exactly once.
    anchor: str
    replacement: str
    tests: tuple[str, ...]


BREAKAGES = (
    Breakage("email-scrub", "no buyer e-mail in logs, errors or results",
             "fulfilment/redact.py", r'_EMAIL\.sub\("<email>", (\w+)\)', r"\1",
             (ECHO, LOGS)),
    Breakage("phone-scrub", "no buyer phone in logs, errors or results",
             "fulfilment/redact.py", r"_PHONE\.sub\(_mask_phone, (\w+)\)", r"\1",
             (ECHO, LOGS)),
    Breakage("buyer-name-mask", "no buyer name in logs, errors or results",
             "fulfilment/redact.py", r"return masking\(\[buyer\.name, [^\]]*\]\)",
             "return masking([])",
             (f"{ECHO}[buyer_data-400-DIST0005-PermanentError]",
              f"{ECHO}[confirm-500-DIST0000-OutcomeUnknownError]", LOGS)),
    Breakage("flow-buyer-mask", "no buyer name echoed on a later step reaches a log line",
             "fulfilment/flow.py", r"masking_buyer\(intent\.buyer\)",
             'masking_buyer(type(intent.buyer)(email=""))', (LOGS,)),
    Breakage("lease-fencing-token", "a worker whose lease passed on writes nothing",
             "fulfilment/ledger.py",
             r"redis\.call\('GET', KEYS\[3\]\) ~= ARGV\[4\] then return -2 end",
             "false then return -2 end",
             (CONTENTION, f"{LEDGER}::test_a_holder_whose_lease_passed_on_writes_nothing",
              f"{FLOW}::test_a_worker_whose_lease_passed_on_cannot_write")),
    Breakage("lease-release-token", "a stale holder cannot free the lease another holds",
             "fulfilment/lease.py",
             r"^if redis\.call\('GET', KEYS\[1\]\) == ARGV\[1\] then (return redis\.call\('DEL', "
             r"KEYS\[1\]\)) end", r"\1",
             ("tests/unit/test_keys_and_leases.py::"
              "test_a_stale_holder_neither_renews_nor_releases_the_new_holders_lease",)),
    Breakage("admission-fingerprint", "a reference reused for another purchase is refused",
             "fulfilment/ledger.py", r"^\s*if existing ~= ARGV\[1\] then return 'conflict' end\n",
             "", (f"{LEDGER}::test_admission_tells_new_duplicate_and_conflict",
                  f"{FLOW}::test_admission_tells_duplicates_and_conflicts")),
    Breakage("confirm-mark-after-confirm", "a confirm that may have gone out is never repeated",
             "fulfilment/flow.py",
             r"^(?P<indent>[ ]+)with before_send\(mark_sent\):\n"
             r"[ ]+(?P<call>order = client\.confirm\([^\n]*\n)",
             r"\g<indent>if True:\n\g<indent>    \g<call>\g<indent>    mark_sent()\n",
             (f"{FLOW}::test_lost_confirm_is_settled_by_reading_the_order",
              f"{FLOW}::test_never_failed_while_a_confirm_may_have_happened")),
    Breakage("read-back-after-lost-confirm", "a lost confirm is settled by reading the order",
             "fulfilment/flow.py",
             r"if entry\.confirm_sent:(\n\s+# A confirm may have been done)",
             r"if False:\1",
             (f"{FLOW}::test_lost_confirm_is_settled_by_reading_the_order",
              f"{FLOW}::test_confirm_that_never_happened_is_sent_again_after_reading")),
    Breakage("release-on-failure", "a failed purchase gives its seats back",
             "fulfilment/flow.py",
             r"(\n[ ]+if not entry\.confirm_sent:\n[ ]+)_release\(services, entry\)\n",
             r"\1pass\n",
             (f"{FLOW}::test_permanent_error_releases_seats_and_fails_without_retry",
              "tests/integration/test_worker_e2e.py::"
              "test_seat_already_sold_fails_and_releases_the_basket")),
    Breakage("ledger-finish-idempotence", "an intent's outcome is written once",
             "fulfilment/ledger.py", r"^if existing then return existing end\n", "",
             (f"{LEDGER}::test_an_outcome_is_written_once_and_counted_once",)),
    Breakage("refund-read-back", "a refund whose answer was lost is read back, not resent",
             "fulfilment/refunds.py",
             r"if entry\.state == SENT:(\n\s+# A refund may have been done)", r"if False:\1",
             (f"{REFUNDS}::test_a_lost_answer_is_read_back_and_never_sent_again",
              f"{REFUNDS_E2E}::test_a_refund_whose_answer_is_lost_is_read_back_and_refunds_once")),
    Breakage("refund-mark-after-send", "a refund that may have gone out is marked sent first",
             "fulfilment/refunds.py",
             r"^(?P<indent>[ ]+)with before_send\(mark_sent\):\n"
             r"[ ]+(?P<call>order = self\.client\.refund\([^\n]*\n)",
             r"\g<indent>if True:\n\g<indent>    \g<call>\g<indent>    mark_sent()\n",
             (f"{REFUNDS}::test_a_lost_answer_is_read_back_and_never_sent_again",
              f"{REFUNDS_E2E}::test_a_refund_whose_answer_is_lost_is_read_back_and_refunds_once")),
    Breakage("refund-409-is-success", "a refund of an item refunded already is success",
             "fulfilment/onebox/client.py",
             r"if exc\.status != 409 or exc\.code != PRODUCT_STATE_INVALID:", "if True:",
             ("tests/unit/test_sandbox_refunds.py::"
              "test_a_refund_puts_the_seats_back_on_sale_and_reads_back",
              f"{REFUNDS_E2E}::test_a_refund_asked_for_twice_is_one_refund")),
    Breakage("callback-outbox", "every outcome is queued for the shop's callback URL",
             "fulfilment/results.py", r"self\._callbacks\.add\(result\)", "pass",
             (CALLBACKS_E2E,)),
    Breakage("callback-endpoint-hold", "a failing callback endpoint is left alone while held",
             "fulfilment/callbacks.py",
             r'elif holds\.get\(url, \{\}\)\.get\("until", 0\.0\) > now:', "elif False:",
             (f"{CALLBACKS}::test_a_failing_endpoint_is_held_with_backoff_and_gets_everything_"
              "when_back",)),
    Breakage("callback-address-check", "a callback never reaches an address not allowed",
             "fulfilment/callbacks.py",
             r"refused = \[a for a in addresses if not self\.address_allowed\(host, a\)\]",
             "refused: list[str] = []",
             (f"{CALLBACKS}::test_a_name_resolving_to_a_private_address_is_refused_at_send_time",
              f"{CALLBACKS}::test_a_refused_address_is_never_connected_to")),
    Breakage("callback-signature-time", "a callback's signature covers its time",
             "fulfilment/callbacks.py", r'f"\{timestamp\}\."\.encode\(\) \+ body', "body",
             (f"{CALLBACKS}::test_the_signature_is_t_and_an_hmac_of_the_time_and_the_body",
              f"{CALLBACKS}::test_verify_accepts_the_signed_body_and_nothing_else")),
    Breakage("callback-secret-required", "no callback URL without the secret that signs it",
             "fulfilment/config.py", r"if len\(self\.callback_secret\) < 16:", "if False:",
             (f"{CALLBACKS}::test_start_up_refuses_callbacks_without_a_secret_or_to_a_forbidden_"
              "host",
              f"{CALLBACKS}::test_a_worker_with_a_callback_url_and_no_secret_stops_with_exit_78")),
    Breakage("stop-refused-after-confirm-sent", "a cancel after the confirm was sent is too "
             "late and changes nothing", "fulfilment/ledger.py",
             r"^if redis\.call\('HGET', KEYS\[1\], 'confirm_sent'\) == '1' then return "
             r"'too_late' end\n", "",
             (f"{TABLE}::test_each_pair_moves_as_the_table_says_and_ends_once[CONFIRM_SENT-CANCEL]",
              f"{STOPS}::test_a_cancel_after_the_confirm_was_sent_is_too_late_and_changes_nothing")),
    Breakage("confirm-mark-unless-stopped", "nothing is bought after a cancel was acknowledged",
             "fulfilment/ledger.py",
             r"(_RECORD_UNLESS_STOPPED = _GUARD \+ \"\"\"\n"
             r"local stop = redis\.call\('HGET', KEYS\[1\], 'stop'\)\n)if [^\n]*\n",
             r"\1if false then return -4 end\n",
             (f"{TABLE}::test_a_cancel_recorded_as_the_confirm_is_about_to_go_out_wins",)),
    Breakage("stop-seen-mid-run", "a cancel recorded mid-run stops the run at its next step",
             "fulfilment/flow.py",
             r"\n[ ]+if stop is not None and stop\.stop and not stop\.confirm_sent:\n"
             r"[ ]+raise StopRecordedError\([^\n]*\n", "\n",
             (f"{TABLE}::test_a_cancel_recorded_while_a_call_is_out_stops_the_run_at_its_next_step",)),
    Breakage("stop-seen-at-run-start", "a run finds a stop recorded before it and releases",
             "fulfilment/flow.py",
             r"\n[ ]+if entry\.stop and not entry\.confirm_sent:\n"
             r"[ ]+raise StopRecordedError\([^\n]*\n", "\n",
             (f"{TABLE}::test_each_pair_moves_as_the_table_says_and_ends_once[HELD-CANCEL]",)),
)


class AnchorError(Exception):
    """A breakage no longer applies: its anchor matches nothing, or more than one place."""


def apply(breakage: Breakage, tree: Path) -> None:
    target = tree / breakage.path
    source = target.read_text()
    broken, count = re.subn(breakage.anchor, breakage.replacement, source, flags=re.MULTILINE)
    if count != 1:
        what = "anchor not found" if count == 0 else f"anchor matches {count} places"
        raise AnchorError(f"{breakage.name}: {what} in {breakage.path}: {breakage.anchor!r}")
    target.write_text(broken)


def copy_tree(into: Path) -> Path:
    tree = into / "tree"
    shutil.copytree(ROOT, tree, ignore=IGNORED)
    return tree


def run_tests(tree: Path, tests: Sequence[str], report: Path) -> dict[str, str]:
    """Run ``tests`` in ``tree``; each test instance's node id and how it went
    (``passed``, ``failed`` (an error too) or ``skipped``)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "CI": "true", "PYTHONDONTWRITEBYTECODE": "1"}
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    "--junitxml", str(report), "-o", "addopts=", *tests],
                   cwd=tree, env=env, capture_output=True, timeout=1800, check=False)
    outcomes: dict[str, str] = {}
    if not report.exists():
        return outcomes
    for case in ET.parse(report).getroot().iter("testcase"):
        node = case.get("classname", "").replace(".", "/") + ".py::" + case.get("name", "")
        tags = {child.tag for child in case}
        outcomes[node] = ("failed" if tags & {"failure", "error"} else
                          "skipped" if "skipped" in tags else "passed")
    return outcomes


def instances(test: str, outcomes: dict[str, str]) -> list[str]:
    """The outcomes of every instance of ``test`` (a file, a function, or one instance)."""
    return [outcome for node, outcome in outcomes.items()
            if node == test or node.startswith((f"{test}[", f"{test}::"))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="breakages to run (default: all)")
    parser.add_argument("--list", action="store_true", help="name every breakage and exit")
    args = parser.parse_args(argv)
    chosen = [b for b in BREAKAGES if not args.names or b.name in args.names]
    if args.list or not chosen:
        for breakage in BREAKAGES:
            print(f"{breakage.name:30} {breakage.promise}")
        return 0 if args.list else 2
    with tempfile.TemporaryDirectory(prefix="breakages-") as scratch:
        work = Path(scratch)
        # Every anchor first: a breakage that no longer applies stops the run loudly.
        try:
            for breakage in chosen:
                apply(breakage, copy_tree(work / breakage.name))
        except AnchorError as exc:
            print(f"ERROR: {exc}", file=sys.stderr)
            return 2
        tests = sorted({t for b in chosen for t in b.tests})
        started = time.monotonic()
        baseline = run_tests(copy_tree(work / "baseline"), tests, work / "baseline.xml")
        failing = sorted(f"{n} ({o})" for n, o in baseline.items() if o != "passed")
        missing = [t for t in tests if not instances(t, baseline)]
        print(f"baseline (unbroken tree): {len(baseline)} test instances, "
              f"{len(failing)} not passing, {time.monotonic() - started:.0f}s")
        if failing or missing:
            print("ERROR: the tests must pass on the unbroken tree first: "
                  f"{failing + [f'{m} (not found)' for m in missing]}", file=sys.stderr)
            return 2
        rows, uncaught = [], 0
        for breakage in chosen:
            started = time.monotonic()
            outcomes = run_tests(work / breakage.name / "tree", breakage.tests,
                                 work / f"{breakage.name}.xml")
            caught_by = [t for t in breakage.tests
                         if instances(t, outcomes)
                         and all(o == "failed" for o in instances(t, outcomes))]
            caught = len(caught_by) == len(breakage.tests)
            uncaught += not caught
            rows.append((breakage.name, f"{len(caught_by)}/{len(breakage.tests)} failed",
                         "yes" if caught else "NO", f"{time.monotonic() - started:.0f}s",
                         [f"{'red' if t in caught_by else 'GREEN'}  {t}" for t in breakage.tests]))
    print(f"\n{'breakage':30} {'tests':12} {'caught':7} time")
    for name, tally, caught_text, took, details in rows:
        print(f"{name:30} {tally:12} {caught_text:7} {took}")
        for line in details:
            print(f"    {line}")
    print(f"\n{len(rows) - uncaught} of {len(rows)} breakages caught")
    return 1 if uncaught else 0


if __name__ == "__main__":
    sys.exit(main())
