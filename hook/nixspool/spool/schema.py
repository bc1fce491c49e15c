"""The spool's schema: each migration, applied in order, upgrades it by one
version (PRAGMA user_version). Append only; never edit a released entry. The
hook's INSERTs (nixspool.hook.rows) must stay valid against every version.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

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
    # 2: a remote's filters leave rows `skipped` (a state, so the CHECK and the
    # table are rebuilt, SQLite's way); each path's NAR size, once the flusher
    # knows it (bytes delivered); each remote's last flush, for `metrics`.
    """
    CREATE TABLE deliveries_2 (
        remote TEXT NOT NULL,
        path_id INTEGER NOT NULL REFERENCES paths (id) ON DELETE CASCADE,
        state TEXT NOT NULL DEFAULT 'queued'
            CHECK (state IN ('queued', 'delivered', 'failed', 'skipped')),
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
    INSERT INTO deliveries_2 SELECT * FROM deliveries;
    DROP TABLE deliveries;
    ALTER TABLE deliveries_2 RENAME TO deliveries;
    CREATE INDEX deliveries_due ON deliveries (remote, state, next_attempt_at, path_id);
    CREATE INDEX deliveries_path ON deliveries (path_id);
    ALTER TABLE paths ADD COLUMN nar_size INTEGER;
    ALTER TABLE remotes ADD COLUMN last_flush_at REAL;
    ALTER TABLE remotes ADD COLUMN last_flush_exit INTEGER;
    """,
    # 3: a binary cache's last flush: how many closure paths it left to the
    # upstream caches that signed them (skip_signed_by), for `status`.
    """
    ALTER TABLE remotes ADD COLUMN left_to_upstream INTEGER;
    """,
    # 4: the spool's identity, made once with the file. The GC roots remember it
    # (nixspool.gcroots): roots kept for another spool id mean this spool was lost
    # and made anew since the last flush, and their paths are queued again.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    INSERT INTO meta VALUES ('spool_id', lower(hex(randomblob(16))));
    """,
    # 5: the error of a remote's last flush when it needed a person (exit 1), kept
    # until a flush of that remote ends otherwise: a flush that finds its rows
    # still on backoff says it again, and `status --check` fails on it. When the
    # remote was last asked which delivered paths it still has, and how many it
    # had lost (queued again).
    """
    ALTER TABLE remotes ADD COLUMN last_flush_error TEXT;
    ALTER TABLE remotes ADD COLUMN reconciled_at REAL;
    ALTER TABLE remotes ADD COLUMN reconcile_requeued INTEGER;
    """,
    # 6: `status` flat in the number of rows: each remote's rows per state, how many
    # of its delivered ones are verified or not, and their bytes, kept by triggers
    # as rows come, change and go (a million-row status read them all: 1.1 s);
    # the .drv rows waiting for their outputs found by a partial index; and each
    # delivery row carries its path's recording time, so that a remote's oldest
    # queued row is one index lookup, not a join over every queued row, and so is
    # its latest error (a partial index of the rows that have one). The hook's
    # INSERTs are untouched: it writes `paths`, and no trigger is on its inserts.
    """
    ALTER TABLE deliveries ADD COLUMN recorded_at REAL;
    UPDATE deliveries SET recorded_at = (SELECT recorded_at FROM paths WHERE id = path_id);
    CREATE INDEX deliveries_oldest ON deliveries (remote, state, recorded_at);
    CREATE INDEX deliveries_last_error ON deliveries (remote, updated_at)
        WHERE last_error IS NOT NULL AND state IN ('queued', 'failed');
    CREATE TABLE tallies (
        remote TEXT NOT NULL,
        state TEXT NOT NULL,
        rows INTEGER NOT NULL DEFAULT 0,
        verified INTEGER NOT NULL DEFAULT 0,
        not_verified INTEGER NOT NULL DEFAULT 0,
        bytes INTEGER NOT NULL DEFAULT 0,
        last_at REAL,
        PRIMARY KEY (remote, state)
    ) WITHOUT ROWID;
    INSERT INTO tallies
        SELECT d.remote, d.state, count(*), sum(d.verified IS 1), sum(d.verified IS 0),
            coalesce(sum(p.nar_size), 0), max(d.delivered_at)
        FROM deliveries d JOIN paths p ON p.id = d.path_id GROUP BY d.remote, d.state;
    CREATE TRIGGER tally_in AFTER INSERT ON deliveries BEGIN
        INSERT INTO tallies VALUES (NEW.remote, NEW.state, 1, NEW.verified IS 1,
            NEW.verified IS 0,
            coalesce((SELECT nar_size FROM paths WHERE id = NEW.path_id), 0), NEW.delivered_at)
        ON CONFLICT (remote, state) DO UPDATE SET rows = rows + 1,
            verified = verified + excluded.verified,
            not_verified = not_verified + excluded.not_verified, bytes = bytes + excluded.bytes,
            last_at = max(coalesce(last_at, 0), coalesce(excluded.last_at, 0));
    END;
    CREATE TRIGGER tally_out AFTER DELETE ON deliveries BEGIN
        UPDATE tallies SET rows = rows - 1, verified = verified - (OLD.verified IS 1),
            not_verified = not_verified - (OLD.verified IS 0),
            bytes = bytes - coalesce((SELECT nar_size FROM paths WHERE id = OLD.path_id), 0)
        WHERE remote = OLD.remote AND state = OLD.state;
    END;
    CREATE TRIGGER tally_change AFTER UPDATE OF state, verified, delivered_at ON deliveries
    BEGIN
        UPDATE tallies SET rows = rows - 1, verified = verified - (OLD.verified IS 1),
            not_verified = not_verified - (OLD.verified IS 0),
            bytes = bytes - coalesce((SELECT nar_size FROM paths WHERE id = OLD.path_id), 0)
        WHERE remote = OLD.remote AND state = OLD.state;
        INSERT INTO tallies VALUES (NEW.remote, NEW.state, 1, NEW.verified IS 1,
            NEW.verified IS 0,
            coalesce((SELECT nar_size FROM paths WHERE id = NEW.path_id), 0), NEW.delivered_at)
        ON CONFLICT (remote, state) DO UPDATE SET rows = rows + 1,
            verified = verified + excluded.verified,
            not_verified = not_verified + excluded.not_verified, bytes = bytes + excluded.bytes,
            last_at = max(coalesce(last_at, 0), coalesce(excluded.last_at, 0));
    END;
    CREATE TRIGGER tally_size AFTER UPDATE OF nar_size ON paths BEGIN
        UPDATE tallies
        SET bytes = bytes + coalesce(NEW.nar_size, 0) - coalesce(OLD.nar_size, 0)
        WHERE (remote, state) IN (SELECT remote, state FROM deliveries WHERE path_id = NEW.id);
    END;
    -- A path deleted takes its deliveries with it (ON DELETE CASCADE), which no longer
    -- find its size: its bytes leave the tallies here, before it goes.
    CREATE TRIGGER tally_path_gone BEFORE DELETE ON paths BEGIN
        UPDATE tallies SET bytes = bytes - coalesce(OLD.nar_size, 0)
        WHERE (remote, state) IN (SELECT remote, state FROM deliveries WHERE path_id = OLD.id);
    END;
    CREATE INDEX paths_unresolved ON paths (id) WHERE needs_outputs = 1;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


def statements(script: str) -> Iterator[str]:
    """The SQL statements of a migration, whole: a trigger's body has semicolons of
    its own, so a statement ends where SQLite says one is complete."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            if pending.strip().rstrip(";").strip():
                yield pending
            pending = ""
    if pending.strip():
        raise ValueError(f"an unfinished statement in a migration: {pending.strip()[:80]}")
