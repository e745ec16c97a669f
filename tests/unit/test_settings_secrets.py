"""Secrets: passwords in URLs masked wherever shown; secrets from the environment or
a file, never from a command line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest
import redis
from click.testing import CliRunner

import tasks.commands  # noqa: F401  (adds the console script's commands to fulfilment.cli's group)
from fulfilment.cli import cli
from fulfilment.config import SETTINGS, Settings, env_value, mask_url, settings_report
from fulfilment.errors import ConfigError
from fulfilment.health import check_health
from fulfilment.redact import scrub, url_has_password

main_cli = cli  # the console script's group, every command added (by tasks.commands)

PASSWORD = "s3cr3t-Pa55"
#: A password holding an unencoded @, which redis-py and kombu accept.
AT_PASSWORD = "Tr0ub4dor@horse@staple"


@pytest.mark.parametrize(("url", "shown"), [
    (f"redis://:{PASSWORD}@cache:6379/0", "redis://:***@cache:6379/0"),
    (f"rediss://default:{PASSWORD}@cache:6380/1", "rediss://default:***@cache:6380/1"),
    (f"amqp://guest:{PASSWORD}@mq:5672/vhost", "amqp://guest:***@mq:5672/vhost"),
    ("redis://cache:6379/0", "redis://cache:6379/0"),
    ("memory://localhost/", "memory://localhost/"),
    # An unencoded @ in the password: every client takes the netloc's last @.
    (f"redis://:{AT_PASSWORD}@cache:6379/0", "redis://:***@cache:6379/0"),
    (f"amqp://guest:{AT_PASSWORD}@mq:5672//", "amqp://guest:***@mq:5672//"),
    # In the query: redis-py passes any query argument on to the connection.
    (f"redis://cache:6379/0?password={PASSWORD}&db=2", "redis://cache:6379/0?password=***&db=2"),
    (f"redis://cache/0?password={AT_PASSWORD}", "redis://cache/0?password=***"),
    (f"redis://:{PASSWORD}@cache/0?password={PASSWORD}", "redis://:***@cache/0?password=***"),
    # Celery's fail-over list: each URL's own password.
    (f"amqp://a:{PASSWORD}@mq1//;amqp://b:{AT_PASSWORD}@mq2//", "amqp://a:***@mq1//;amqp://b:***@mq2//"),
    # Unencoded / ? # authenticate nowhere, but are still someone's password.
    ("redis://:pass/word@cache:6379/0", "redis://:***@cache:6379/0"),
    ("redis://:pass?word@cache:6379/0", "redis://:***@cache:6379/0"),
    ("redis://:pass#word@cache:6379/0", "redis://:***@cache:6379/0"),
])
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown


@pytest.mark.parametrize("url", [
    f"redis://:{AT_PASSWORD}@cache:6379/0",
    f"redis://cache:6379/0?password={AT_PASSWORD}",
    f"rediss://default:{AT_PASSWORD}@cache:6380/0?password={AT_PASSWORD}",
])
def test_every_spelling_redis_py_authenticates_with_is_masked(url: str) -> None:
    """The password redis-py would send is the one hidden, whole."""
    sent = redis.connection.parse_url(url)["password"]  # type: ignore[no-untyped-call]
    assert sent == AT_PASSWORD
    assert not set(_fragments(sent)) & set(_fragments(mask_url(url)))
    assert url_has_password(url)


def _fragments(text: str) -> list[str]:
    """Every piece of ``text`` between the URL punctuation, four characters or more."""
    return [part for part in re.split(r"[:/@?&=#;]", text) if len(part) >= 4]


def test_free_text_holding_a_url_has_its_password_masked() -> None:
    line = scrub(f"Error connecting to redis://:{AT_PASSWORD}@cache.example.com:6379/0: "
                 f"refused; retry amqp://u:{PASSWORD}@mq//")
    assert "redis://:***@cache.example.com:6379/0" in line
    assert "amqp://u:***@mq//" in line
    assert not set(_fragments(AT_PASSWORD)) & set(_fragments(line))


@pytest.mark.parametrize("variable", ["FULFILMENT_REDIS_URL", "FULFILMENT_BROKER_URL"])
def test_a_password_with_an_unencoded_slash_stops_start_up_without_its_start(
        variable: str) -> None:
    """redis-py and kombu would stop on the "port" and quote it: the password's start."""
    with pytest.raises(ConfigError, match="port is not a number") as raised:
        Settings.from_env({variable: "redis://:Swordfish/42@cache:6379/0"})
    assert "Swordfish" not in str(raised.value)


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


