"""The Procfile's processes through honcho with two workers, as an operator starts them:
two distinctly named workers, each scraped on a metrics port of its own.

``honcho start -c worker=2`` with the project's Procfile, on this test's own key
prefix and Redis database, the sandbox the Procfile starts, and beat.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fulfilment.harness.processes import Child, free_port, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def two_free_ports() -> int:
    """A port whose next one is free too (honcho's worker 2 serves on base + 1)."""
    for _ in range(50):
        base = free_port()
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
        return base
    raise AssertionError("no two consecutive free ports")


@pytest.fixture
def fleet_env(redis_url: str, prefix: str, tmp_path: Path) -> dict[str, str]:
    return {
        "FULFILMENT_REDIS_URL": redis_url,
        "FULFILMENT_KEY_PREFIX": prefix,
        # The Procfile's sandbox listens on the port this URL names.
        "ONEBOX_API_URL": f"http://127.0.0.1:{free_port()}",
        "FULFILMENT_METRICS_PORT": str(two_free_ports()),
        "FULFILMENT_METRICS_ADDRESS": "127.0.0.1",
        # The machine's Redis keeps nothing on disk; durability has tests of its own.
        "FULFILMENT_REQUIRE_DURABLE_REDIS": "false",
        "TMPDIR": str(tmp_path),  # beat's schedule file
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


@pytest.fixture
def honcho(fleet_env: dict[str, str], tmp_path: Path) -> Iterator[Child]:
    # The settings in an env file of the test's own (honcho would read the clone's .env).
    env_file = tmp_path / "fleet.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in fleet_env.items() if k != "PATH"))
    inherited = {k: "" for k in os.environ if k.startswith(("ONEBOX_", "FULFILMENT_"))}
    running = Child([sys.executable, "-m", "honcho", "-f", str(ROOT / "Procfile"),
                     "-d", str(ROOT), "-e", str(env_file), "start", "-p", "5000",
                     "-c", "worker=2"],
                    tmp_path / "honcho.log", {**inherited, "PORT": "", **fleet_env})
    try:
        yield running
    finally:
        running.stop(timeout=60)


def scrape(port: int) -> dict[str, list[dict[str, str]]] | None:
    """Each family's samples' labels, or None while the port does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
            text = page.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return None
    return {family.name: [dict(s.labels, value=str(s.value)) for s in family.samples]
            for family in text_string_to_metric_families(text)}


def pinged(env: dict[str, str]) -> set[str]:
    """The node names that answer ``celery inspect ping`` on this deployment."""
    done = subprocess.run([sys.executable, "-m", "celery", "-A", "tasks", "inspect", "ping",
                           "--json", "--timeout", "3"], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=90, check=False, cwd=ROOT)
    if done.returncode != 0:
        return set()
    replies = json.loads(done.stdout.strip().splitlines()[-1])
    return {name for reply in (replies if isinstance(replies, list) else [replies])
            for name in reply}


def test_honcho_runs_two_named_workers_each_scraped_on_its_own_port(
        honcho: Child, fleet_env: dict[str, str], prefix: str) -> None:
    # Given the Procfile started by honcho with two workers
    base = int(fleet_env["FULFILMENT_METRICS_PORT"])

    def both_serving() -> list[dict[str, list[dict[str, str]]]] | None:
        if not honcho.alive():
            raise AssertionError(f"honcho exited:\n{honcho.output()[-6000:]}")
        pages = [scrape(base), scrape(base + 1)]
        return [page for page in pages if page] if all(pages) else None

    # When both workers' metrics endpoints answer
    pages = wait_for(both_serving, timeout=120, interval=0.5,
                     what=f"metrics on {base} and {base + 1}\n{honcho.output()[-4000:]}")
    assert pages is not None  # wait_for returns only a truthy value
    # Then each names its own worker, of this deployment
    infos = [page["fulfilment_worker_info"] for page in pages]
    nodes = [info[0]["node"] for info in infos]
    host = socket.gethostname()
    assert nodes == [f"worker1@{host}", f"worker2@{host}"]
    assert {info[0]["deployment"] for info in infos} == {prefix}
    # And a quiet fleet's held-back counters read 0 rather than nothing
    for page in pages:
        assert {s["reason"] for s in page["fulfilment_onebox_held_back"]} == \
            {"circuit_open", "probing", "rate_limited"}
    # And Celery's remote control sees both, under the same names
    env = {k: v for k, v in fleet_env.items() if k != "TMPDIR"}

    def both_pinged() -> set[str] | None:
        answered = pinged(env)
        return answered if answered >= set(nodes) else None

    seen = wait_for(both_pinged, timeout=90, interval=1.0,
                    what="both workers answering celery inspect ping")
    assert seen == set(nodes)
