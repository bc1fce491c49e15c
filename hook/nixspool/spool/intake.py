"""How rows come in: fan-out of every recorded path to every configured remote,
paths added by hand, and .drv rows (Nix 2.8 records no outputs) replaced by
their outputs. The queue (spool.queue) then hands the rows out.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from ..errors import SpoolError
from ..hook import rows, storepath
from .model import UNRESOLVABLE, untrusted_row

if TYPE_CHECKING:
    from .database import Spool


class Intake:
    """Rows into the queue, on an open spool (`spool.intake`)."""

    def __init__(self, spool: Spool) -> None:
        self.conn = spool.conn
        self.transaction = spool.transaction
        self.queue = spool.queue

    def needs_fan_out(self, names: Iterable[str]) -> bool:
        """Would sync_remotes(names) add a row? (A reading command then opens the
        spool for writing, so that what it shows is complete.)"""
        (top,) = self.conn.execute("SELECT coalesce(max(id), 0) FROM paths").fetchone()
        through = dict(self.conn.execute("SELECT name, expanded_through FROM remotes"))
        return any(through.get(name, -1) < top for name in names)

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
                        "INSERT INTO deliveries (remote, path_id, recorded_at)"
                        " SELECT ?, id, recorded_at FROM paths"
                        " WHERE id > ? AND id <= ? ON CONFLICT DO NOTHING",
                        (name, through, top),
                    )
                    self.conn.execute(
                        "UPDATE remotes SET expanded_through = ? WHERE name = ?", (top, name)
                    )

    def add(self, paths: Sequence[str], now: float | None = None) -> list[str]:
        """Record store paths by hand (`nixspool add`), as the hook would have: the
        ones that were not in the spool yet."""
        good, bad = storepath.partition(paths, storepath.store_dir())
        if bad:
            raise SpoolError(f"not store paths: {bad}")
        now = time.time() if now is None else now
        with self.transaction():
            known = self.queue.recorded(good)
            new = [p for p in good if p not in known]
            self.conn.executemany(rows.INSERT_PATH, [(p, "", 0, now) for p in new])
        return new

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
        """Mark every delivery of a .drv row failed: its outputs cannot be known.

        The row becomes needs_outputs = UNRESOLVABLE: asked once, not on every
        flush (each asking costs a `nix derivation show`); `retry` asks again.
        """
        now = time.time() if now is None else now
        with self.transaction():
            self.conn.execute(
                "UPDATE deliveries SET state = 'failed', attempts = attempts + 1,"
                " last_error = ?, updated_at = ? WHERE path_id = ? AND state = 'queued'",
                (reason, now, drv_id),
            )
            self.conn.execute(
                "UPDATE paths SET needs_outputs = ? WHERE id = ?", (UNRESOLVABLE, drv_id)
            )
