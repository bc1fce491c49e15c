"""nixspool-hook: Nix's post-build-hook. Record the build, exit 0, fast.

Nix runs this as root after every local build, synchronously in the build
loop (before Nix 2.35 and Lix 2.94): its run time is added to every build,
and a non-zero exit stops the build. So this module:
- imports only the standard library (a test checks), and not tomllib;
- never calls nix, never reads stdin, never starts a child process;
- prints nothing on success, one `nixspool: ...` line on stderr otherwise;
- always exits 0.

Where a record goes, first choice first:
1. the SQLite spool (one short IMMEDIATE transaction, bounded busy wait);
2. the fallback journal beside it (one O_APPEND line), imported into the
   spool by the next `nixspool` command; on a full disk, after deleting the
   ballast file that `nixspool` keeps beside the spool for this moment;
3. nowhere: the error line says what was lost and why.
"""

from __future__ import annotations

import os
import sys
import time

from . import files, locate, storepath
from .rows import BALLAST_SUFFIX, HOOK_BUSY_TIMEOUT_SECONDS, Record, store, validated

# The C module behind `sqlite3`, without the DB-API layer's datetime adapters
# and their imports: about a third of an interpreter start saved on every
# build. It has the same connect() and exceptions; it is CPython's own.
try:
    import _sqlite3 as sqlite3
except ImportError:  # pragma: no cover - an interpreter without the split
    import sqlite3  # type: ignore[no-redef]

# The WAL size past which the hook empties it (see _bound_wal).
WAL_LIMIT_BYTES = 1 << 20


def _say(level: str, message: str) -> None:
    # One line, whatever the message holds: a newline, or bytes that are not
    # UTF-8 (surrogates), from a path in the environment, are shown escaped.
    line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    try:  # noqa: SIM105 - contextlib is one more import on every build
        print(f"nixspool: {level}: {line}", file=sys.stderr, flush=True)
    except Exception:  # noqa: S110 - stderr closed: nothing left to tell, the build goes on
        pass


def read_record(environ: dict[str, str] | os._Environ[str], now: float) -> Record:
    """Validate DRV_PATH and OUT_PATHS into a record of what to store."""
    return validated(
        environ.get("DRV_PATH", ""),
        # Nix separates with single spaces; runs of spaces are tolerated, but not
        # newlines or tabs, which are control characters and rejected as such.
        environ.get("OUT_PATHS", "").split(" "),
        [],
        now,
        storepath.store_dir(environ),
    )


def _enter(directory: str) -> None:
    """Refuse a spool directory others could write to (planted rows, links); then,
    as root, take its owner's rights for good, so that nothing planted there can
    make root write outside it (docs/security.md#ownership). The hook does not read `user`,
    so any owner passes here; `nixspool` checks the owner too."""
    reason = files.why_spool_unsafe(directory, None)
    if reason is not None:
        raise PermissionError(reason)
    files.drop_to_owner(directory)


def write_spool(spool: str, record: Record) -> None:
    """Store the record in the SQLite spool or raise."""
    files.check_database(spool)  # no link, FIFO or directory the owner left there
    # mode=rw: never create the spool here. A missing spool is created, with
    # its schema and owner, by the next `nixspool` command; until then
    # records wait in the journal.
    uri = "file:" + spool.replace("%", "%25").replace("?", "%3f").replace("#", "%23")
    deadline = time.monotonic() + HOOK_BUSY_TIMEOUT_SECONDS
    while True:
        # SQLite's busy handler waits at most what is left of our one bound: a
        # retry after an immediate "locked" must not start a whole wait anew.
        left = max(0.0, deadline - time.monotonic())
        con = sqlite3.connect(uri + "?mode=rw", uri=True, timeout=left, isolation_level=None)
        try:
            # As durable as Nix's own record of the build: Nix keeps its store
            # database in WAL mode with synchronous = normal too. A commit
            # survives any process crash; it costs no fsync of its own.
            con.execute("PRAGMA synchronous = NORMAL")
            con.execute("BEGIN IMMEDIATE")
            store(con, [record])
            con.execute("COMMIT")
            _bound_wal(con, spool)
            _committed.append(con)  # see launch(): not closed on purpose
            return
        except sqlite3.OperationalError as e:
            con.close()
            # WAL recovery and some lock upgrades answer "locked" at once,
            # without the busy handler: keep trying until our own bound.
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
        except BaseException:
            con.close()
            raise
        time.sleep(0.005)


