"""What a host crash (power cut, kernel panic) costs the ledger's Redis, per fsync policy.

Killing redis-server loses nothing, since its writes are in the kernel's page
cache; a host crash loses whatever reached the append-only file after its last
fsync. ``RedisServer(simulate_host_crash=True).crash()`` simulates exactly that
(fulfilment/harness/fsync_shim.c and hostcrash.py): under ``appendfsync everysec``
acknowledged writes are lost, under ``always`` none. Each test also checks that
what survives is exactly what the synced part of the file holds, nothing more
and nothing less. Run with ``pytest -s`` to see the numbers.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from fulfilment.harness.hostcrash import compiler, count_commands, survey, synced_lengths
from fulfilment.harness.processes import RedisServer, wait_for
from tests.services import free_port, require

pytestmark = pytest.mark.integration

COUNTER = b"host-crash:counter"
#: Writes per burst under everysec: a few milliseconds of pipelined INCRs.
BURST = 2000
#: An fsync may land just after a burst (once a second, at a clock-second
#: boundary); a burst then has nothing unsynced to lose, and is tried again.
ATTEMPTS = 5
WRITERS = 4
#: Acknowledged writes (all threads) under always before the crash.
ALWAYS_WRITES = 4000


def needs_tools() -> None:
    require("redis-server", shutil.which("redis-server") is not None)
    require("a C compiler (cc) for the fsync shim", compiler() is not None)


def start(tmp_path: Path, appendfsync: str) -> RedisServer:
    needs_tools()
    return RedisServer(tmp_path / "redis", free_port(), appendfsync=appendfsync,
                       simulate_host_crash=True)


@pytest.fixture
def everysec(tmp_path: Path) -> Iterator[RedisServer]:
    server = start(tmp_path, "everysec")
    yield server
    server.stop()


@pytest.fixture
def always(tmp_path: Path) -> Iterator[RedisServer]:
    server = start(tmp_path, "always")
    yield server
    server.stop()


def client(server: RedisServer) -> redis.Redis:
    """One connection, no retries: a write that fails must not be sent again elsewhere."""
    return redis.Redis(port=server.port, single_connection_client=True, socket_timeout=10,
                       retry=Retry(NoBackoff(), 0))


def incr(connection: redis.Redis, key: bytes) -> int:
    """A real INCR (redis-py's ``incr`` sends INCRBY key 1); the reply."""
    return int(connection.execute_command("INCR", key))  # type: ignore[no-untyped-call]


def burst(server: RedisServer) -> list[int]:
    """BURST INCRs of the counter, pipelined (not a transaction); the replies."""
    with client(server) as connection:
        pipe = connection.pipeline(transaction=False)
        for _ in range(BURST):
            pipe.execute_command("INCR", COUNTER)
        return [int(reply) for reply in pipe.execute()]


def incr_file(server: RedisServer) -> Path:
    files = sorted(server.aof_dir.glob("*.incr.aof"))
    assert len(files) == 1, f"expected one incr file (rewrites are off), found {files}"
    return files[0]


def unsynced(server: RedisServer) -> int:
    return survey(server.aof_dir, server.sync_log).bytes_lost


def counter(server: RedisServer, key: bytes = COUNTER) -> int:
    with client(server) as connection:
        value = connection.get(key)
    return int(value) if value is not None else 0


def test_the_shim_records_every_fsync_of_the_append_only_file(always: RedisServer) -> None:
    with client(always) as connection:
        for _ in range(50):
            incr(connection, COUNTER)
    aof = incr_file(always)
    st = aof.stat()
    lengths = synced_lengths(always.sync_log)
    # Under "always" each acknowledged write was fsynced before its reply, so
    # the shim saw the whole file made durable, and every file has a record.
    assert st.st_size > 0
    assert lengths.get((st.st_dev, st.st_ino)) == st.st_size
    report = survey(always.aof_dir, always.sync_log)
    print(f"\nshim log after 50 writes under always: {report}")
    assert {cut.name for cut in report.files} >= {aof.name, "appendonly.aof.manifest"}
    assert all(cut.synced == cut.size > 0 for cut in report.files), report


def test_everysec_loses_acknowledged_writes_in_a_host_crash(everysec: RedisServer) -> None:
    acknowledged = burst(everysec)[-1]  # to be synced before the first crash
    for attempt in range(1, ATTEMPTS + 1):
        # Start from a fully synced file, so the burst alone is at stake.
        wait_for(lambda: unsynced(everysec) == 0, timeout=10,
                 what="the background fsync to cover the file")
        durable = counter(everysec)
        assert durable == acknowledged  # nothing acknowledged before this burst was lost
        replies = burst(everysec)
        assert replies == list(range(durable + 1, durable + BURST + 1))
        acknowledged = replies[-1]
        report = everysec.crash()
        survived = counter(everysec)
        lost = acknowledged - survived
        print(f"\neverysec, attempt {attempt}: {acknowledged} writes acknowledged, "
              f"{survived} survived, {lost} lost; {report}")
        # Exactly what the synced prefix of the file holds survives: not less, not more.
        assert survived == count_commands(incr_file(everysec), b"INCR", COUNTER)
        assert durable <= survived <= acknowledged
        if report.bytes_lost > 0:
            # The cut tail ends with the burst's last INCR: at least one is gone.
            assert lost > 0
            return
        acknowledged = survived
    pytest.fail(f"an fsync covered each of {ATTEMPTS} bursts before the crash")


def test_always_keeps_every_acknowledged_write_in_a_host_crash(always: RedisServer) -> None:
    acknowledged = [0] * WRITERS
    errors: list[BaseException | None] = [None] * WRITERS
    stop = threading.Event()

    def write(index: int) -> None:
        key = COUNTER + b":%d" % index
        connection = client(always)
        try:
            while not stop.is_set():
                acknowledged[index] = incr(connection, key)
        except Exception as error:  # a ConnectionError is the crash, mid-write
            errors[index] = error
        finally:
            connection.close()

    writers = [threading.Thread(target=write, args=(i,), daemon=True) for i in range(WRITERS)]
    for writer in writers:
        writer.start()
    try:
        wait_for(lambda: sum(acknowledged) >= ALWAYS_WRITES
                 or not all(writer.is_alive() for writer in writers),
                 timeout=60, what=f"{ALWAYS_WRITES} acknowledged writes")
        assert all(writer.is_alive() for writer in writers), f"a writer failed: {errors}"
        # Crash with every writer still writing: some INCR of each is in flight.
        report = always.crash()
    finally:
        stop.set()
        for writer in writers:
            writer.join(15)
    assert not any(writer.is_alive() for writer in writers)
    assert all(isinstance(error, redis.ConnectionError) for error in errors), errors

    survived = [counter(always, COUNTER + b":%d" % i) for i in range(WRITERS)]
    lost = sum(max(a - s, 0) for a, s in zip(acknowledged, survived, strict=True))
    print(f"\nalways: {sum(acknowledged)} writes acknowledged ({acknowledged}), "
          f"{sum(survived)} survived ({survived}), {lost} lost; {report}")
    aof = incr_file(always)
    for index, (acked, kept) in enumerate(zip(acknowledged, survived, strict=True)):
        assert kept == count_commands(aof, b"INCR", COUNTER + b":%d" % index)
        # Every acknowledged write survives; at most the one in flight may too.
        assert acked <= kept <= acked + 1
    assert lost == 0
