"""`nixspool retry` and `nixspool drop`: changing rows by hand, by id or path."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from .model import UNRESOLVABLE, Dropped, Pruned, Selector

if TYPE_CHECKING:
    from .database import Spool


class Admin:
    """Retry and drop (`spool.admin`)."""

    def __init__(self, spool: Spool) -> None:
        self.conn = spool.conn
        self.transaction = spool.transaction

    @staticmethod
    def _named(selector: Selector) -> tuple[str | None, list[Any]]:
        """A WHERE clause on paths for the ids and store paths `selector` names
        (None if it names none)."""
        clauses: list[str] = []
        params: list[Any] = []
        if selector.ids:
            clauses.append(f"id IN ({','.join('?' * len(selector.ids))})")
            params += list(selector.ids)
        if selector.paths:
            clauses.append(f"path IN ({','.join('?' * len(selector.paths))})")
            params += list(selector.paths)
        return " OR ".join(clauses) or None, params

    def _selected(self, selector: Selector) -> tuple[str, list[Any]]:
        """A WHERE clause on deliveries for `selector`; UsageError if it names nothing."""
        if not (
            selector.ids
            or selector.paths
            or selector.all_failed
            or selector.all_skipped
            or selector.all_pending
        ):
            raise UsageError("name rows by id or store path, or pass --all-failed or --all-skipped")
        named, params = self._named(selector)
        clauses = [f"path_id IN (SELECT id FROM paths WHERE {named})"] if named else []
        if selector.all_pending:
            clauses.append("state != 'delivered'")
        if selector.all_failed:
            clauses.append("state = 'failed'")
        if selector.all_skipped:
            clauses.append("state = 'skipped'")
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
                    f"SELECT id FROM paths WHERE id IN ({marks})",
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
        """Requeue the selected rows: due now, attempts reset. A delivered row named
        by id or path is queued again too (the remote lost it, or a person wants it
        checked: the copy skips what the remote has)."""
        now = time.time() if now is None else now
        where, params = self._selected(selector)
        with self.transaction():
            self._check_exists(selector)
            # A derivation Nix could not resolve is asked again (before the rows
            # leave the state the selector may name).
            self.conn.execute(
                "UPDATE paths SET needs_outputs = 1 WHERE needs_outputs = ? AND id IN"
                f" (SELECT path_id FROM deliveries WHERE ({where}) AND state != 'delivered')",
                [UNRESOLVABLE, *params],
            )
            cursor = self.conn.execute(
                "UPDATE deliveries SET state = 'queued', next_attempt_at = 0, attempts = 0,"
                f" delivered_at = NULL, verified = NULL, updated_at = ? WHERE {where}",
                [now, *params],
            )
        return cursor.rowcount

    def drop(self, selector: Selector) -> Dropped:
        """Delete the selected rows. The paths that leave the spool: those no remote
        has a row for any more (once fanned out to all of them), and those named by
        id or path for every remote, even with no remote configured (recorded)."""
        where, params = self._selected(selector)
        # Named for every remote: the path itself goes, even with no delivery row.
        named, named_params = self._named(selector) if selector.remote is None else (None, [])
        expanded = "id <= (SELECT coalesce(min(expanded_through), 0) FROM remotes)"
        gone = f"{expanded} OR {named}" if named else expanded
        with self.transaction():
            self._check_exists(selector)
            recorded = (
                self.conn.execute(
                    "SELECT count(*) FROM paths WHERE id NOT IN (SELECT path_id FROM deliveries)"
                    f" AND ({named})",
                    named_params,
                ).fetchone()[0]
                if named
                else 0
            )
            deleted = self.conn.execute(f"DELETE FROM deliveries WHERE {where}", params).rowcount
            orphans = [
                r[0]
                for r in self.conn.execute(
                    "SELECT path FROM paths WHERE id NOT IN (SELECT path_id FROM deliveries)"
                    f" AND ({gone})",
                    named_params,
                )
            ]
            self.conn.executemany("DELETE FROM paths WHERE path = ?", [(p,) for p in orphans])
        return Dropped(deleted + recorded, orphans)

    def prune(self, retention: float, failed_retention: float, now: float | None = None) -> Pruned:
        """Forget delivered rows delivered more than `retention` seconds ago, failed rows
        and rejected records untouched for `failed_retention`, and the paths no row
        needs any more. Queued, skipped and leased rows are never touched. SQLite reuses
        the freed pages: the file stops growing (it is not rewritten smaller; a VACUUM
        would copy it whole, under the hooks' feet)."""
        now = time.time() if now is None else now
        with self.transaction():
            delivered = self.conn.execute(
                "DELETE FROM deliveries WHERE state = 'delivered' AND delivered_at < ?",
                (now - retention,),
            ).rowcount
            failed = self.conn.execute(
                "DELETE FROM deliveries WHERE state = 'failed' AND coalesce(updated_at, 0) < ?"
                " AND lease_owner IS NULL",
                (now - failed_retention,),
            ).rowcount
            rejects = self.conn.execute(
                "DELETE FROM rejects WHERE recorded_at < ?", (now - failed_retention,)
            ).rowcount
            # Only paths fanned out to every remote: a newer one may still be waiting
            # for its delivery rows.
            paths = self.conn.execute(
                "DELETE FROM paths WHERE id NOT IN (SELECT path_id FROM deliveries)"
                " AND id <= (SELECT coalesce(min(expanded_through), 0) FROM remotes)"
                " AND (? - recorded_at) > ?",
                (now, min(retention, failed_retention)),
            ).rowcount
        return Pruned(delivered, failed, rejects, paths)

    def prune_if_due(
        self, retention: float, failed_retention: float, every: float, now: float | None = None
    ) -> Pruned | None:
        """prune() if the last one was `every` seconds ago or more (the flush's way:
        the deletes scan the whole table, so once a day, not on every flush)."""
        now = time.time() if now is None else now
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'pruned_at'").fetchone()
        if row is not None and 0 <= now - float(row[0]) < every:
            return None
        pruned = self.prune(retention, failed_retention, now)
        with self.transaction():
            self.conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('pruned_at', ?)", (str(now),)
            )
        return pruned
