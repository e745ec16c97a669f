"""The production install runs: ``pip install .`` with no extras, as the Dockerfile does.

A fresh virtualenv in a temporary directory gets the project from a copy of
exactly what the Dockerfile copies (so the build leaves nothing in the source
tree), and every process runs from the temporary directory with PYTHONPATH
unset, so nothing can be imported from the source tree by accident. With that
venv's executables: the sandbox, a real worker against the machine's Redis,
``fulfilment submit`` and ``celery inspect ping``; the intent's confirmed result
is read back from the results queue.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fulfilment.config import Settings
from fulfilment.harness.cluster import env_for
from fulfilment.harness.processes import free_port, wait_for
from fulfilment.keys import Keys
from fulfilment.results import consume_results
from fulfilment.topology import Topology
from fulfilment.wiring import broker_connection

pytestmark = pytest.mark.integration

PROJECT = Path(__file__).resolve().parents[2]
#: What the Dockerfile copies into the image before ``pip install .``.
DOCKERFILE_COPIES = ("pyproject.toml", "README.md", "schemas", "fulfilment", "tasks")


class Installed:
    """A process started from the fresh venv, in the temporary directory, without PYTHONPATH."""

    def __init__(self, args: list[str], cwd: Path, log_path: Path, env: dict[str, str]) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(args, cwd=cwd, env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._log.close()


def clean_env(**extra: str) -> dict[str, str]:
    """This machine's environment less PYTHONPATH and any project setting, plus ``extra``."""
    keep = {k: v for k, v in os.environ.items()
            if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}
            and not k.startswith(("FULFILMENT_", "ONEBOX_"))}
    return {**keep, **extra}


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with ``pip install .`` of a Dockerfile-like copy of the project."""
    root = tmp_path_factory.mktemp("install")
    source = root / "src"
    source.mkdir()
    for name in DOCKERFILE_COPIES:
        origin = PROJECT / name
        if origin.is_dir():
            shutil.copytree(origin, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(origin, source / name)
    target = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(target)], check=True, cwd=root,
                   env=clean_env(), timeout=120)
    # No extras, as in the Dockerfile; pip's cache is reused to keep this quick.
    done = subprocess.run([str(target / "bin" / "python"), "-m", "pip", "install",
                           "--disable-pip-version-check", "-q", str(source)],
                          cwd=root, env=clean_env(), capture_output=True, text=True,
                          timeout=900, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return target


def test_a_plain_install_runs_worker_submit_and_inspect(venv: Path, redis_url: str, prefix: str,
                                                        tmp_path: Path) -> None:
    bin_ = venv / "bin"
    # Nothing of the source tree is importable: the venv's python finds the installed copy.
    where = subprocess.run([str(bin_ / "python"), "-c",
                            "import tasks, fulfilment, schemas; print(tasks.__file__)"],
                           cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                           timeout=60, check=False)
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().startswith(str(venv)), where.stdout

    sandbox = Installed([str(bin_ / "fulfilment"), "sandbox", "--port", "0"], tmp_path,
                        tmp_path / "sandbox.log", clean_env())
    worker: Installed | None = None
    try:
        def listening() -> str | None:
            if not sandbox.alive():
                raise AssertionError(f"the sandbox exited:\n{sandbox.output()}")
            for line in sandbox.output().splitlines():
                if line.startswith("sandbox listening on "):
                    return line.rsplit(" ", 1)[-1].strip()
            return None

        sandbox_url = wait_for(listening, timeout=30, what="the installed sandbox to listen")
        settings = Settings.from_env({"FULFILMENT_REQUIRE_DURABLE_REDIS": "false"}).with_overrides(
            onebox_api_url=sandbox_url, redis_url=redis_url, broker_url=redis_url,
            key_prefix=prefix, metrics_port=free_port())  # not 9650: tests run side by side
        # The machine's Redis does not fsync every write; durability is not what this tests.
        env = clean_env(**{**env_for(settings), "FULFILMENT_REQUIRE_DURABLE_REDIS": "false"})
        worker = Installed([str(bin_ / "celery"), "-A", "tasks", "worker", "-l", "INFO",
                            "-P", "prefork", "--concurrency", "2", "-n", f"{prefix}@%h"],
                           tmp_path, tmp_path / "worker.log", env)
        wait_for(lambda: worker is not None and ("ready." in worker.output()
                                                 or not worker.alive()),
                 timeout=60, what="the installed worker to be ready")
        assert worker.alive(), worker.output()

        intents = tmp_path / "intents.jsonl"
        intents.write_text(json.dumps({
            "reference": "install-1",
            "items": [{"session_id": 1002, "price_type_id": 3, "quantity": 1}],
            "buyer": {"email": "install@example.com"}}) + "\n")
        submitted = subprocess.run([str(bin_ / "fulfilment"), "submit", str(intents)],
                                   cwd=tmp_path, env=env, capture_output=True, text=True,
                                   timeout=120, check=False)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        assert "1 enqueued" in submitted.stdout

        ping = subprocess.run([str(bin_ / "celery"), "-A", "tasks", "inspect", "ping",
                               "--timeout", "10"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120, check=False)
        assert "Error" not in ping.stderr and "No module named" not in ping.stdout + ping.stderr
        assert ping.returncode == 0 and "pong" in ping.stdout, ping.stdout + ping.stderr

        # Then the intent's confirmed result arrives on the results queue
        topology = Topology.for_keys(Keys(prefix))
        deadline = time.monotonic() + 120
        with broker_connection(settings) as connection:
            outcome = None
            while outcome is None:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no result for install-1\n{worker.output()[-6000:]}"
                for result in consume_results(connection, topology, timeout=0.2,
                                              idle_timeout=min(remaining, 2.0)):
                    outcome = result
                    break
        assert outcome.reference == "install-1"
        assert outcome.status == "confirmed" and outcome.order_code, outcome
        assert worker.alive(), worker.output()[-6000:]
    finally:
        if worker is not None:
            worker.stop()
        sandbox.stop()
