"""Real processes for end-to-end tests: the sandbox server and Celery workers.

Each is a child process on loopback with its output in a file of the test's
temporary directory (shown when a test fails), stopped with SIGTERM and, if it
will not go, SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from fulfilment.harness.hostcrash import CrashReport, build_shim, cut_to_synced
from fulfilment.sandbox import SandboxAdmin

T = TypeVar("T")


def wait_for(condition: Callable[[], T], *, timeout: float, what: str,
             interval: float = 0.05) -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Child:
    """A child process with its output going to a log file."""

    def __init__(self, args: list[str], log_path: Path, env: Mapping[str, str]) -> None:
        self.args, self.env = args, dict(env)
        #: Set when the test means it to end, so a supervisor leaves it dead.
        self.stopping = False
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **env}, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (a Celery worker and its pool children)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    def stop(self, timeout: float = 20.0) -> None:
        self.stopping = True
        if self.alive():
            self.kill(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.process.wait(10)
        else:
            self.kill(signal.SIGKILL)  # any orphaned pool children
        self._log.close()


class SandboxProcess(Child):
    """``python -m fulfilment.sandbox`` on a free loopback port."""

    def __init__(self, log_path: Path, *extra: str) -> None:
        super().__init__([sys.executable, "-m", "fulfilment.sandbox", "--port", "0", *extra],
                         log_path, {})
        line = wait_for(self._listening, timeout=20, what="the sandbox to listen")
        assert line is not None  # wait_for returns only a truthy value
        self.url = line.rsplit(" ", 1)[-1].strip()
        self.admin = SandboxAdmin(self.url)

    def _listening(self) -> str | None:
        if not self.alive():
            raise AssertionError(f"the sandbox exited:\n{self.output()}")
        for line in self.output().splitlines():
            if line.startswith("sandbox listening on "):
                return line
        return None

    def stop(self, timeout: float = 20.0) -> None:
        self.admin.close()
        super().stop(timeout)


class WebhooksProcess(Child):
    """``fulfilment webhooks`` on a free loopback port, with ``env``'s settings.

    ``url`` is where it listens (read from the line it prints once it does);
    ``endpoint`` is where Onebox posts.
    """

    def __init__(self, log_path: Path, env: Mapping[str, str]) -> None:
        super().__init__([sys.executable, "-m", "tasks.commands", "webhooks", "--address",
                          "127.0.0.1:0"], log_path, env)
        line = wait_for(self._listening, timeout=30, what="the webhooks receiver to listen")
        assert line is not None  # wait_for returns only a truthy value
        self.url = line.rsplit(" ", 1)[-1].strip()
        self.endpoint = f"{self.url}/webhooks/onebox"

    def _listening(self) -> str | None:
        if not self.alive():
            raise AssertionError(f"fulfilment webhooks exited:\n{self.output()}")
        for line in self.output().splitlines():
            if line.startswith("webhooks listening on "):
                return line
        return None


def worker_args(queues: list[str], name: str, *, concurrency: int = 2, beat: bool = False,
                schedule: Path | None = None, pool: str = "prefork") -> list[str]:
    args = [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-l", "INFO",
            "-P", pool, "-c", str(concurrency), "-Q", ",".join(queues), "-n", name,
            "--without-gossip", "--without-mingle", "--without-heartbeat"]
    if beat:
        args += ["-B", "-s", str(schedule)]
    return args


class RedisServer(Child):
    """A redis-server of the test's own on a spare port, persisting as production should.

    Append-only file with an fsync every second (``appendfsync``), as the README
    tells production to run: the chaos tests restart it and check that nothing
    is lost.

    With ``simulate_host_crash`` it runs with fulfilment/harness/fsync_shim.c preloaded, which
    logs how much of each file every fsync made durable (``sync_log``), and
    :meth:`crash` then simulates a power cut: see fulfilment/harness/hostcrash.py. AOF
    rewrites are off in that mode (``--auto-aof-rewrite-percentage 0``): the shim
    does not model directory entries, so the set of append-only files must not
    change after start-up.
    """

    def __init__(self, directory: Path, port: int, *, appendfsync: str | None = "everysec",
                 simulate_host_crash: bool = False, password: str | None = None) -> None:
        if appendfsync not in {"always", "everysec", "no", None}:
            raise ValueError(f"appendfsync must be always, everysec, no or None (no "
                             f"append-only file at all), not {appendfsync!r}")
        self.port = port
        self.directory = directory
        self.appendfsync = appendfsync
        self.simulate_host_crash = simulate_host_crash
        #: With a password, clients must AUTH (``--requirepass``); ``url`` carries it.
        self.password = password
        #: The append-only directory (multi-part AOF: manifest, base and incr files).
        self.aof_dir = directory / "appendonlydir"
        #: Where the shim logs durable lengths (outside ``aof_dir``: it is not Redis's disk).
        self.sync_log = directory / "fsync-shim.log"
        self._shim: Path | None = None
        if simulate_host_crash:
            self._shim = build_shim()
        directory.mkdir(parents=True, exist_ok=True)
        self._start_count = 0
        self._spawn()

    def _spawn(self) -> None:
        self._start_count += 1
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.directory), "--save", "", "--maxmemory-policy", "noeviction"]
        if self.password is not None:
            args += ["--requirepass", self.password]
        args += (["--appendonly", "no"] if self.appendfsync is None
                 else ["--appendonly", "yes", "--appendfsync", self.appendfsync])
        env: dict[str, str] = {}
        if self._shim is not None:
            args += ["--appenddirname", self.aof_dir.name, "--auto-aof-rewrite-percentage", "0",
                     "--aof-load-truncated", "yes"]
            preload = " ".join(filter(None, [str(self._shim), os.environ.get("LD_PRELOAD")]))
            env = {"LD_PRELOAD": preload, "FSYNC_SHIM_LOG": str(self.sync_log)}
        super().__init__(args, self.directory / f"redis-{self._start_count}.log", env)
        wait_for(self._ping, timeout=20, what="redis-server to answer")

    def _ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, password=self.password,
                                    socket_connect_timeout=0.5).ping())
        except redis.RedisError:
            if not self.alive():
                raise AssertionError(f"redis-server exited:\n{self.output()}") from None
            return False

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password is not None else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def restart(self) -> None:
        """Stop it (it writes its append-only file on the way out) and start it again."""
        super().stop()
        self._spawn()

    def crash(self) -> CrashReport:
        """Simulate a host crash: SIGKILL, lose every byte of the append-only files
        that no fsync covered, and start it again on the same port and directory.

        Returns what each file held and kept. Needs ``simulate_host_crash=True``.
        """
        if self._shim is None:
            raise RuntimeError("crash() needs RedisServer(..., simulate_host_crash=True)")
        self.stopping = True
        self.kill(signal.SIGKILL)
        self.process.wait(10)  # reaped: no thread of it is still writing or syncing
        self._log.close()
        report = cut_to_synced(self.aof_dir, self.sync_log)
        self._spawn()
        return report


@dataclass(frozen=True)
class Finished:
    """How a command ran: its exit code, output, peak memory and time."""

    returncode: int
    stdout: str
    stderr: str
    peak_rss_kib: int  # the process's own high-water mark of resident memory
    wall: float  # seconds
    cpu: float  # seconds of user and system CPU


def run_measured(args: list[str], env: Mapping[str, str], *, timeout: float,
                 directory: Path) -> Finished:
    """Run a command to its end; its own peak RSS (``wait4``'s ``ru_maxrss``), wall and CPU.

    Output goes to files in ``directory`` (no pipe to fill), so a command that
    prints a lot cannot block on it.
    """
    name = f"run-{uuid.uuid4().hex[:8]}"
    out, err = directory / f"{name}.out", directory / f"{name}.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        started = time.monotonic()
        process = subprocess.Popen(args, stdout=stdout, stderr=stderr,
                                   env={**os.environ, **env})
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise AssertionError(f"{args[:6]} did not finish in {timeout}s:\n"
                                     f"{err.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)
        wall = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    return Finished(process.returncode, out.read_text(errors="replace"),
                    err.read_text(errors="replace"), usage.ru_maxrss, wall,
                    usage.ru_utime + usage.ru_stime)


def unique_prefix(kind: str = "t") -> str:
    """A key prefix of its own, for one test or benchmark run."""
    return f"{kind}-{uuid.uuid4().hex[:10]}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: Clock ticks per second, the unit of /proc/<pid>/stat's CPU times.
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, children: bool = True) -> float:
    """CPU time (user + system) a process, and its direct children, used so far."""
    total = 0.0
    for p in [pid, *(child_pids(pid) if children else [])]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue  # exited meanwhile
        total += (int(fields[11]) + int(fields[12])) / TICK  # utime + stime
    return total


def child_pids(pid: int) -> list[int]:
    """The direct children of a process (a Celery worker's pool processes)."""
    done = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                          text=True, check=False)
    return [int(line) for line in done.stdout.split()]
