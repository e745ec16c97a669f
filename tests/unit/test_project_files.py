"""The README, the docs, the Procfile and the settings say the same thing as the code."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fulfilment.config import SETTINGS, Settings, settings_table
from fulfilment.errors import ConfigError
from fulfilment.harness.processes import wait_for
from tests import services
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
    # .ci/run runs what follows the last "&& pytest" as the suite (options and all)
    assert re.search(r" && pytest( -[^&]*)?$", blocks[1]), blocks[1]
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
    assert set(_procfile()) == {"worker", "beat", "sandbox"}


# --- Deployment files: Procfile and docker-compose.yml -----------------------------------

def _procfile() -> dict[str, str]:
    lines = [line for line in (ROOT / "Procfile").read_text().splitlines()
             if line and not line.startswith("#")]
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


# --- N workers on one host, compose as the whole deployment, the image ---------------------

def _worker_identity(bin_dir: Path, port: int | None,
                     metrics_port: str | None) -> tuple[str, str]:
    """The node name and metrics port the Procfile's worker line gives honcho's instance
    (its PORT), run by sh as honcho runs it, with a stand-in ``celery`` that says what it got."""
    celery = bin_dir / "celery"
    celery.write_text('#!/bin/sh\nwhile [ "$1" != -n ]; do shift; done\n'
                      'echo "$2" "$FULFILMENT_METRICS_PORT"\n')
    celery.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    if port is not None:
        env["PORT"] = str(port)
    if metrics_port is not None:
        env["FULFILMENT_METRICS_PORT"] = metrics_port
    out = subprocess.run(["sh", "-c", _procfile()["worker"]], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0], out[1]


def test_procfile_gives_each_of_n_workers_a_node_name_and_metrics_port(tmp_path: Path) -> None:
    """honcho start -c worker=3: PORT 5000, 5001, 5002 (honcho's, one per instance)."""
    seen = [_worker_identity(tmp_path, port, None) for port in (5000, 5001, 5002)]
    assert seen == [("worker1@%h", "9650"), ("worker2@%h", "9651"), ("worker3@%h", "9652")]
    assert _worker_identity(tmp_path, 5001, "9700") == ("worker2@%h", "9701")
    assert _worker_identity(tmp_path, 5001, "0") == ("worker2@%h", "0")  # off stays off
    assert _worker_identity(tmp_path, None, None) == ("worker1@%h", "9650")  # by hand
    # A bad value is left for the worker's own check (one line, exit 78)
    assert _worker_identity(tmp_path, 5001, "abc") == ("worker2@%h", "abc")


def _dockerfile_cmd() -> list[str]:
    line = next(line for line in (ROOT / "Dockerfile").read_text().splitlines()
                if line.startswith("CMD "))
    command: list[str] = json.loads(line[len("CMD "):])
    return command


def test_the_image_compose_and_the_procfile_run_the_same_worker() -> None:
    image = _dockerfile_cmd()
    assert image == _compose()["services"]["worker"]["command"]
    assert image[:2] == ["run-service", "celery"]
    celery = " ".join(image[1:])
    assert celery in _procfile()["worker"]
    assert "-P threads --concurrency 16" in celery
    assert "EXPOSE 9650" in (ROOT / "Dockerfile").read_text()
    assert Settings.defaults().metrics_port == 9650


def test_the_build_context_leaves_out_local_state() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".git", "**/__pycache__", ".mypy_cache", ".pytest_cache",
            "*.results.jsonl", ".env"} <= ignored


def test_compose_brings_up_a_whole_deployment() -> None:
    services = _compose()["services"]
    assert {"redis", "sandbox", "worker", "beat", "results", "prometheus", "flower",
            "grafana"} <= set(services)
    command = services["redis"]["command"]
    assert command[command.index("--appendfsync") + 1] == "always"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert services["grafana"]["profiles"] == ["grafana"]  # optional
    assert "results" in " ".join(services["results"]["command"])


def test_compose_never_restarts_a_configuration_error_in_a_loop() -> None:
    """Ours run under run-service (78 ends them with 0) and restart on failure only."""
    services = _compose()["services"]
    ours = [name for name, service in services.items() if "build" in service]
    assert set(ours) >= {"sandbox", "worker", "beat", "results", "flower"}
    for name in ours:
        assert services[name]["restart"] == "on-failure", name
        assert services[name]["command"][0] == "run-service", name
    assert "COPY docs/deploy/run-service.sh /usr/local/bin/run-service" in \
        (ROOT / "Dockerfile").read_text()


