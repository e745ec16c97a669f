"""The log context and formats, and the filter that names Celery's own lines."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator

import pytest

from fulfilment import logcontext
from fulfilment.logcontext import ContextFilter, JsonFormatter, bound, formatter, text_formatter
from tasks.logsignals import DRAIN_TASK, RELEASE_TASK, TaskContextFilter

#: Celery's received, success and retry lines (celery.app.trace's LOG_RECEIVED,
#: LOG_SUCCESS and LOG_RETRY), spelt out as tests do not import Celery.
LOG_RECEIVED = "Task %(name)s[%(id)s] received"
LOG_SUCCESS = "Task %(name)s[%(id)s] succeeded in %(runtime)ss: %(return_value)s"
LOG_RETRY = "Task %(name)s[%(id)s] retry: %(exc)s"


def record(msg: str = "hello %s", args: object = ("world",), *, name: str = "fulfilment.flow",
           level: int = logging.INFO, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord(name, level, __file__, 1, msg, args, None)  # type: ignore[arg-type]
    for key, value in extra.items():
        setattr(made, key, value)
    return made


def through(*filters: logging.Filter, made: logging.LogRecord | None = None) -> \
        logging.LogRecord | None:
    """A record as a handler with these filters passes it on (None: dropped)."""
    made = made or record()
    for each in filters:
        if not each.filter(made):
            return None
    return made


def test_text_lines_carry_the_bound_fields_and_a_dash_for_the_rest() -> None:
    with bound(reference="shop-42", step="confirm", attempt=2), bound(trace="0e1d2c"):
        made = through(ContextFilter())
    assert made is not None
    line = text_formatter().format(made)
    assert "[ref=shop-42 order=- step=confirm attempt=2 trace=0e1d2c] hello world" in line
    # Outside the block nothing is left bound.
    after = through(ContextFilter())
    assert after is not None
    assert "[ref=- order=- step=- attempt=- trace=-]" in text_formatter().format(after)


def test_a_field_given_with_extra_wins_over_the_bound_one() -> None:
    with bound(reference="shop-1", order_id="abc"):
        made = through(ContextFilter(), made=record(order_id="def"))
    assert made is not None
    assert "order=def" in text_formatter().format(made)


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(TypeError, match="email"), bound(email="ana@example.com"):
        pass


def test_json_lines_are_one_object_each_with_every_field() -> None:
    with bound(reference="shop-42", order_id="3f2c", step="seats", attempt=1, trace="0e1d"):
        made = through(ContextFilter(), made=record("order %s: línea\nsegunda", ("AX59",)))
    assert made is not None
    line = JsonFormatter().format(made)
    assert "\n" not in line
    document = json.loads(line)
    assert document["message"] == "order AX59: línea\nsegunda"
    assert {k: document[k] for k in logcontext.FIELDS} == {
        "reference": "shop-42", "order_id": "3f2c", "step": "seats", "attempt": 1,
        "trace": "0e1d"}
    assert document["level"] == "INFO" and document["logger"] == "fulfilment.flow"
    assert document["time"].endswith("Z")


def test_json_gives_null_for_unbound_fields_and_keeps_a_traceback_on_the_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        made = record("failed", (), level=logging.ERROR)
        made.exc_info = sys.exc_info()
    passed = through(ContextFilter(), made=made)
    assert passed is not None
    line = JsonFormatter().format(passed)
    document = json.loads(line)
    assert document["reference"] is None and document["trace"] is None
    assert "ValueError: boom" in document["exception"] and "\n" not in line


def test_the_format_comes_from_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FULFILMENT_LOG_FORMAT", "json")
    assert logcontext._configured_format() == "json"
    monkeypatch.setenv("FULFILMENT_LOG_FORMAT", "xml")
    assert logcontext._configured_format() == "text"  # the command then names the bad setting
    assert isinstance(formatter("json"), JsonFormatter)
    with pytest.raises(ValueError, match="text, json"):
        formatter("xml")


@pytest.fixture
def root_logging() -> Iterator[logging.Logger]:
    """The root logger, restored after a test that configures it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers = []
    yield root
    root.handlers, root.level = handlers, level


