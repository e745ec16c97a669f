"""A host crash, simulated: lose exactly what Redis wrote but had not yet fsynced.

Killing redis-server loses nothing: its writes sit in the kernel's page cache
and reach the disk anyway. A power cut or kernel panic loses whatever was
written to the append-only file after its last successful fsync. To simulate
that, redis-server runs with fulfilment/harness/fsync_shim.c preloaded (LD_PRELOAD): after
every successful fsync/fdatasync of a regular file it appends a line to a log,
the *sync log*, with the file's device, inode and the length made durable (the
file's size as the sync began: bytes appended while it ran are not covered).
After SIGKILL, :func:`cut_to_synced` truncates every file of the append-only
directory to that length (to nothing if it was never synced).

Not modelled: directory entries (a file created or renamed but whose directory
was never synced could vanish on a real crash). The test server therefore runs
with AOF rewrites disabled (``--auto-aof-rewrite-percentage 0``), so its set of
files is fixed once Redis has created them at start-up and synced the
directory (it does so before it accepts connections). Disk and file-system
behaviour beyond POSIX (torn sectors, reordered writes within the unsynced
tail) is not modelled either: the unsynced tail is lost whole.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SHIM_SOURCE = Path(__file__).with_name("fsync_shim.c")

FileId = tuple[int, int]  # (st_dev, st_ino)


def compiler() -> str | None:
    return shutil.which("cc")


def build_shim() -> Path:
    """Compile the shim once per source version into a cache directory; its path.

    Compiled to a temporary name and renamed, so concurrent test processes can
    race here safely.
    """
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc) to build fulfilment/harness/fsync_shim.c")
    source = SHIM_SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / f"fulfilment-fsync-shim-{os.getuid()}-{digest}"
    target = cache / "fsync_shim.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f"fsync_shim.{os.getpid()}.so.partial"
    done = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror",
                           "-o", str(partial), str(SHIM_SOURCE), "-ldl"],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"cc could not build {SHIM_SOURCE}:\n{done.stderr}")
    partial.replace(target)
    return target


def _records(log: Path) -> Iterator[tuple[str, FileId, int]]:
    if not log.exists():
        return
    text = log.read_text(errors="replace")
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break  # torn last line: the shim died mid-write, so its sync never returned
        kind, dev, ino, length, _path = line.rstrip("\n").split("\t", 4)
        yield kind, (int(dev), int(ino)), int(length)


def synced_lengths(log: Path) -> dict[FileId, int]:
    """How many leading bytes of each file are durable, replaying the sync log in order.

    A sync makes at least its length durable (syncs from two threads may
    finish in either order, so the larger counts); a truncation caps it (bytes
    beyond the cut were replaced or are gone); a freed inode is forgotten.
    """
    lengths: dict[FileId, int] = {}
    for kind, file_id, length in _records(log):
        if kind == "S":
            lengths[file_id] = max(lengths.get(file_id, 0), length)
        elif kind == "T":
            lengths[file_id] = min(lengths.get(file_id, 0), length)
        elif kind == "D":
            lengths.pop(file_id, None)
        else:
            raise ValueError(f"unknown record {kind!r} in {log}")
    return lengths


@dataclass(frozen=True)
class FileCut:
    name: str
    size: int  # bytes in the file when the host went down
    synced: int  # bytes of it that had been fsynced

    @property
    def lost(self) -> int:
        return max(self.size - self.synced, 0)


@dataclass(frozen=True)
class CrashReport:
    files: tuple[FileCut, ...]

    @property
    def bytes_lost(self) -> int:
        return sum(cut.lost for cut in self.files)

    def __str__(self) -> str:
        return ", ".join(f"{c.name}: {c.size} bytes, {c.synced} synced, {c.lost} lost"
                         for c in self.files)


def survey(directory: Path, log: Path) -> CrashReport:
    """Each regular file in ``directory`` with its size and its durable length."""
    lengths = synced_lengths(log)
    cuts = []
    for path in sorted(directory.iterdir()):
        st = path.lstat()
        if stat.S_ISREG(st.st_mode):
            synced = min(lengths.get((st.st_dev, st.st_ino), 0), st.st_size)
            cuts.append(FileCut(path.name, st.st_size, synced))
    return CrashReport(tuple(cuts))


def cut_to_synced(directory: Path, log: Path) -> CrashReport:
    """Truncate each file in ``directory`` to its durable length (the server must be dead).

    Each cut is appended to the sync log too, so the log stays the one record
    of what is on the "disk" for the next crash.
    """
    report = survey(directory, log)
    with log.open("a") as records:
        for cut in report.files:
            if cut.lost:
                path = directory / cut.name
                os.truncate(path, cut.synced)
                st = path.stat()
                records.write(f"T\t{st.st_dev}\t{st.st_ino}\t{cut.synced}\t{path}\n")
    return report


def count_commands(aof: Path, *command: bytes) -> int:
    """How many times the whole command ``command`` (e.g. ``b"INCR", b"key"``) is in an
    append-only file (RESP arrays; a torn command at the end is not counted)."""
    data = aof.read_bytes()
    wanted = [part.lower() if i == 0 else part for i, part in enumerate(command)]
    count, pos = 0, 0
    while pos < len(data):
        parsed = _command_at(data, pos)
        if parsed is None:
            break
        args, pos = parsed
        if args and [args[0].lower(), *args[1:]] == wanted:
            count += 1
    return count


def _command_at(data: bytes, pos: int) -> tuple[list[bytes], int] | None:
    end = data.find(b"\r\n", pos)
    if end < 0 or data[pos:pos + 1] != b"*":
        return None
    argc, pos, args = int(data[pos + 1:end]), end + 2, []
    for _ in range(argc):
        end = data.find(b"\r\n", pos)
        if end < 0 or data[pos:pos + 1] != b"$":
            return None
        size = int(data[pos + 1:end])
        start = end + 2
        if start + size + 2 > len(data):
            return None
        args.append(data[start:start + size])
        pos = start + size + 2
    return args, pos
