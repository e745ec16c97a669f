"""A wrong setting stops every entry point at start-up with one line and exit 78.

The commands run as processes of their own, as an operator runs them: the
point is what reaches the terminal (no traceback) and the exit code. None
needs a service: each stops before it would connect to anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import fakeredis
import pytest

from fulfilment.config import Settings, is_loopback, settings_report
from fulfilment.errors import ConfigError
from fulfilment.onebox.client import build_client

BAD = {"FULFILMENT_LEASE_TTL": "abc"}
FULFILMENT = [sys.executable, "-c", "from tasks.commands import main; main()"]
CELERY = [sys.executable, "-m", "celery", "-A", "tasks"]


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, **env}, cwd=Path(__file__).resolve().parents[2])


@pytest.mark.parametrize("args", [
    [*CELERY, "worker", "-P", "solo"],
    [*CELERY, "beat"],
    [*FULFILMENT, "-v", "batch", "status", "night-run-17"],
    [*FULFILMENT, "submit", "-"],
], ids=["worker", "beat", "batch-status", "submit"])
def test_a_bad_setting_stops_start_up_with_one_line(args: list[str]) -> None:
    done = run(args, BAD)
    assert done.returncode == 78, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "FULFILMENT_LEASE_TTL='abc'" in lines[0]
    assert "Traceback" not in done.stdout + done.stderr


def test_help_works_with_a_bad_setting() -> None:
    for args in ([*FULFILMENT, "--help"], [*FULFILMENT, "submit", "--help"]):
        done = run(args, BAD)
        assert done.returncode == 0, done.stderr
        assert "Usage:" in done.stdout


def test_settings_shows_the_bad_value_and_what_is_wrong() -> None:
    done = run([*FULFILMENT, "settings"], {**BAD, "ONEBOX_API_KEY": ""})
    assert done.returncode == 78
    assert "FULFILMENT_LEASE_TTL = 'abc'  <- invalid: could not convert string to float" \
        in done.stdout
    assert "ONEBOX_API_KEY = <secret>  <- invalid: must not be empty" in done.stdout
    assert "FULFILMENT_KEY_PREFIX = 'fulfilment'" in done.stdout  # the good ones too
    assert "Traceback" not in done.stderr
    assert done.stderr.count("invalid:") == 2


def test_settings_report_names_a_cross_field_problem() -> None:
    lines, problems = settings_report({"FULFILMENT_VISIBILITY_TIMEOUT": "100"})
    assert "FULFILMENT_VISIBILITY_TIMEOUT = '100'" in lines
    assert len(problems) == 1 and "FULFILMENT_VISIBILITY_TIMEOUT must exceed" in problems[0]
    assert settings_report({})[1] == []


@pytest.mark.parametrize("name", ["ONEBOX_API_KEY", "ONEBOX_CHANNEL_ID"])
def test_empty_credentials_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match=rf"{name}=.*must not be empty"):
        Settings.from_env({name: ""})
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: "  "})


@pytest.mark.parametrize("url", ["http://127.0.0.1:8650", "http://localhost:8650",
                                 "http://[::1]:8650", "http://127.0.0.2", "https://api.example"])
def test_loopback_http_and_any_https_are_allowed(url: str) -> None:
    env = {"ONEBOX_API_URL": url, "ONEBOX_API_KEY": "channel-key"}
    assert Settings.from_env(env).onebox_api_url == url


@pytest.mark.parametrize("env", [
    {"ONEBOX_API_URL": "http://api.oneboxtds.com"},
    {"ONEBOX_API_URL": "http://10.0.0.7:8650"},
    {"ONEBOX_API_URL": "https://api.oneboxtds.com", "ONEBOX_AUTH_URL": "http://auth.example"},
    {"ONEBOX_API_URL": "http://sandbox:8650", "ONEBOX_PLAIN_HTTP_HOSTS": "sandbox-2"},
])
def test_plain_http_to_another_machine_is_refused(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="plain http:// to another machine"):
        Settings.from_env(env)


def test_plain_http_hosts_allow_a_named_sandbox() -> None:
    settings = Settings.from_env({"ONEBOX_API_URL": "http://sandbox:8650",
                                  "ONEBOX_PLAIN_HTTP_HOSTS": " Sandbox , other "})
    assert settings.plain_http_hosts == {"sandbox", "other"}
    # Kept as text, so the settings survive a trip through the environment.
    assert settings.onebox_plain_http_hosts == "other,sandbox"


def test_only_http_and_https_reach_onebox() -> None:
    with pytest.raises(ConfigError, match="ONEBOX_API_URL='ftp://onebox'"):
        Settings.from_env({"ONEBOX_API_URL": "ftp://onebox"})


def test_is_loopback() -> None:
    assert all(map(is_loopback, ["localhost", "127.0.0.1", "127.9.9.9", "::1", "[::1]"]))
    assert not any(map(is_loopback, ["sandbox", "10.0.0.1", "0.0.0.0", "example.com", ""]))


def test_tls_verification_is_on_and_takes_a_ca_bundle(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    plain = Settings.defaults()
    assert plain.tls_verify is True
    with_bundle = Settings.from_env({"ONEBOX_CA_BUNDLE": str(bundle)})
    assert with_bundle.tls_verify == str(bundle)
    # Every call verifies: the client's session and the token provider's.
    for settings, expected in ((plain, True), (with_bundle, str(bundle))):
        client = build_client(settings, fakeredis.FakeRedis())
        assert client._session.verify == expected
        assert client._tokens._session.verify == expected


def test_a_missing_ca_bundle_stops_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"ONEBOX_CA_BUNDLE=.*no such file"):
        Settings.from_env({"ONEBOX_CA_BUNDLE": str(tmp_path / "nowhere.pem")})
