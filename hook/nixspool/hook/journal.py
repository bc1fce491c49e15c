"""The fallback journal: one JSON line per hook run that SQLite could not take.

Standard library only (the hook appends to it).

Protocol, so that no line is lost between a hook appending and a `nixspool`
command importing:
- a writer opens the journal with O_APPEND, takes a shared flock, checks that
  the file it holds is still the one at the journal's path (an importer may
  have renamed it away meanwhile; then it starts again), writes one line with
  a single write(2) and fsyncs;
- the importer renames the journal to `*.importing`, takes an exclusive
  flock on it (waiting for writers still holding the old file), reads it,
  hands the records to the spool in one transaction, then unlinks it. If it
  dies before the unlink, the next import reads the same file again; the
  spool ignores records it already has.

Each line starts with a newline too: if a previous write was cut short (disk
full), the cut line ends there and this record stays whole.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time

from . import files, storepath
from .rows import Record, validated

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

FORMAT_VERSION = 1
LOCK_WAIT_SECONDS = 2.0


def encode(record: Record) -> bytes:
    import json

    line = json.dumps(
        {
            "v": FORMAT_VERSION,
            "t": record.recorded_at,
            "drv": record.drv_path,
            "out": record.outputs,
            "rej": record.rejects,
        },
        separators=(",", ":"),
    )
    return ("\n" + line + "\n").encode("utf-8", "surrogateescape")


def decode(line: bytes, store_dir: str) -> Record:
    """A record from one journal line, its paths checked again (see
    rows.validated); ValueError if the line is not a record at all."""
    import json

    data = json.loads(line.decode("utf-8", "surrogateescape"))
    if (
        not isinstance(data, dict)
        or data.get("v") != FORMAT_VERSION
        or not isinstance(data["out"], list)
        or not isinstance(data["rej"], list)
    ):
        raise ValueError("not a nixspool journal record")
    return validated(
        str(data["drv"]),
        [str(p) for p in data["out"]],
        [(str(v), str(r)) for v, r in data["rej"]],
        float(data["t"]),
        store_dir,
        source="journal: ",
    )


def _lock(fd: int, operation: int, deadline: float) -> None:
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES) or time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def append(path: str, record: Record) -> None:
    """Append one record durably; raise OSError if that is impossible."""
    data = encode(record)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        fd = files.open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            _lock(fd, fcntl.LOCK_SH, deadline)
            held = os.fstat(fd)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            if current is None or (current.st_dev, current.st_ino) != (held.st_dev, held.st_ino):
                continue  # an importer took this file away; open the new one
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, f"short write to {path}")
            os.fsync(fd)
            return
        finally:
            os.close(fd)


def drain(path: str, consume: Callable[[list[Record], list[str]], None]) -> int:
    """Hand every journalled record to `consume`, then delete the journal.

    `consume(records, unreadable_lines)` must store them durably before it
    returns; if it raises, the journal stays for the next attempt.
    Returns the number of records and unreadable lines handed over.
    """
    importing = path + ".importing"
    files.check_regular(path)  # a directory or FIFO there is refused, not renamed
    total = 0
    if os.path.lexists(importing):  # left by an importer that died
        total += _import(importing, consume)
    try:
        os.rename(path, importing)
    except FileNotFoundError:
        return total
    return total + _import(importing, consume)


def _import(importing: str, consume: Callable[[list[Record], list[str]], None]) -> int:
    fd = files.open_regular(importing, os.O_RDONLY)
    try:
        _lock(fd, fcntl.LOCK_EX, time.monotonic() + 10 * LOCK_WAIT_SECONDS)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        records: list[Record] = []
        unreadable: list[str] = []
        store_dir = storepath.store_dir()
        for line in b"".join(chunks).split(b"\n"):
            if not line.strip():
                continue
            try:
                records.append(decode(line, store_dir))
            except (ValueError, KeyError, TypeError):
                unreadable.append(line.decode("utf-8", "backslashreplace"))
        consume(records, unreadable)
        os.unlink(importing)
        return len(records) + len(unreadable)
    finally:
        os.close(fd)
