"""`nixspool retry` and `nixspool drop`: changing rows by hand, by id or path."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from .model import Selector

if TYPE_CHECKING:
    from .database import Spool


class Admin:
    """Retry and drop (`spool.admin`)."""

    def __init__(self, spool: Spool) -> None:
        self.conn = spool.conn
        self.transaction = spool.transaction

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
