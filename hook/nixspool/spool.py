"""The spool: a SQLite file in WAL mode, the one source of truth.

Tables:
- `paths`: one row per store path the hook recorded (`needs_outputs` = 1
  for a .drv whose outputs Nix 2.8.0 did not pass; the flusher replaces it
  by its outputs). The hook only ever inserts here and into `rejects`.
- `deliveries`: one row per path and remote, with its state, attempts, next
  attempt time, last error and lease. Rows are created lazily by
  `sync_remotes()`, because the hook does not read the config and so does
  not know the remotes; `remotes.expanded_through` remembers how far each
  remote has been fanned out, so a dropped row is not brought back.
- `rejects`: what the hook refused to record, and why.

Ownership (README#ownership): the directory (0700) and the files (0600)
belong to the configured `user`, so that both root (the hook, a root
flusher) and that user (a flusher started by them) can write, and nobody
else can. SQLite gives its -wal and -shm files the database's owner and
mode when root creates them; nixspool does the same for its own files.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import pwd
import sqlite3
import stat
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .errors import SpoolError, UsageError
from .hook import files, journal, locate, rows, storepath
from .hook.rows import BALLAST_SUFFIX, COMMAND_BUSY_TIMEOUT_SECONDS

log = logging.getLogger(__name__)

BALLAST_BYTES = 1 << 20

# Each entry upgrades the schema by one version (PRAGMA user_version).
# Append only; never edit a released entry. The hook's INSERTs (nixspool.hook.rows)
# must stay valid against every version.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE paths (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        path TEXT NOT NULL UNIQUE,
        drv_path TEXT NOT NULL DEFAULT '',
        needs_outputs INTEGER NOT NULL DEFAULT 0,
        recorded_at REAL NOT NULL
    );
    CREATE TABLE remotes (
        name TEXT PRIMARY KEY,
        expanded_through INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE deliveries (
        remote TEXT NOT NULL,
        path_id INTEGER NOT NULL REFERENCES paths (id) ON DELETE CASCADE,
        state TEXT NOT NULL DEFAULT 'queued'
            CHECK (state IN ('queued', 'delivered', 'failed')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL DEFAULT 0,
        last_error TEXT,
        updated_at REAL,
        delivered_at REAL,
        verified INTEGER,
        lease_owner TEXT,
        lease_until REAL NOT NULL DEFAULT 0,
        PRIMARY KEY (remote, path_id)
    ) WITHOUT ROWID;
    CREATE INDEX deliveries_due ON deliveries (remote, state, next_attempt_at, path_id);
    CREATE INDEX deliveries_path ON deliveries (path_id);
    CREATE TABLE rejects (
        id INTEGER PRIMARY KEY,
        value TEXT NOT NULL,
        reason TEXT NOT NULL,
        drv_path TEXT NOT NULL DEFAULT '',
        recorded_at REAL NOT NULL,
        UNIQUE (recorded_at, drv_path, value, reason)
    );
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


class State(enum.StrEnum):
    QUEUED = "queued"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(frozen=True)
class Owner:
    """Who owns the spool's files."""

    uid: int
    gid: int
    name: str

    @classmethod
    def of_user(cls, name: str) -> Owner:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise SpoolError(f"user '{name}' (from the config's 'user') does not exist") from None
        return cls(entry.pw_uid, entry.pw_gid, name)


@dataclass(frozen=True)
class Row:
    """One delivery: a path, to one remote, in one state."""

    id: int
    path: str
    remote: str
    state: State
    attempts: int
    next_attempt_at: float
    last_error: str | None
    recorded_at: float
    delivered_at: float | None
    needs_outputs: bool
    drv_path: str
    verified: bool | None = None


@dataclass(frozen=True)
class Selector:
    """Which delivery rows a retry or drop applies to."""

    ids: tuple[int, ...] = ()
    paths: tuple[str, ...] = ()
    all_failed: bool = False
    remote: str | None = None


def untrusted_row(reason: str) -> str:
    return f"not a Nix store path: {reason} (nixspool did not write this row; it is never used)"


def _store_paths(rows: Iterable[tuple[str]]) -> list[str]:
    """The paths of `rows` that are store paths: the only ones that leave the spool."""
    store_dir = storepath.store_dir()
    return [path for (path,) in rows if storepath.why_invalid(path, store_dir) is None]


