"""A test that cannot get what it needs of a service skips on a laptop, fails in CI."""

from __future__ import annotations

import pytest

from tests import services


def test_unavailable_skips_on_a_laptop_and_fails_under_ci(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        services.unavailable("cannot make a Redis user")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        services.unavailable("cannot make a Redis user")
    with pytest.raises(pytest.fail.Exception, match="Redis at x is not reachable"):
        services.require("Redis at x", reachable=False)
    services.require("Redis at x", reachable=True)