#: Spellings of a ledger and a broker URL whose password the clients read.
SPELLINGS = [
    (f"redis://:{AT_PASSWORD}@127.0.0.1:1/0", f"amqp://guest:{AT_PASSWORD}@127.0.0.1:1//"),
    (f"redis://127.0.0.1:1/0?password={AT_PASSWORD}",
     f"redis://:{AT_PASSWORD}@127.0.0.1:1/1?password={AT_PASSWORD}"),
]


@pytest.mark.parametrize(("redis_url", "broker_url"), SPELLINGS)
def test_fulfilment_settings_masks_every_spelling_of_a_password(
        monkeypatch: pytest.MonkeyPatch, redis_url: str, broker_url: str) -> None:
    monkeypatch.setenv("FULFILMENT_REDIS_URL", redis_url)
    monkeypatch.setenv("FULFILMENT_BROKER_URL", broker_url)
    result = CliRunner().invoke(cli, ["settings"])
    assert result.exit_code == 0, result.output
    assert not set(_fragments(AT_PASSWORD)) & set(_fragments(result.output))
    assert "127.0.0.1:1" in result.output  # the rest of the URL is shown


@pytest.mark.parametrize(("redis_url", "broker_url"), SPELLINGS)
def test_health_json_masks_every_spelling_of_a_password(redis_url: str,
                                                        broker_url: str) -> None:
    """Nothing listens on port 1: every check fails, and says where it looked."""
    settings = Settings.defaults().with_overrides(redis_url=redis_url, broker_url=broker_url)
    report = json.dumps(check_health(settings, onebox=False).as_dict())
    assert not set(_fragments(AT_PASSWORD)) & set(_fragments(report))
    assert "127.0.0.1:1" in report


# --- Secrets from a file (ONEBOX_API_KEY_FILE, ...), never from the command line ---------

def test_the_api_key_can_come_from_a_file(tmp_path: Path) -> None:
    key_file = tmp_path / "onebox_api_key"
    key_file.write_text(f"{PASSWORD}\n")  # as `echo KEY > file` writes it
    settings = Settings.from_env({"ONEBOX_API_KEY_FILE": str(key_file)})
    assert settings.onebox_api_key == PASSWORD
    # Compose may pass an empty ONEBOX_API_KEY alongside the file: that is not "both".
    assert Settings.from_env({"ONEBOX_API_KEY": "", "ONEBOX_API_KEY_FILE": str(key_file)}
                             ).onebox_api_key == PASSWORD


def test_a_redis_url_with_a_password_can_come_from_a_file(tmp_path: Path) -> None:
    url_file = tmp_path / "redis_url"
    url_file.write_text(f"rediss://default:{PASSWORD}@cache:6380/0\n")
    env = {"FULFILMENT_REDIS_URL_FILE": str(url_file)}
    assert Settings.from_env(env).redis_url == f"rediss://default:{PASSWORD}@cache:6380/0"
    lines, problems = settings_report(env)
    assert problems == []
    assert f"FULFILMENT_REDIS_URL = 'rediss://default:***@cache:6380/0' (from " \
           f"FULFILMENT_REDIS_URL_FILE={str(url_file)!r})" in lines
    assert PASSWORD not in "\n".join(lines)


@pytest.mark.parametrize(("content", "error"), [
    (None, "cannot read it: No such file or directory"),
    (f"{PASSWORD}\nsecond line\n", "the file must hold one line"),
    ("\n", "must not be empty"),
])
def test_a_bad_secret_file_stops_start_up_without_showing_it(
        tmp_path: Path, content: str | None, error: str) -> None:
    key_file = tmp_path / "key"
    if content is not None:
        key_file.write_text(content)
    with pytest.raises(ConfigError, match=error) as raised:
        Settings.from_env({"ONEBOX_API_KEY_FILE": str(key_file)})
    assert PASSWORD not in str(raised.value)
    assert "ONEBOX_API_KEY" in raised.value.message