def trusted_uids(owner: Owner | None) -> set[int]:
    """Who may own the spool: root, whoever runs this, and the configured user."""
    return {0, os.geteuid()} | ({owner.uid} if owner else set())


def check_permissions(path: str, owner: Owner | None) -> None:
    """Refuse a spool (file or directory) that someone untrusted could write."""
    reason = files.why_spool_unsafe(path, trusted_uids(owner))
    if reason is not None:
        raise SpoolError(reason)


class Spool:
    """An open spool. Create with `Spool.open()`; close with `close()` or `with`."""

    def __init__(self, path: str, conn: sqlite3.Connection) -> None:
        self.path = path
        self.conn = conn

    @functools.cached_property
    def db(self) -> Any:
        """sqlite-utils over the same connection, for reading; imported only when
        used (about 50 ms, which a flush does not need to pay)."""
        import sqlite_utils

        return sqlite_utils.Database(self.conn)

    # -- opening ---------------------------------------------------------------

    @classmethod
    def open(cls, path: str, owner: Owner | None = None) -> Spool:
        """Open (and if needed create) the spool, migrate it, import the journal.

        `owner` is the configured user: files root creates are given to them,
        and files they own are trusted.
        """
        directory = os.path.dirname(path)
        try:
            check_permissions(directory, owner)
            check_permissions(path, owner)
            files.check_database(path)
        except files.NotRegularFile as e:
            raise SpoolError(f"spool: {e}") from None
        except PermissionError:
            raise SpoolError(
                f"spool {path}: permission denied; run nixspool as root or as "
                "the spool's owner (see README#ownership)"
            ) from None
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            old_umask = os.umask(0o077)
            try:
                conn = sqlite3.connect(
                    path, timeout=COMMAND_BUSY_TIMEOUT_SECONDS, isolation_level=None
                )
            finally:
                os.umask(old_umask)
            spool = cls(path, conn)
            spool._migrate()
        except sqlite3.DatabaseError as e:
            raise SpoolError(
                f"spool {path}: {e}; is it readable and writable by this user? "
                "(see README#troubleshooting)"
            ) from None
        except PermissionError as e:
            raise SpoolError(
                f"spool {path}: {e.strerror}; run nixspool as root or as the "
                "spool's owner (see README#ownership)"
            ) from None
        spool._give_to(owner)
        spool.import_journal()
        spool._keep_ballast()
        return spool

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _migrate(self) -> None:
        self.conn.execute("PRAGMA foreign_keys = ON")
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SpoolError(
                f"spool {self.path} has schema version {version}, newer than this "
                f"nixspool knows ({SCHEMA_VERSION}); upgrade nixspool"
            )
        if version == SCHEMA_VERSION:
            return
        # WAL: readers and the hooks' writers do not block each other. The mode
        # is stored in the file, so the hook never has to set it.
        self.conn.execute("PRAGMA journal_mode = WAL")
        with self.transaction():
            # Re-read inside the write lock: another process may have migrated.
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            for number in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[number].split(";"):
                    if statement.strip():
                        self.conn.execute(statement)
            self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _own_files(self) -> list[str]:
        return [self.path + suffix for suffix in ("", "-wal", "-shm", BALLAST_SUFFIX)]

    def _give_to(self, owner: Owner | None) -> None:
        if owner is None or os.geteuid() != 0:
            return
        for path in [os.path.dirname(self.path), *self._own_files()]:
            try:
                st = os.lstat(path)
                if (st.st_uid, st.st_gid) != (owner.uid, owner.gid) and not stat.S_ISLNK(
                    st.st_mode
                ):
                    os.chown(path, owner.uid, owner.gid, follow_symlinks=False)
            except FileNotFoundError:
                pass

    def _keep_ballast(self) -> None:
        # Disk space the hook may free to write its journal on a full disk.
        ballast = self.path + BALLAST_SUFFIX
        if os.path.lexists(ballast):
            return
        try:
            fd = files.open_regular(ballast, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except OSError:
            return
        try:
            files.give_to_directory_owner(fd, os.path.dirname(self.path))
            os.posix_fallocate(fd, 0, BALLAST_BYTES)
        except OSError:
            os.unlink(ballast)  # no room for it now; try again next time
        finally:
            os.close(fd)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT: take the write lock up front, never upgrade."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def import_journal(self) -> int:
        """Move records the hook put in the fallback journal into the spool."""

        def consume(records: list[rows.Record], unreadable: list[str]) -> None:
            now = time.time()
            with self.transaction():
                rows.store(self.conn, records)
                self.conn.executemany(
                    rows.INSERT_REJECT,
                    [
                        (line[:300], "unreadable line in the fallback journal", "", now)
                        for line in unreadable
                    ],
                )

        try:
            imported = journal.drain(locate.fallback_journal(self.path), consume)
        except files.NotRegularFile as e:
            raise SpoolError(f"cannot import the fallback journal: {e}") from None
        except PermissionError as e:
            raise SpoolError(
                f"cannot import the fallback journal: {e}; run nixspool as root "
                "or as the spool's owner"
            ) from None
        # Records the hook made while it could not read the config wait beside
        # the default spool (see hook.run): they belong to this one.
        stray = locate.fallback_journal(locate.default_spool(os.environ))
        if stray != locate.fallback_journal(self.path) and os.path.lexists(stray):
            try:
                imported += journal.drain(stray, consume)
            except OSError as e:
                log.warning(
                    "records made while the config could not be read wait in %s: %s; "
                    "run nixspool as root to import them",
                    stray,
                    e.strerror or e,
                )
        return imported

    # -- fan-out to remotes ------------------------------------------------------

    def sync_remotes(self, names: Iterable[str]) -> None:
        """Give every recorded path a delivery row for each named remote."""
        with self.transaction():
            for name in names:
                self.conn.execute(
                    "INSERT INTO remotes (name) VALUES (?) ON CONFLICT DO NOTHING", (name,)
                )
                (through,) = self.conn.execute(
                    "SELECT expanded_through FROM remotes WHERE name = ?", (name,)
                ).fetchone()
                (top,) = self.conn.execute("SELECT coalesce(max(id), 0) FROM paths").fetchone()
                if top > through:
                    self.conn.execute(
                        "INSERT INTO deliveries (remote, path_id) SELECT ?, id FROM paths"
                        " WHERE id > ? AND id <= ? ON CONFLICT DO NOTHING",
                        (name, through, top),
                    )
                    self.conn.execute(
                        "UPDATE remotes SET expanded_through = ? WHERE name = ?", (top, name)
                    )

    # -- reading ---------------------------------------------------------------

    def status(self, now: float | None = None) -> dict[str, Any]:
        """Counts per state and per remote; the shape `status --json` prints."""
        now = time.time() if now is None else now
        remotes: dict[str, dict[str, Any]] = {}
        for (name,) in self.conn.execute("SELECT name FROM remotes ORDER BY name"):
            remotes[name] = {s.value: 0 for s in State} | {
                "oldest_queued_at": None,
                "oldest_queued_age_seconds": None,
                "last_error": None,
                "last_error_at": None,
                "verified": 0,
                "not_verified": 0,
            }
        for name, state, count in self.conn.execute(
            "SELECT remote, state, count(*) FROM deliveries GROUP BY remote, state"
        ):
            remotes.setdefault(name, {s.value: 0 for s in State})[state] = count
        for name, oldest in self.conn.execute(
            "SELECT d.remote, min(p.recorded_at) FROM deliveries d JOIN paths p"
            " ON p.id = d.path_id WHERE d.state = 'queued' GROUP BY d.remote"
        ):
            remotes[name]["oldest_queued_at"] = oldest
            remotes[name]["oldest_queued_age_seconds"] = round(now - oldest, 3)
        for name, verified, count in self.conn.execute(
            "SELECT remote, verified, count(*) FROM deliveries"
            " WHERE state = 'delivered' AND verified IS NOT NULL GROUP BY remote, verified"
        ):
            remotes[name]["verified" if verified else "not_verified"] = count
        for name in remotes:
            last = self.conn.execute(
                "SELECT last_error, updated_at FROM deliveries INDEXED BY deliveries_due"
                " WHERE remote = ? AND state IN ('queued', 'failed') AND last_error IS NOT NULL"
                " ORDER BY updated_at DESC LIMIT 1",
                (name,),
            ).fetchone()
            if last:
                remotes[name]["last_error"], remotes[name]["last_error_at"] = last
        totals = {s.value: sum(r[s.value] for r in remotes.values()) for s in State}
        return {
            "spool": self.path,
            "paths": self.db["paths"].count,
            "unresolved_derivations": self.conn.execute(
                "SELECT count(*) FROM paths WHERE needs_outputs = 1"
            ).fetchone()[0],
            "rejected": self.db["rejects"].count,
            "totals": totals,
            "remotes": remotes,
        }

    def rows(
        self, *, state: State | None = None, remote: str | None = None, limit: int | None = None
    ) -> list[Row]:
        where, params = ["1"], []
        if state is not None:
            where.append("d.state = ?")
            params.append(state.value)
        if remote is not None:
            where.append("d.remote = ?")
            params.append(remote)
        sql = (
            "SELECT p.id, p.path, d.remote, d.state, d.attempts, d.next_attempt_at,"
            " d.last_error, p.recorded_at, d.delivered_at, p.needs_outputs, p.drv_path, d.verified"
            " FROM deliveries d JOIN paths p ON p.id = d.path_id"
            f" WHERE {' AND '.join(where)} ORDER BY p.id, d.remote"
        )
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [
            Row(
                r[0],
                r[1],
                r[2],
                State(r[3]),
                r[4],
                r[5],
                r[6],
                r[7],
                r[8],
                bool(r[9]),
                r[10],
                None if r[11] is None else bool(r[11]),
            )
            for r in self.conn.execute(sql, params)
        ]

    def rejects(self, limit: int | None = None) -> list[dict[str, Any]]:
        sql = "SELECT id, value, reason, drv_path, recorded_at FROM rejects ORDER BY id DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return list(self.db.query(sql))

    # -- changing rows by hand ---------------------------------------------------

    def _selected(self, selector: Selector) -> tuple[str, list[Any]]:
        """A WHERE clause on deliveries for `selector`; UsageError if it names nothing."""
        if not (selector.ids or selector.paths or selector.all_failed):
            raise UsageError("name rows by id or store path, or pass --all-failed")
        clauses: list[str] = []
        params: list[Any] = []
        if selector.ids:
            clauses.append(f"path_id IN ({','.join('?' * len(selector.ids))})")
            params += list(selector.ids)
        if selector.paths:
            clauses.append(
                f"path_id IN (SELECT id FROM paths WHERE path IN "
                f"({','.join('?' * len(selector.paths))}))"
            )
            params += list(selector.paths)
        if selector.all_failed:
            clauses.append("state = 'failed'")
        where = " OR ".join(clauses)
        if selector.remote is not None:
            where = f"({where}) AND remote = ?"
            params.append(selector.remote)
        return where, params

    def _check_exists(self, selector: Selector) -> None:
        missing: list[str] = []
        if selector.ids:
            marks = ",".join("?" * len(selector.ids))
            known_ids = {
                r[0]
                for r in self.conn.execute(
                    f"SELECT DISTINCT path_id FROM deliveries WHERE path_id IN ({marks})",
                    selector.ids,
                )
            }
            missing += [str(i) for i in selector.ids if i not in known_ids]
        if selector.paths:
            marks = ",".join("?" * len(selector.paths))
            known_paths = {
                r[0]
                for r in self.conn.execute(
                    f"SELECT path FROM paths WHERE path IN ({marks})", selector.paths
                )
            }
            missing += [p for p in selector.paths if p not in known_paths]
        if missing:
            raise UsageError(f"not in the spool: {', '.join(missing)}; see `nixspool list`")

    def retry(self, selector: Selector, now: float | None = None) -> int:
        """Requeue the selected rows that are failed or waiting: due now, attempts reset."""
        now = time.time() if now is None else now
        where, params = self._selected(selector)
        with self.transaction():
            self._check_exists(selector)
            cursor = self.conn.execute(
                "UPDATE deliveries SET state = 'queued', next_attempt_at = 0, attempts = 0,"
                f" updated_at = ? WHERE ({where}) AND state != 'delivered'",
                [now, *params],
            )
        return cursor.rowcount

    def drop(self, selector: Selector) -> list[str]:
        """Delete the selected delivery rows; return the paths left with no delivery at all."""
        where, params = self._selected(selector)
        with self.transaction():
            self._check_exists(selector)
            self.conn.execute(f"DELETE FROM deliveries WHERE {where}", params)
            orphans = [
                r[0]
                for r in self.conn.execute(
                    "SELECT path FROM paths WHERE id NOT IN (SELECT path_id FROM deliveries)"
                    " AND id <= (SELECT coalesce(min(expanded_through), 0) FROM remotes)"
                )
            ]
            self.conn.executemany("DELETE FROM paths WHERE path = ?", [(p,) for p in orphans])
        return orphans

    # -- for the flusher ---------------------------------------------------------

    def unresolved(self) -> list[tuple[int, str]]:
        """(id, drv path) of rows recorded without their outputs; rows that are not
        derivations in the store are failed here and never handed out."""
        rows = list(self.conn.execute("SELECT id, path FROM paths WHERE needs_outputs = 1"))
        store_dir = storepath.store_dir()
        good = []
        for drv_id, path in rows:
            reason = storepath.why_not_derivation(path, store_dir)
            if reason is None:
                good.append((drv_id, path))
            else:
                self.fail_unresolved(drv_id, untrusted_row(reason))
        return good

    def resolve(self, drv_id: int, outputs: Sequence[str]) -> None:
        """Replace a .drv row by its outputs; they inherit nothing but the time."""
        with self.transaction():
            row = self.conn.execute(
                "SELECT path, recorded_at FROM paths WHERE id = ?", (drv_id,)
            ).fetchone()
            if row is None:
                return  # dropped meanwhile
            good, bad = storepath.partition(outputs, storepath.store_dir())
            if bad:
                raise SpoolError(f"Nix named outputs of {row[0]} that are not store paths: {bad}")
            self.conn.executemany(rows.INSERT_PATH, [(out, row[0], 0, row[1]) for out in good])
            self.conn.execute("DELETE FROM paths WHERE id = ?", (drv_id,))

    def fail_unresolved(self, drv_id: int, reason: str, now: float | None = None) -> None:
        """Mark every delivery of a .drv row failed: its outputs cannot be known."""
        now = time.time() if now is None else now
        with self.transaction():
            self.conn.execute(
                "UPDATE deliveries SET state = 'failed', last_error = ?, updated_at = ?"
                " WHERE path_id = ? AND state = 'queued'",
                (reason, now, drv_id),
            )

    def claim(
        self, remote: str, owner: str, limit: int, lease_seconds: float, now: float | None = None
    ) -> list[tuple[int, str]]:
        """Lease up to `limit` due rows of `remote` to `owner`: (path id, path), oldest first.

        A lease, not a state: if the flusher dies, the rows become due again
        when it runs out, and nothing was lost or marked twice.
        """
        now = time.time() if now is None else now
        store_dir = storepath.store_dir()
        with self.transaction():
            rows = self.conn.execute(
                "SELECT d.path_id, p.path FROM deliveries d JOIN paths p ON p.id = d.path_id"
                " WHERE d.remote = ? AND d.state = 'queued' AND d.next_attempt_at <= ?"
                " AND d.lease_until <= ? AND p.needs_outputs = 0"
                " ORDER BY d.next_attempt_at, d.path_id LIMIT ?",  # walks deliveries_due
                (remote, now, now, limit),
            ).fetchall()
            # Every path leaves the spool checked as a store path again: the
            # spool's owner can write rows, and these become nix arguments.
            bad = [(i, why) for i, p in rows if (why := storepath.why_invalid(p, store_dir))]
            self.conn.executemany(
                "UPDATE deliveries SET state = 'failed', last_error = ?, updated_at = ?"
                " WHERE remote = ? AND path_id = ?",
                [(untrusted_row(why), now, remote, i) for i, why in bad],
            )
            refused = {i for i, _ in bad}
            rows = [row for row in rows if row[0] not in refused]
            self.conn.executemany(
                "UPDATE deliveries SET lease_owner = ?, lease_until = ?"
                " WHERE remote = ? AND path_id = ?",
                [(owner, now + lease_seconds, remote, path_id) for path_id, _ in rows],
            )
        return [(path_id, path) for path_id, path in rows]

    def recorded(self, paths: Iterable[str]) -> set[str]:
        """Which of `paths` the spool holds: only these were recorded by the hook."""
        found: set[str] = set()
        items = list(paths)
        for start in range(0, len(items), 500):
            chunk = items[start : start + 500]
            found.update(
                r[0]
                for r in self.conn.execute(
                    f"SELECT path FROM paths WHERE path IN ({','.join('?' * len(chunk))})", chunk
                )
            )
        return found

    def set_verified(self, remote: str, verdicts: dict[str, bool]) -> None:
        """Record whether each delivered path's signature checked out on the remote."""
        with self.transaction():
            self.conn.executemany(
                "UPDATE deliveries SET verified = ? WHERE remote = ?"
                " AND path_id = (SELECT id FROM paths WHERE path = ?)",
                [(int(ok), remote, path) for path, ok in verdicts.items()],
            )

    def delivered_paths(self, remote: str) -> list[str]:
        return _store_paths(
            self.conn.execute(
                "SELECT p.path FROM deliveries d JOIN paths p ON p.id = d.path_id"
                " WHERE d.remote = ? AND d.state = 'delivered' ORDER BY p.id",
                (remote,),
            )
        )

    def reclaim_leases(self) -> int:
        """Free every lease. Only for a flusher that holds the flush lock: then no
        other flusher is alive, and leases left by a killed one are stale."""
        with self.transaction():
            return self.conn.execute(
                "UPDATE deliveries SET lease_owner = NULL, lease_until = 0"
                " WHERE lease_owner IS NOT NULL"
            ).rowcount

    def _finish(
        self, remote: str, owner: str, ids: Sequence[int], sql: str, params: Sequence[Any]
    ) -> int:
        """Apply `SET sql` to the rows `owner` still holds a lease on."""
        with self.transaction():
            changed = 0
            for path_id in ids:
                cursor = self.conn.execute(
                    f"UPDATE deliveries SET {sql}, lease_owner = NULL, lease_until = 0"
                    " WHERE remote = ? AND path_id = ? AND lease_owner = ?",
                    (*params, remote, path_id, owner),
                )
                changed += cursor.rowcount
        return changed

    def delivered(
        self, remote: str, owner: str, ids: Sequence[int], now: float | None = None
    ) -> int:
        now = time.time() if now is None else now
        return self._finish(
            remote,
            owner,
            ids,
            "state = 'delivered', attempts = attempts + 1, delivered_at = ?, updated_at = ?,"
            " last_error = NULL",
            (now, now),
        )

    def failed(
        self, remote: str, owner: str, ids: Sequence[int], reason: str, now: float | None = None
    ) -> int:
        """Failed for a reason that retrying will not fix; `nixspool retry` requeues."""
        now = time.time() if now is None else now
        return self._finish(
            remote,
            owner,
            ids,
            "state = 'failed', attempts = attempts + 1, last_error = ?, updated_at = ?",
            (reason, now),
        )

    def deferred(
        self,
        remote: str,
        owner: str,
        ids: Sequence[int],
        reason: str,
        retry_at: float,
        now: float | None = None,
    ) -> int:
        """An attempt that failed for now: stays queued until `retry_at`."""
        now = time.time() if now is None else now
        return self._finish(
            remote,
            owner,
            ids,
            "attempts = attempts + 1, last_error = ?, updated_at = ?, next_attempt_at = ?",
            (reason, now, retry_at),
        )

    def released(self, remote: str, owner: str, ids: Sequence[int]) -> int:
        """Give rows back untouched (the remote could not be reached: not an attempt)."""
        return self._finish(remote, owner, ids, "state = state", ())

    def attempts(self, remote: str, ids: Sequence[int]) -> dict[int, int]:
        marks = ",".join("?" * len(ids))
        return dict(
            self.conn.execute(
                "SELECT path_id, attempts FROM deliveries"
                f" WHERE remote = ? AND path_id IN ({marks})",
                (remote, *ids),
            )
        )

    def last_errors(self, remote: str, ids: Sequence[int]) -> dict[int, str | None]:
        marks = ",".join("?" * len(ids))
        return dict(
            self.conn.execute(
                "SELECT path_id, last_error FROM deliveries"
                f" WHERE remote = ? AND path_id IN ({marks})",
                (remote, *ids),
            )
        )

    def due_count(self, remote: str, now: float | None = None) -> int:
        now = time.time() if now is None else now
        return int(
            self.conn.execute(
                "SELECT count(*) FROM deliveries WHERE remote = ? AND state = 'queued'"
                " AND next_attempt_at <= ?",
                (remote, now),
            ).fetchone()[0]
        )

    def protected_paths(self) -> list[str]:
        """Paths some remote still waits for (and .drv rows not yet resolved)."""
        return _store_paths(
            self.conn.execute(
                "SELECT path FROM paths WHERE needs_outputs = 1 OR id IN"
                " (SELECT path_id FROM deliveries WHERE state = 'queued')"
            )
        )

    def queued_count(self, remote: str) -> int:
        return int(
            self.conn.execute(
                "SELECT count(*) FROM deliveries WHERE remote = ? AND state = 'queued'", (remote,)
            ).fetchone()[0]
        )
