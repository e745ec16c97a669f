"""Traces are off unless configured, and say so in one line when their packages are missing."""

from __future__ import annotations

import sys

import pytest

from fulfilment import tracing
from fulfilment.config import Settings
from fulfilment.errors import ConfigError


def test_off_by_default_and_then_a_no_op() -> None:
    settings = Settings.defaults()
    assert settings.traces == "none"
    assert tracing.setup(settings, "test") is False
    tracing.annotate(reference="r-1")  # nothing to annotate, nothing raised
    with tracing.intent_span("r-1", new_trace=True):
        pass


def test_an_unknown_exporter_is_refused() -> None:
    with pytest.raises(ConfigError, match="FULFILMENT_TRACES"):
        Settings.from_env({"FULFILMENT_TRACES": "jaeger"})


def test_missing_packages_say_which_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    with pytest.raises(ConfigError, match=r"trace extra: pip install 'onebox-fulfilment\[trace\]'"):
        tracing.setup(Settings.defaults().with_overrides(traces="otlp"), "test")
    assert not tracing.enabled()
