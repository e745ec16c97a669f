"""Passwords in URLs are masked wherever a URL is shown."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from fulfilment.cli import cli
from fulfilment.config import Settings, mask_url
from fulfilment.errors import ConfigError

PASSWORD = "s3cr3t-Pa55"


@pytest.mark.parametrize(("url", "shown"), [
    (f"redis://:{PASSWORD}@cache:6379/0", "redis://:***@cache:6379/0"),
    (f"rediss://default:{PASSWORD}@cache:6380/1", "rediss://default:***@cache:6380/1"),
    (f"amqp://guest:{PASSWORD}@mq:5672/vhost", "amqp://guest:***@mq:5672/vhost"),
    ("redis://cache:6379/0", "redis://cache:6379/0"),
    ("memory://localhost/", "memory://localhost/"),
])
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_settings_repr_and_display_hide_passwords() -> None:
    settings = Settings.from_env({"FULFILMENT_REDIS_URL": f"redis://:{PASSWORD}@cache:6379/0",
                                  "FULFILMENT_BROKER_URL": f"amqp://u:{PASSWORD}@mq//",
                                  "ONEBOX_API_KEY": PASSWORD})
    assert PASSWORD not in repr(settings)
    assert PASSWORD not in str(settings)
    assert "redis://:***@cache:6379/0" in repr(settings)


def test_a_bad_setting_does_not_echo_a_password() -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"FULFILMENT_BROKER_URL": f"//u:{PASSWORD}@nowhere"})
    assert PASSWORD not in str(raised.value)


def test_fulfilment_settings_shows_variables_with_passwords_masked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FULFILMENT_REDIS_URL", f"redis://:{PASSWORD}@cache:6379/0")
    monkeypatch.setenv("ONEBOX_API_KEY", PASSWORD)
    output = CliRunner().invoke(cli, ["settings"]).output
    assert PASSWORD not in output
    assert "FULFILMENT_REDIS_URL = 'redis://:***@cache:6379/0'" in output
    assert "ONEBOX_API_KEY = <secret>" in output
