"""Each remote's own record in the spool (`spool.remotes`): how its last flush
ended, what waits for a person there, and when it was last asked which delivered
paths it still has (reconcile.py), with what that changed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .database import Spool


class Remotes:
    """The `remotes` table's bookkeeping, on an open spool (`spool.remotes`)."""

    def __init__(self, spool: Spool) -> None:
        self.conn = spool.conn
        self.transaction = spool.transaction

    def flush_finished(
        self,
        remote: str,
        exit_code: int,
        now: float | None = None,
        *,
        left_to_upstream: int | None = None,
        needs_a_person: str | None = None,
    ) -> None:
        """How the last flush ended for `remote` (`metrics` and `status` show it);
        for a binary cache with skip_signed_by, how many closure paths it left to
        upstream (None: not such a remote); the error a person must act on, if any."""
        with self.transaction():
            self.conn.execute(
                "UPDATE remotes SET last_flush_at = ?, last_flush_exit = ?,"
                " left_to_upstream = ?, last_flush_error = ? WHERE name = ?",
                (
                    time.time() if now is None else now,
                    exit_code,
                    left_to_upstream,
                    needs_a_person,
                    remote,
                ),
            )

    def needs_a_person(self, remote: str) -> str | None:
        """The error of `remote`'s last flush, if a person must act on it."""
        row = self.conn.execute(
            "SELECT last_flush_error FROM remotes WHERE name = ?", (remote,)
        ).fetchone()
        return row[0] if row else None

    def reconciled_at(self, remote: str) -> float | None:
        row = self.conn.execute(
            "SELECT reconciled_at FROM remotes WHERE name = ?", (remote,)
        ).fetchone()
        return row[0] if row else None

    def reconciled(
        self,
        remote: str,
        gone: Sequence[str],
        gone_here_too: Sequence[str],
        now: float | None = None,
    ) -> tuple[int, int]:
        """Delivered rows of `remote` whose path it no longer has: queued again, due
        now (`gone`), or failed when this machine has lost the path too
        (`gone_here_too`); the remote marked as checked. (requeued, failed)."""
        now = time.time() if now is None else now
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(now))
        with self.transaction():
            requeued = self._undeliver(
                remote,
                gone,
                "state = 'queued', attempts = 0, next_attempt_at = 0",
                f"gone from {remote} since it was delivered (found {when}): queued again",
                now,
            )
            failed = self._undeliver(
                remote,
                gone_here_too,
                "state = 'failed'",
                f"gone from {remote} since it was delivered (found {when}), and no longer "
                "in the local store either: build it again, or `nixspool drop` it",
                now,
            )
            self.conn.execute(
                "UPDATE remotes SET reconciled_at = ?, reconcile_requeued = ? WHERE name = ?",
                (now, requeued, remote),
            )
        return requeued, failed

    def _undeliver(
        self, remote: str, paths: Sequence[str], state_sql: str, reason: str, now: float
    ) -> int:
        return sum(
            self.conn.execute(
                f"UPDATE deliveries SET {state_sql}, delivered_at = NULL, verified = NULL,"
                " last_error = ?, updated_at = ? WHERE remote = ? AND state = 'delivered'"
                " AND path_id = (SELECT id FROM paths WHERE path = ?)",
                (reason, now, remote, path),
            ).rowcount
            for path in paths
        )
