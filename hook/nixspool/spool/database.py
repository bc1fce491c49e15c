"""The spool's file: opening it safely, its schema and migrations, its owner,
the journal import, and the ballast. The parts that work on an open spool are
reached from it: `spool.queue`, `spool.reports`, `spool.admin`.
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import SpoolError
from ..hook import files, journal, locate, rows
from ..hook.rows import COMMAND_BUSY_TIMEOUT_SECONDS
from . import place
from .admin import Admin
from .intake import Intake
from .place import Owner
from .queue import Queue
from .remotes import Remotes
from .reports import Reports
from .schema import MIGRATIONS, SCHEMA_VERSION, statements

log = logging.getLogger(__name__)


# What SQLite says of a file that is not, or no longer, a whole database.
BROKEN = ("file is not a database", "database disk image is malformed")


class Spool:
    """An open spool. Create with `Spool.open()`; close with `close()` or `with`."""

    def __init__(self, path: str, conn: sqlite3.Connection) -> None:
        self.path = path
        self.conn = conn
        # Whose rights root uses in the spool's directory (files.rights_to_use),
        # decided once by open(), for the files beside it (the flush lock).
        self.rights: tuple[int, int] | None = None

    @functools.cached_property
    def db(self) -> Any:
        """sqlite-utils over the same connection, for reading; imported only when
        used (about 50 ms, which a flush does not need to pay)."""
        import sqlite_utils

        return sqlite_utils.Database(self.conn)

    @functools.cached_property
    def spool_id(self) -> str:
        """Random, made with the spool file: a new file has a new one."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'spool_id'").fetchone()
        return str(row[0])

    @functools.cached_property
    def queue(self) -> Queue:
        return Queue(self)

    @functools.cached_property
    def intake(self) -> Intake:
        return Intake(self)

    @functools.cached_property
    def remotes(self) -> Remotes:
        return Remotes(self)

    @functools.cached_property
    def reports(self) -> Reports:
        return Reports(self)

    @functools.cached_property
    def admin(self) -> Admin:
        return Admin(self)

    # -- opening ---------------------------------------------------------------

    @classmethod
    def open(cls, path: str, owner: Owner | None = None, *, stray_journal: str = "") -> Spool:
        """The spool, ready for work, in three steps: its directory made and given
        to `owner`, the configured user (place.prepare); the database connected and
        migrated (connect); what the hook left in journals imported (settle).
        `stray_journal` is the journal beside the default spool (hook.run), which
        the caller names from its environment."""
        rights = place.prepare(path, owner)
        # Root works in the directory with its owner's rights (docs/security.md).
        with files.OwnersRights(rights):
            spool = cls.connect(path)
            spool.rights = rights
            spool.settle()
        if stray_journal:
            spool.import_stray_journal(stray_journal)
        return spool

    @classmethod
    def connect(cls, path: str) -> Spool:
        """Connect and migrate; a file that is not a database is set aside and made
        anew. Called with the directory's owner's rights (place.prepare)."""
        try:
            try:
                return cls._connect(path)
            except sqlite3.DatabaseError as e:
                if not any(sign in str(e) for sign in BROKEN):
                    raise
                # Garbage where the spool was: keep it for a person to look at
                # and start afresh; the next flush queues again what its GC
                # roots say was queued (nixspool.gcroots).
                kept = place.set_aside(path)
                log.warning(
                    "spool %s is not a usable SQLite database (%s); set aside as %s, "
                    "a new spool is made in its place",
                    path,
                    e,
                    kept,
                )
                return cls._connect(path)
        except sqlite3.DatabaseError as e:
            raise SpoolError(
                f"spool {path}: {e}; is it readable and writable by this user? "
                "(see man nixspool: Troubleshooting)"
            ) from None
        except PermissionError as e:
            raise SpoolError(
                f"spool {path}: {e.strerror}; run nixspool as root or as the "
                "spool's owner (see man nixspool: Ownership)"
            ) from None

    def settle(self) -> None:
        """Import what the hook put in this spool's journal, and keep the ballast
        the hook may free on a full disk."""
        self._import_journal(locate.fallback_journal(self.path))
        place.keep_ballast(self.path)

    @classmethod
    def _connect(cls, path: str) -> Spool:
        old_umask = os.umask(0o077)
        try:
            conn = sqlite3.connect(path, timeout=COMMAND_BUSY_TIMEOUT_SECONDS, isolation_level=None)
        finally:
            os.umask(old_umask)
        spool = cls(path, conn)
        try:
            spool._migrate()
        except BaseException:
            conn.close()
            raise
        return spool

    @classmethod
    def open_read_only(
        cls, path: str, owner: Owner | None = None, *, stray_journal: str = ""
    ) -> Spool | None:
        """The spool as it is, for a command that only reads: no directory made,
        nothing chowned, migrated, imported or written (SQLite's read-only mode;
        as for any reader of a WAL database, SQLite may create its -wal and -shm
        files, as the spool's owner).

        None when reading it as it is would show less than was recorded, or
        nothing: no spool yet, an older schema, records waiting in a journal.
        The caller then open()s it, which does that work first.
        """
        place.check(path, owner)
        journals = [locate.fallback_journal(path), stray_journal]
        if not os.path.exists(path) or any(j and os.path.lexists(j) for j in journals):
            return None
        uri = "file:" + path.replace("%", "%25").replace("?", "%3f").replace("#", "%23")
        try:
            with files.OwnersRights(files.rights_to_use(os.path.dirname(path))):
                conn = sqlite3.connect(
                    uri + "?mode=ro", uri=True, timeout=COMMAND_BUSY_TIMEOUT_SECONDS
                )
                version = conn.execute("PRAGMA user_version").fetchone()[0]
        except (sqlite3.DatabaseError, PermissionError):
            return None  # open() says what is wrong with it, in its words
        if version != SCHEMA_VERSION:
            conn.close()
            return None
        return cls(path, conn)

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
                for statement in statements(MIGRATIONS[number]):
                    self.conn.execute(statement)
            self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

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

    def _consume(self, records: list[rows.Record], unreadable: list[str]) -> None:
        """Store what a journal held, in one transaction (journal.drain's `consume`)."""
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

    def _import_journal(self, path: str) -> int:
        """Move records the hook put in the fallback journal into the spool."""
        try:
            return journal.drain(path, self._consume)
        except files.NotRegularFile as e:
            raise SpoolError(f"cannot import the fallback journal: {e}") from None
        except PermissionError as e:
            raise SpoolError(
                f"cannot import the fallback journal: {e}; run nixspool as root "
                "or as the spool's owner"
            ) from None

    def import_stray_journal(self, stray: str) -> int:
        """Records the hook made while it could not read the config, or could not
        use the spool's directory, wait beside the default spool (see hook.run):
        they belong to this one."""
        if stray == locate.fallback_journal(self.path) or not os.path.lexists(stray):
            return 0
        try:
            with files.OwnersRights(files.rights_to_use(os.path.dirname(stray))):
                return journal.drain(stray, self._consume)
        except OSError as e:
            log.warning(
                "records made while the config could not be read wait in %s: %s; "
                "run nixspool as root to import them",
                stray,
                e.strerror or e,
            )
            return 0