def test_a_secret_set_twice_is_refused(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(PASSWORD)
    with pytest.raises(ConfigError, match="ONEBOX_API_KEY and ONEBOX_API_KEY_FILE are both set"):
        Settings.from_env({"ONEBOX_API_KEY": "other", "ONEBOX_API_KEY_FILE": str(key_file)})


def test_only_secrets_and_urls_with_passwords_are_read_from_files(tmp_path: Path) -> None:
    assert {s.env for s in SETTINGS if s.from_file} == {
        "ONEBOX_API_KEY", "FULFILMENT_REDIS_URL", "FULFILMENT_BROKER_URL",
        "FULFILMENT_WEBHOOK_SECRET", "FULFILMENT_CALLBACK_SECRET"}
    assert all(s.from_file for s in SETTINGS if s.secret)
    lease_file = tmp_path / "lease"
    lease_file.write_text("99")
    assert Settings.from_env({"FULFILMENT_LEASE_TTL_FILE": str(lease_file)}).lease_ttl == 15


def _options(command: click.Command, path: str = "fulfilment") -> list[tuple[str, click.Option]]:
    found = [(path, p) for p in command.params if isinstance(p, click.Option)]
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            found += _options(sub, f"{path} {name}")
    return found


def test_no_command_takes_a_secret_on_its_command_line() -> None:
    """A command line is readable by every user of the machine (``ps``)."""
    secret = re.compile(r"--(api-key|key|password|passwd|secret|credentials?|token)(-file)?$")
    offending = [f"{path} {'/'.join(option.opts)}" for path, option in _options(main_cli)
                 if any(secret.match(name) for name in option.opts)]
    assert offending == []


def test_the_sandbox_takes_its_key_from_the_environment_or_a_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(PASSWORD)
    assert env_value("ONEBOX_API_KEY", {"ONEBOX_API_KEY_FILE": str(key_file)}) == PASSWORD
    assert env_value("ONEBOX_API_KEY", {}) == "sandbox-api-key"
    assert "--api-key" not in CliRunner().invoke(main_cli, ["sandbox", "--help"]).output


@pytest.mark.parametrize("url", [f"redis://:{PASSWORD}@127.0.0.1:1/0",
                                 f"amqp://guest:{PASSWORD}@127.0.0.1:1/vhost",
                                 f"redis://127.0.0.1:1/0?password={PASSWORD}"])
def test_the_demo_refuses_a_broker_password_on_its_command_line(url: str) -> None:
    """Refused before anything starts, in one line naming where the URL belongs."""
    result = CliRunner().invoke(main_cli, ["demo", "--broker", url])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: --broker: this URL carries a password, and a command line is visible to "
        "every user (ps): set FULFILMENT_BROKER_URL or FULFILMENT_BROKER_URL_FILE instead"]
    assert PASSWORD not in result.output


class _Stop(Exception):
    """Raised in place of the demo's world: the broker it was asked for is all we check."""


@pytest.mark.parametrize(("argv", "variable"), [
    (["--broker", "redis://127.0.0.1:1/0"], None),          # no password: allowed
    ([], "FULFILMENT_BROKER_URL"),
    ([], "FULFILMENT_BROKER_URL_FILE"),
])
def test_the_demo_takes_its_broker_from_the_option_the_environment_or_a_file(
        argv: list[str], variable: str | None, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FULFILMENT_BROKER_URL", "FULFILMENT_BROKER_URL_FILE"):
        monkeypatch.delenv(name, raising=False)
    url = f"redis://:{PASSWORD}@127.0.0.1:1/0" if variable else argv[1]
    if variable == "FULFILMENT_BROKER_URL_FILE":
        (tmp_path / "broker").write_text(url + "\n")
        monkeypatch.setenv(variable, str(tmp_path / "broker"))
    elif variable:
        monkeypatch.setenv(variable, url)
    asked: list[str | None] = []

    def environment(settings: Settings, *, broker_url: str | None, concurrency: int) -> None:
        asked.append(broker_url)
        raise _Stop

    monkeypatch.setattr("tasks.embedded.environment", environment)
    result = CliRunner().invoke(main_cli, ["demo", *argv])
    assert isinstance(result.exception, _Stop), result.output
    assert asked == [url]


# --- A reference typed by someone: one line and an exit code, never a traceback ------------

@pytest.mark.parametrize("reference", ["a{b}", "x}:ledger", "", "a" * 65, "two\nlines"])
def test_settle_and_status_answer_an_impossible_reference_in_one_line(reference: str) -> None:
    for command in ("settle", "status"):
        result = CliRunner().invoke(main_cli, [command, reference])
        assert result.exit_code == 1, (command, result.output)
        assert not isinstance(result.exception, Exception) or \
            isinstance(result.exception, SystemExit), result.exception
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and "not a reference" in lines[0], (command, lines)


def test_settle_and_batch_status_say_in_one_line_that_redis_is_unreachable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks import runtime

    monkeypatch.setenv("FULFILMENT_REDIS_URL", f"redis://:{AT_PASSWORD}@127.0.0.1:1/0")
    runtime.reset(Settings.from_env())
    try:
        for argv in (["settle", "shop-1"], ["batch", "status", "night-1"]):
            result = CliRunner().invoke(main_cli, argv)
            assert result.exit_code == 1, (argv, result.output)
            assert isinstance(result.exception, SystemExit), result.exception
            lines = result.output.strip().splitlines()
            assert len(lines) == 1 and "cannot" in lines[0] and "ConnectionError" in lines[0]
            assert not set(_fragments(AT_PASSWORD)) & set(_fragments(result.output))
    finally:
        runtime.reset()
