"""The README, the docs, the Procfile and the settings say the same thing as the code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fulfilment.config import SETTINGS, Settings, settings_table
from fulfilment.errors import ConfigError
from tests.docs import doc

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
SETTINGS_DOC = doc("settings.md")


def test_settings_table_is_current() -> None:
    block = SETTINGS_DOC.split("<!-- settings:start -->\n", 1)[1]
    block = block.split("\n<!-- settings:end -->", 1)[0]
    assert block == settings_table(), "run: fulfilment settings --markdown"


def test_every_setting_is_documented_with_its_default() -> None:
    for setting in SETTINGS:
        assert f"`{setting.env}`" in SETTINGS_DOC


def test_readme_starts_with_the_two_commands() -> None:
    blocks = re.findall(r"```sh\n(.+?)\n```", README)
    assert blocks[0].endswith("fulfilment demo")
    assert blocks[1].endswith("pytest")
    assert "pip install -e" in blocks[0] and "'.[test]'" in blocks[1]


def test_bad_setting_fails_with_one_clear_line() -> None:
    with pytest.raises(ConfigError, match="ONEBOX_READ_TIMEOUT='soon'"):
        Settings.from_env({"ONEBOX_READ_TIMEOUT": "soon"})
    with pytest.raises(ConfigError, match="FULFILMENT_VISIBILITY_TIMEOUT"):
        Settings.from_env({"FULFILMENT_VISIBILITY_TIMEOUT": "100"})


def test_secret_setting_is_never_shown() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"ONEBOX_API_KEY": "k", "ONEBOX_API_URL": "not a url"})
    settings = Settings.from_env({"ONEBOX_API_KEY": "super-secret-key"})
    assert "super-secret-key" not in repr(settings) + str(caught.value)


def test_procfile_is_valid_for_honcho() -> None:
    done = subprocess.run([sys.executable, "-m", "honcho", "check"], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    names = {line.split(":", 1)[0] for line in (ROOT / "Procfile").read_text().splitlines()}
    assert names == {"worker", "beat", "sandbox"}


# --- Deployment files: Procfile and docker-compose.yml -----------------------------------

def _procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return {name: command.strip() for name, command in (line.split(":", 1) for line in lines)}


def test_procfile_sandbox_takes_its_port_from_onebox_api_url() -> None:
    """One variable, ONEBOX_API_URL, moves the sandbox and the workers that call it."""
    from fulfilment.sandbox.command import DEFAULT_PORT, port_of_api_url

    assert "--port" not in _procfile()["sandbox"]
    assert Settings.defaults().onebox_api_url.endswith(f":{DEFAULT_PORT}")
    for url, port in (("http://127.0.0.1:8660", 8660), ("http://localhost:9001/", 9001),
                      ("https://api.oneboxtds.com", DEFAULT_PORT),
                      ("http://127.0.0.1", DEFAULT_PORT)):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("ONEBOX_API_URL", url)
            assert port_of_api_url() == port


def test_procfile_beat_schedule_is_per_deployment() -> None:
    """Two deployments on one host (two key prefixes) must not share beat's schedule file."""
    beat = _procfile()["beat"]
    schedule = beat.split(" -s ", 1)[1].split()[0]

    def expanded(prefix: str | None) -> str:
        env = {"PATH": "/usr/bin:/bin", **({"FULFILMENT_KEY_PREFIX": prefix} if prefix else {})}
        return subprocess.run(["sh", "-c", f"echo {schedule}"], env=env, capture_output=True,
                              text=True, check=True).stdout.strip()

    assert expanded("shop-a") != expanded("shop-b")
    assert expanded(None) == "/tmp/fulfilment-beat-schedule"
    assert "shop-a" in expanded("shop-a")


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def _compose_env() -> dict[str, str]:
    """The app's environment as compose gives it when no variable is set on the host."""
    raw: dict[str, str] = _compose()["x-app"]["environment"]
    return {name: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))
            for name, value in raw.items()}


def _seconds(duration: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smh])", duration))


def test_compose_settings_pass_the_start_up_checks() -> None:
    settings = Settings.from_env(_compose_env())  # plain http to its own sandbox is allowed
    assert settings.onebox_api_url == "http://sandbox:8650"
    with pytest.raises(ConfigError, match="plain http"):
        Settings.from_env({**_compose_env(), "ONEBOX_PLAIN_HTTP_HOSTS": ""})


def test_compose_worker_outlives_its_longest_task_on_stop() -> None:
    worker = _compose()["services"]["worker"]
    limit = Settings.from_env(_compose_env()).task_time_limit
    assert _seconds(worker["stop_grace_period"]) > limit


def test_every_compose_service_has_a_health_check() -> None:
    services = _compose()["services"]
    assert {name for name, service in services.items() if "healthcheck" not in service} == set()
    assert "inspect ping -d celery@$$HOSTNAME" in " ".join(
        services["worker"]["healthcheck"]["test"])
    assert "/__sandbox/health" in " ".join(services["sandbox"]["healthcheck"]["test"])
    assert "--port" not in services["sandbox"]["command"]


def test_the_sandbox_listens_on_loopback_unless_told() -> None:
    from fulfilment.sandbox.command import sandbox

    host = next(p for p in sandbox.params if p.name == "host")
    assert host.default == "127.0.0.1"
