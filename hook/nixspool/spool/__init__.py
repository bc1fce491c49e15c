"""The spool: a SQLite file in WAL mode, the one source of truth.

By responsibility: `place` (the directory and files: who owns them, who may),
`schema` (the migrations), `database` (the connection, journal import, ballast),
`intake` (fan-out to the remotes, paths added by hand, .drv rows resolved),
`queue` (the flusher's state machine), `remotes` (each remote's record: its last
flush, what needs a person, reconciling), `reports` (status and list, typed),
`admin` (retry, drop, prune), `model` (the values).

Tables:
- `paths`: one row per store path the hook recorded (`needs_outputs` = 1
  for a .drv whose outputs Nix 2.8.0 did not pass; the flusher replaces it
  by its outputs). The hook only ever inserts here and into `rejects`.
- `deliveries`: one row per path and remote, with its state, attempts, next
  attempt time, last error and lease. Rows are created lazily by
  `intake.sync_remotes()`, because the hook does not read the config and so does
  not know the remotes; `remotes.expanded_through` remembers how far each
  remote has been fanned out, so a dropped row is not brought back.
- `rejects`: what the hook refused to record, and why.
- `tallies`: each remote's rows per state, verdicts and bytes, kept by triggers
  as rows change (schema.py), so that `status` does not count a million rows.

Ownership (docs/security.md#ownership): the directory (0700) and the files (0600)
belong to the configured `user`, so that both root (the hook, a root
flusher) and that user (a flusher started by them) can write, and nobody
else can. SQLite gives its -wal and -shm files the database's owner and
mode when root creates them; nixspool does the same for its own files.
"""

from .database import Spool
from .model import (
    DELIVERY_STATES,
    Dropped,
    Reject,
    RemoteStatus,
    Row,
    Selector,
    State,
    Status,
    untrusted_row,
)
from .place import Owner, check_permissions, trusted_uids
from .schema import SCHEMA_VERSION

__all__ = [
    "DELIVERY_STATES",
    "SCHEMA_VERSION",
    "Dropped",
    "Owner",
    "Reject",
    "RemoteStatus",
    "Row",
    "Selector",
    "Spool",
    "State",
    "Status",
    "check_permissions",
    "trusted_uids",
    "untrusted_row",
]
