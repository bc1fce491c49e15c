"""What `status` and `list` show, read from the spool as typed values."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .model import Reject, RemoteStatus, Row, State, Status

if TYPE_CHECKING:
    from .database import Spool


class Reports:
    """Reading the spool for people and scripts (`spool.reports`)."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.conn = spool.conn

    @property
    def db(self) -> Any:
        return self.spool.db

    def status(self, now: float | None = None) -> Status:
        """Counts per state and per remote, the oldest queued row, the last error."""
        now = time.time() if now is None else now
        remotes: dict[str, RemoteStatus] = {}
        for (name,) in self.conn.execute("SELECT name FROM remotes ORDER BY name"):
            remotes[name] = RemoteStatus()
        # Counts, verdicts and bytes are kept by triggers (schema, migration 6): one
        # row per remote and state, whatever the number of rows.
        for name, state, rows, verified, not_verified, size, last_at in self.conn.execute(
            "SELECT remote, state, rows, verified, not_verified, bytes, last_at FROM tallies"
        ):
            r = remotes.setdefault(name, RemoteStatus())
            setattr(r, State(state).value, rows)
            if state == State.DELIVERED.value:
                r.verified, r.not_verified = verified, not_verified
                r.delivered_bytes = size
                r.last_delivered_at = last_at or None  # the last delivery, even if pruned
        for name, remote in remotes.items():  # one lookup in deliveries_oldest each
            (oldest,) = self.conn.execute(
                "SELECT min(recorded_at) FROM deliveries WHERE remote = ? AND state = 'queued'",
                (name,),
            ).fetchone()
            if oldest is not None:
                remote.oldest_queued_at = oldest
                remote.oldest_queued_age_seconds = round(now - oldest, 3)
        for name, flushed_at, flush_exit, left, person, reconciled, requeued in self.conn.execute(
            "SELECT name, last_flush_at, last_flush_exit, left_to_upstream, last_flush_error,"
            " reconciled_at, reconcile_requeued FROM remotes"
        ):
            r = remotes[name]
            r.last_flush_at, r.last_flush_exit, r.left_to_upstream = flushed_at, flush_exit, left
            r.needs_a_person = person
            r.reconciled_at, r.reconcile_requeued = reconciled, requeued
        for name, remote in remotes.items():
            last = self.conn.execute(
                "SELECT last_error, updated_at FROM deliveries INDEXED BY deliveries_last_error"
                " WHERE remote = ? AND last_error IS NOT NULL AND state IN ('queued', 'failed')"
                " ORDER BY updated_at DESC LIMIT 1",
                (name,),
            ).fetchone()
            if last:
                remote.last_error, remote.last_error_at = last
        return Status(
            spool=self.spool.path,
            paths=self.db["paths"].count,
            unresolved_derivations=self.conn.execute(
                "SELECT count(*) FROM paths WHERE needs_outputs = 1"
            ).fetchone()[0],
            rejected=self.db["rejects"].count,
            remotes=remotes,
        )

    def rows(
        self, *, state: State | None = None, remote: str | None = None, limit: int | None = None
    ) -> list[Row]:
        """One row per path and remote, and one per path no remote has a row for
        (State.RECORDED: no remote is configured yet), by path id."""
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
            f" WHERE {' AND '.join(where)}"
        )
        if remote is None and state in (None, State.RECORDED):
            sql += (
                " UNION ALL SELECT p.id, p.path, NULL, 'recorded', 0, 0, NULL, p.recorded_at,"
                " NULL, p.needs_outputs, p.drv_path, NULL FROM paths p"
                " WHERE NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.path_id = p.id)"
            )
        sql += " ORDER BY 1, 3"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [Row.from_columns(r) for r in self.db.query(sql, params)]

    def rejects(self, limit: int | None = None) -> list[Reject]:
        sql = "SELECT id, value, reason, drv_path, recorded_at FROM rejects ORDER BY id DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [Reject(**row) for row in self.db.query(sql)]