def test_prometheus_scrapes_every_compose_worker_and_grafana_gets_the_dashboard() -> None:
    services = _compose()["services"]
    mounts = {volume.split(":")[1]: volume.split(":")[0]
              for volume in services["prometheus"]["volumes"]}
    config = yaml.safe_load((ROOT / mounts["/etc/prometheus/prometheus.yml"]).read_text())
    [job] = config["scrape_configs"]
    [discovery] = job["dns_sd_configs"]
    assert discovery["names"] == ["worker"] and discovery["type"] == "A"
    assert str(discovery["port"]) in services["worker"]["expose"]
    assert int(_compose()["x-app"]["environment"]["FULFILMENT_METRICS_PORT"]) == \
        discovery["port"]
    for volume in services["grafana"]["volumes"]:
        assert (ROOT / volume.split(":")[0]).is_file(), volume
    assert any("docs/grafana-dashboard.json" in v for v in services["grafana"]["volumes"])


def test_compose_with_the_real_api_and_no_key_stops_with_one_line() -> None:
    env = {**_compose_env(), "ONEBOX_API_URL": "https://api.oneboxtds.com"}
    with pytest.raises(ConfigError, match="set ONEBOX_API_KEY or ONEBOX_API_KEY_FILE"):
        Settings.from_env(env)
    assert Settings.from_env({**env, "ONEBOX_API_KEY": "channel-key"})


def _compose_cli() -> list[str] | None:
    for command in (["docker", "compose"], ["docker-compose"]):
        try:
            done = subprocess.run([*command, "version"], capture_output=True, timeout=30,
                                  check=False)
        except OSError:
            continue
        if done.returncode == 0:
            return command
    return None


def test_docker_compose_accepts_the_file() -> None:
    command = _compose_cli()
    if command is None:
        # On a laptop without compose the file is still checked above; CI installs it.
        services.unavailable("no docker compose CLI here (docker compose / docker-compose)")
    done = subprocess.run([*command, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                          capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stderr


# --- run-service: the image's services' wrapper ----------------------------------------

RUN_SERVICE = ROOT / "docs" / "deploy" / "run-service.sh"


def _run_service(*command: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(RUN_SERVICE), *command], input=stdin, capture_output=True,
                          text=True, timeout=60, check=False)


def test_run_service_ends_a_configuration_error_so_it_is_not_restarted() -> None:
    done = _run_service("sh", "-c", "echo 'worker: FULFILMENT_X is wrong' >&2; exit 78")
    assert done.returncode == 0
    assert "configuration error (exit 78" in done.stderr and "not restarted" in done.stderr


def test_run_service_keeps_any_other_exit_status_and_stdin() -> None:
    assert _run_service("sh", "-c", "exit 1").returncode == 1
    assert _run_service("sh", "-c", "exit 0").returncode == 0
    done = _run_service("cat", stdin="an intent\n")
    assert done.returncode == 0 and done.stdout == "an intent\n"


def test_run_service_passes_sigterm_on_for_a_warm_shutdown(tmp_path: Path) -> None:
    ready, stopped = tmp_path / "ready", tmp_path / "stopped"
    script = ("import pathlib, signal, sys, time\n"
              f"def stop(*_): pathlib.Path({str(stopped)!r}).write_text('TERM'); sys.exit(7)\n"
              "signal.signal(signal.SIGTERM, stop)\n"
              f"pathlib.Path({str(ready)!r}).write_text('ready')\n"
              "time.sleep(60)\n")
    process = subprocess.Popen(["sh", str(RUN_SERVICE), sys.executable, "-c", script])
    try:
        wait_for(ready.exists, timeout=30, what="the command started")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 7  # the command's own status, after its handler
        assert stopped.read_text() == "TERM"
    finally:
        process.kill()
        process.wait()


# --- the versions CI tests are the versions declared -----------------------------------

def test_celery_and_kombu_are_pinned_to_the_minor_ci_runs() -> None:
    """fulfilment.redis_transport leans on kombu's internals: no untested minor may install."""
    import importlib.metadata
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    declared = {Requirement(r).name: Requirement(r) for r in
                tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    for name in ("celery", "kombu"):
        installed = Version(importlib.metadata.version(name))
        spec = declared[name].specifier
        assert installed in spec, (name, installed, spec)
        same_minor = {Version(f"{installed.major}.{installed.minor}.{patch}") for patch in (0, 99)}
        next_minor = Version(f"{installed.major}.{installed.minor + 1}.0")
        assert all(v in spec for v in same_minor) and next_minor not in spec, (name, spec)
    assert "https://github.com/celery/kombu/issues/" in \
        (ROOT / "fulfilment" / "redis_transport.py").read_text()
