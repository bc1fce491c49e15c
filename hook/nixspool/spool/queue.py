"""The queue: the flusher's side of the state machine
(docs/ARCHITECTURE.md#the-spools-state-machine): claim rows under a lease, then
mark each delivered, failed, deferred (attempt counted, later) or skipped, or
release it (untouched). How rows come in is `spool.intake`. Every path leaves
the spool checked as a store path again.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..hook import storepath
from .model import store_paths, untrusted_row

if TYPE_CHECKING:
    from .database import Spool

SQL_VARIABLES = 900  # per statement, under SQLite's oldest limit (999) with room to spare


class Queue:
    """The rows' lifecycle, on an open spool (`spool.queue`)."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.conn = spool.conn
        self.transaction = spool.transaction

    def claim(
        self,
        remote: str,
        owner: str,
        limit: int,
        lease_seconds: float,
        now: float | None = None,
        due_by: float | None = None,
    ) -> list[tuple[int, str]]:
        """Lease up to `limit` rows of `remote` due by `due_by` (default: now) to
        `owner`: (path id, path), oldest first.

        A lease, not a state: if the flusher dies, the rows become due again
        when it runs out, and nothing was lost or marked twice.
        """
        now = time.time() if now is None else now
        due_by = now if due_by is None else due_by
        store_dir = storepath.store_dir()
        with self.transaction():
            rows = self.conn.execute(
                "SELECT d.path_id, p.path FROM deliveries d JOIN paths p ON p.id = d.path_id"
                " WHERE d.remote = ? AND d.state = 'queued' AND d.next_attempt_at <= ?"
                " AND d.lease_until <= ? AND p.needs_outputs = 0"
                " ORDER BY d.next_attempt_at, d.path_id LIMIT ?",  # walks deliveries_due
                (remote, due_by, now, limit),
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
        for start in range(0, len(items), SQL_VARIABLES):
            chunk = items[start : start + SQL_VARIABLES]
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

    def set_nar_sizes(self, sizes: dict[str, int]) -> None:
        """Remember each path's NAR size (Nix told the flusher): bytes delivered."""
        with self.transaction():
            self.conn.executemany(
                "UPDATE paths SET nar_size = ? WHERE path = ?",
                [(size, path) for path, size in sizes.items()],
            )

    def delivered_paths(self, remote: str) -> list[str]:
        return store_paths(
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

    def undo_clock_steps(self, horizon: float, now: float | None = None) -> int:
        """Make due now every queued row due further ahead than `horizon` seconds
        (retry_max: no backoff waits longer). Only a clock stepped backwards since
        the row was deferred puts it there; it would otherwise wait out the step,
        days or years. A step forwards needs nothing: rows are due, and each
        failure backs off from the new time."""
        now = time.time() if now is None else now
        with self.transaction():
            return self.conn.execute(
                "UPDATE deliveries SET next_attempt_at = ?"
                " WHERE state = 'queued' AND next_attempt_at > ?",
                (now, now + horizon),
            ).rowcount

    def _finish(
        self, remote: str, owner: str, ids: Sequence[int], sql: str, params: Sequence[Any]
    ) -> int:
        """Apply `SET sql` to the rows `owner` still holds a lease on."""
        return self._finish_each(remote, owner, sql, {path_id: params for path_id in ids})

    def _finish_each(
        self, remote: str, owner: str, sql: str, params: Mapping[int, Sequence[Any]]
    ) -> int:
        """Apply `SET sql`, with each row's own parameters, to the rows `owner` still
        holds a lease on, and end the lease: how a claimed row leaves the flusher."""
        with self.transaction():
            changed = 0
            for path_id, row_params in params.items():
                cursor = self.conn.execute(
                    f"UPDATE deliveries SET {sql}, lease_owner = NULL, lease_until = 0"
                    " WHERE remote = ? AND path_id = ? AND lease_owner = ?",
                    (*row_params, remote, path_id, owner),
                )
                changed += cursor.rowcount
        return changed

    def mark_delivered(
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

    def mark_failed(
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

    def mark_deferred(
        self,
        remote: str,
        owner: str,
        ids: Sequence[int],
        reason: str,
        retry_at: float | Mapping[int, float],
        now: float | None = None,
    ) -> int:
        """An attempt that failed for now: stays queued until `retry_at`, one time for
        all or each row's own (its backoff), in one transaction for the whole batch."""
        now = time.time() if now is None else now
        at = retry_at if isinstance(retry_at, Mapping) else dict.fromkeys(ids, retry_at)
        return self._finish_each(
            remote,
            owner,
            "attempts = attempts + 1, last_error = ?, updated_at = ?, next_attempt_at = ?",
            {path_id: (reason, now, at[path_id]) for path_id in ids},
        )

    def mark_skipped(
        self, remote: str, owner: str, reasons: dict[int, str], now: float | None = None
    ) -> int:
        """Left out by the remote's filters, each with its reason; not an attempt."""
        now = time.time() if now is None else now
        return self._finish_each(
            remote,
            owner,
            "state = 'skipped', last_error = ?, updated_at = ?",
            {path_id: (reason, now) for path_id, reason in reasons.items()},
        )

    def release(self, remote: str, owner: str, ids: Sequence[int]) -> int:
        """Give rows back untouched (the remote could not be reached: not an attempt)."""
        return self._finish(remote, owner, ids, "state = state", ())

    def attempts(self, remote: str, ids: Sequence[int]) -> dict[int, int]:
        return {i: attempts for i, (attempts, _) in self.history(remote, ids).items()}

    def last_errors(self, remote: str, ids: Sequence[int]) -> dict[int, str | None]:
        return {i: error for i, (_, error) in self.history(remote, ids).items()}

    def history(self, remote: str, ids: Sequence[int]) -> dict[int, tuple[int, str | None]]:
        """{path id: (attempts, last error)} of these rows for `remote`, asked in
        chunks: SQLite takes at most 999 variables a statement before 3.32, and a
        batch may be larger (batch_size)."""
        found: dict[int, tuple[int, str | None]] = {}
        for start in range(0, len(ids), SQL_VARIABLES):
            chunk = ids[start : start + SQL_VARIABLES]
            marks = ",".join("?" * len(chunk))
            for path_id, attempts, error in self.conn.execute(
                "SELECT path_id, attempts, last_error FROM deliveries"
                f" WHERE remote = ? AND path_id IN ({marks})",
                (remote, *chunk),
            ):
                found[path_id] = (attempts, error)
        return found

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
        return store_paths(
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