def test_configure_logging_writes_json_lines(root_logging: logging.Logger,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    logcontext.configure_logging("INFO", "json")
    with bound(reference="shop-7"):
        logging.getLogger("fulfilment.test").info("one %s", "line")
    logging.getLogger("fulfilment.test").debug("below the level")
    lines = capsys.readouterr().err.splitlines()
    assert [json.loads(line)["message"] for line in lines] == ["one line"]
    assert json.loads(lines[0])["reference"] == "shop-7"


# --- Celery's own lines (tasks.logsignals) ----------------------------------------
def celery_line(msg: str, data: dict[str, object], name: str = "celery.app.trace") -> \
        logging.LogRecord:
    return record(msg, (data,), name=name, data=data)


def test_celerys_received_line_names_the_intent() -> None:
    made = through(ContextFilter(), TaskContextFilter(), made=celery_line(
        LOG_RECEIVED, {"id": "1", "name": "fulfilment.basket", "args": "('shop-42',)"},
        name="celery.worker.strategy"))
    assert made is not None
    assert "[ref=shop-42 " in text_formatter().format(made)


def test_a_task_of_other_arguments_names_none() -> None:
    made = through(ContextFilter(), TaskContextFilter(), made=celery_line(
        LOG_RECEIVED, {"id": "1", "name": "fulfilment.dispatch_batch",
                       "args": "(['shop-1', 'shop-2'],)"}))
    assert made is not None
    assert "[ref=- " in text_formatter().format(made)


def test_a_bound_reference_is_left_alone() -> None:
    with bound(reference="shop-1"):
        made = through(ContextFilter(), TaskContextFilter(), made=celery_line(
            LOG_RECEIVED, {"id": "1", "name": "fulfilment.basket", "args": "('shop-2',)"}))
    assert made is not None
    assert "[ref=shop-1 " in text_formatter().format(made)


@pytest.mark.parametrize(("msg", "data", "name", "quiet"), [
    (LOG_RECEIVED, {"id": "1", "name": DRAIN_TASK, "args": "()"}, "celery.worker.strategy", True),
    (LOG_SUCCESS, {"id": "1", "name": DRAIN_TASK, "return_value": "0"}, "celery.app.trace", True),
    (LOG_SUCCESS, {"id": "1", "name": DRAIN_TASK, "return_value": "3"}, "celery.app.trace", False),
    (LOG_RECEIVED, {"id": "1", "name": RELEASE_TASK, "args": "()"}, "celery.worker.strategy",
     True),
    (LOG_SUCCESS, {"id": "1", "name": RELEASE_TASK, "return_value": "0"}, "celery.app.trace",
     True),
    (LOG_SUCCESS, {"id": "1", "name": RELEASE_TASK, "return_value": "4"}, "celery.app.trace",
     False),
    (LOG_RETRY, {"id": "1", "name": DRAIN_TASK, "exc": "Retry"}, "celery.app.trace", False),
    (LOG_SUCCESS, {"id": "1", "name": "fulfilment.maintenance.sweep", "return_value": "0"},
     "celery.app.trace", False),
])
def test_idle_intake_drains_are_demoted_to_debug(msg: str, data: dict[str, object], name: str,
                                                 quiet: bool,
                                                 root_logging: logging.Logger) -> None:
    root_logging.setLevel(logging.INFO)
    made = through(ContextFilter(), TaskContextFilter(), made=celery_line(msg, data, name))
    assert (made is None) is quiet
    # Where DEBUG is shown they are still there, as DEBUG.
    root_logging.setLevel(logging.DEBUG)
    shown = through(ContextFilter(), TaskContextFilter(), made=celery_line(msg, data, name))
    assert shown is not None
    assert shown.levelname == ("DEBUG" if quiet else "INFO")


def test_beats_line_for_the_drain_is_demoted_and_the_sweeps_kept(
        root_logging: logging.Logger) -> None:
    root_logging.setLevel(logging.INFO)
    sending = "Scheduler: Sending due task %s (%s)"
    drain = record(sending, ("intake-drain", DRAIN_TASK), name="celery.beat")
    release = record(sending, ("bulk-release", RELEASE_TASK), name="celery.beat")
    sweep = record(sending, ("recovery-sweep", "fulfilment.maintenance.sweep"), name="celery.beat")
    assert through(TaskContextFilter(), made=drain) is None
    assert through(TaskContextFilter(), made=release) is None
    assert through(TaskContextFilter(), made=sweep) is sweep