# Connections whose transaction committed; launch() exits without closing them.
_committed: list[sqlite3.Connection] = []


def _bound_wal(con: sqlite3.Connection, spool: str) -> None:
    """Keep the WAL from growing with every build while no `nixspool` runs.

    Each hook is the spool's only connection and exits without closing it, so
    the next one rebuilds the WAL index from the whole WAL and can never
    restart it: SQLite's own checkpoints copy frames but the file only grows
    (76 MiB and 3.3 times the hook's time after 3000 builds). Past
    WAL_LIMIT_BYTES the hook empties it: a checkpoint of at most that much,
    once every few dozen builds. Never waiting: if a reader (a flush) is in
    the way, the next hook tries again.
    """
    try:
        if os.stat(spool + "-wal").st_size > WAL_LIMIT_BYTES:
            con.execute("PRAGMA busy_timeout = 0")
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    except Exception:  # noqa: S110 - the record is committed; this is housekeeping
        pass


def write_journal(spool: str, record: Record) -> str:
    """Append the record to the fallback journal; free the ballast if the disk is full."""
    from . import journal  # only on this rare path: it is not free to import

    path = locate.fallback_journal(spool)
    try:
        journal.append(path, record)
    except OSError as e:
        import errno

        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        os.unlink(spool + BALLAST_SUFFIX)  # FileNotFoundError: no ballast left
        journal.append(path, record)
        return path + " (disk full: used the ballast; free some space)"
    return path


def _describe(record: Record) -> str:
    return record.drv_path or " ".join(record.outputs) or "this build"


def _why(error: BaseException) -> str:
    if isinstance(error, sqlite3.OperationalError) and "unable to open" in str(error):
        return "it does not exist yet (any nixspool command creates it)"
    return str(error) or type(error).__name__


def run(environ: dict[str, str] | os._Environ[str]) -> None:
    record = read_record(environ, time.time())
    if not record.path_rows() and not record.rejects:
        _say("error", "DRV_PATH and OUT_PATHS are empty: run me as Nix's post-build-hook")
        return
    spool_error = None
    try:
        spool = locate.hook_spool(environ)
    except Exception as e:
        # Not into the default spool itself, whose rows no remote of the real
        # config would ever see: into the journal beside it, which every
        # nixspool command imports into whichever spool the config names.
        spool = locate.default_spool(environ)
        spool_error = f"config: {e}"
    try:
        _enter(os.path.dirname(spool))
    except OSError as e:
        # The configured directory cannot be used safely: the journal beside the
        # default spool, as for a broken config, if that is another directory.
        fallback = locate.default_spool(environ)
        if os.path.dirname(fallback) == os.path.dirname(spool):
            _say("error", f"did not record {_describe(record)}: {e}")
            return
        try:
            _enter(os.path.dirname(fallback))
        except OSError as fallback_error:
            _say("error", f"did not record {_describe(record)}: {e}; and {fallback_error}")
            return
        spool, spool_error = fallback, spool_error or str(e)
    if spool_error is None:
        try:
            write_spool(spool, record)
            return
        except Exception as e:
            spool_error = _why(e)
    try:
        where = write_journal(spool, record)
    except Exception as e:
        _say(
            "error",
            f"did not record {_describe(record)}: spool {spool}: {spool_error}; "
            f"fallback journal: {e}",
        )
        return
    _say("warning", f"spool {spool}: {spool_error}; recorded in {where}")


def main() -> int:
    try:
        os.umask(0o077)  # whatever the hook creates is for root and the spool's owner
        run(os.environ)
    except BaseException as e:  # the build must go on whatever happens here
        _say("error", f"unexpected {type(e).__name__}: {e}")
    return 0


def launch() -> None:
    """The installed nixspool-hook's entry point: main(), then exit at once.

    Closing the last connection to a WAL database checkpoints it (copies the
    WAL into the database and fsyncs it) and deletes -wal and -shm, which the
    next hook must then create again: together most of the hook's own cost.
    Exiting without closing is safe by SQLite's design: the commit is already
    durable in the WAL, the locks die with the process, and the next
    connection uses the WAL as it is. `nixspool` commands, which close
    normally, checkpoint it.
    """
    code = main()
    try:  # noqa: SIM105 - contextlib is one more import on every build
        sys.stderr.flush()
    except Exception:  # noqa: S110 - stderr closed: nothing left to tell
        pass
    os._exit(code)


if __name__ == "__main__":
    launch()
