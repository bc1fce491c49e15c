"""One hook run's findings, and the SQL that stores them in the spool.

Standard library only. The hook stores records directly; `nixspool` stores
the ones the hook had to put in the fallback journal. Both use `store()`, so
the two paths cannot drift apart. These statements are the hook's whole view
of the schema: migrations in spool.py must keep them valid (a test checks).
"""

from __future__ import annotations

from . import storepath

TYPE_CHECKING = False
if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Iterable

# What the hook and `nixspool` share besides the SQL.
# How long a writer waits for the spool's lock. The hook is on every build's
# critical path: past its bound the record goes to the journal instead. A
# command has no such hurry, and rather waits than fails.
HOOK_BUSY_TIMEOUT_SECONDS = 2.0
COMMAND_BUSY_TIMEOUT_SECONDS = 10.0
# Beside the spool: the file `nixspool` keeps so that the hook can free its
# room when the disk is full, and still write the journal.
BALLAST_SUFFIX = ".ballast"

INSERT_PATH = (
    "INSERT INTO paths (path, drv_path, needs_outputs, recorded_at) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (path) DO NOTHING"
)
INSERT_REJECT = (
    "INSERT INTO rejects (value, reason, drv_path, recorded_at) VALUES (?, ?, ?, ?)"
    " ON CONFLICT DO NOTHING"
)


class Record:
    """What one hook run saw, already validated.

    A plain class, not a frozen dataclass as elsewhere: importing dataclasses
    costs the hook more than the rest of its work.
    """

    __slots__ = ("drv_path", "outputs", "recorded_at", "rejects")

    def __init__(
        self,
        drv_path: str,
        outputs: list[str],
        rejects: list[tuple[str, str]],
        recorded_at: float,
    ) -> None:
        self.drv_path = drv_path  # "" when DRV_PATH was missing or rejected
        self.outputs = outputs  # empty: resolve from drv_path later (Nix 2.8.0)
        self.rejects = rejects  # (shown value, reason)
        self.recorded_at = recorded_at

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Record) and all(
            getattr(self, f) == getattr(other, f) for f in self.__slots__
        )

    def __repr__(self) -> str:
        return f"Record({self.drv_path!r}, {self.outputs!r}, {self.rejects!r})"

    def path_rows(self) -> list[tuple[str, str, int, float]]:
        if self.outputs:
            return [(p, self.drv_path, 0, self.recorded_at) for p in self.outputs]
        if self.drv_path:  # Nix 2.8.0: OUT_PATHS empty; the flusher resolves them
            return [(self.drv_path, self.drv_path, 1, self.recorded_at)]
        return []


def validated(
    drv_path: str,
    outputs: Iterable[str],
    rejects: list[tuple[str, str]],
    recorded_at: float,
    store_dir: str,
    source: str = "",
) -> Record:
    """The one way a Record is made: every value checked as a store path.

    The hook builds records from Nix's environment with it, and the import of
    the fallback journal from the journal's lines: a journal line is no more
    trusted than DRV_PATH (its directory belongs to the spool's user).
    `source` prefixes the reasons ("DRV_PATH ", "OUT_PATHS entry ").
    """
    rejects = list(rejects)
    if drv_path:
        reason = storepath.why_not_derivation(drv_path, store_dir)
        if reason is not None:
            rejects.append((storepath.shown(drv_path), f"{source}DRV_PATH {reason}"))
            drv_path = ""
    good, bad = storepath.partition(outputs, store_dir)
    rejects += [(value, f"{source}OUT_PATHS entry {reason}") for value, reason in bad]
    return Record(drv_path, good, rejects, recorded_at)


def store(con: sqlite3.Connection, records: list[Record]) -> None:
    """Insert records; the caller owns the transaction."""
    for record in records:
        con.executemany(INSERT_PATH, record.path_rows())
        con.executemany(
            INSERT_REJECT, [(v, r, record.drv_path, record.recorded_at) for v, r in record.rejects]
        )
