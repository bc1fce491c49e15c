"""The spool's values: states, rows, selectors, reports. No SQL here."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..hook import storepath

# paths.needs_outputs: 0 an output path; 1 a derivation whose outputs the flusher
# asks Nix for (the hook's value); this, one Nix could not resolve (failed rows).
UNRESOLVABLE = 2


class State(enum.StrEnum):
    QUEUED = "queued"
    DELIVERED = "delivered"
    FAILED = "failed"
    # Left out by the remote's filters (include, exclude, max_size): never sent,
    # with the reason; `retry` brings them back, after the filters changed.
    SKIPPED = "skipped"
    # Not a delivery's state: a path in the spool that no remote has a row for
    # (none is configured yet). `list` shows it, `drop` can remove it.
    RECORDED = "recorded"


DELIVERY_STATES = (State.QUEUED, State.DELIVERED, State.FAILED, State.SKIPPED)


@dataclass(frozen=True)
class Row:
    """One delivery: a path, to one remote, in one state."""

    id: int
    path: str
    remote: str | None  # None: State.RECORDED, for no remote yet
    state: State
    attempts: int
    next_attempt_at: float
    last_error: str | None
    recorded_at: float
    delivered_at: float | None
    needs_outputs: bool
    drv_path: str
    verified: bool | None = None

    @classmethod
    def from_columns(cls, columns: dict[str, Any]) -> Row:
        """From a query whose columns are named as the fields (SQLite keeps 0/1)."""
        verified = columns["verified"]
        return cls(
            **columns
            | {
                "state": State(columns["state"]),
                "needs_outputs": bool(columns["needs_outputs"]),
                "verified": None if verified is None else bool(verified),
            }
        )


@dataclass(frozen=True)
class Selector:
    """Which delivery rows a retry or drop applies to."""

    ids: tuple[int, ...] = ()
    paths: tuple[str, ...] = ()
    all_failed: bool = False
    all_skipped: bool = False
    remote: str | None = None
    all_pending: bool = False  # every row not delivered: waiting, failed, skipped


@dataclass(frozen=True)
class Dropped:
    """What `drop` removed: rows as `list` shows them, and the paths that left."""

    rows: int
    paths: list[str]


@dataclass(frozen=True)
class Pruned:
    """What `prune` removed: delivered and failed rows past their retention, rejected
    records past theirs, and the paths no row needs any more."""

    delivered: int = 0
    failed: int = 0
    rejects: int = 0
    paths: int = 0


@dataclass(frozen=True)
class Reject:
    """A value the hook refused to record, and why."""

    id: int
    value: str
    reason: str
    drv_path: str
    recorded_at: float


@dataclass
class RemoteStatus:
    """One remote's counts and latest trouble; the `status --json` shape."""

    queued: int = 0
    delivered: int = 0
    failed: int = 0
    skipped: int = 0
    oldest_queued_at: float | None = None
    oldest_queued_age_seconds: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    verified: int = 0
    not_verified: int = 0
    # The NAR size of the delivered paths themselves (not their closures: what the
    # remote already had is not counted apart), when the flusher learnt it.
    delivered_bytes: int = 0
    last_delivered_at: float | None = None
    last_flush_at: float | None = None
    last_flush_exit: int | None = None  # 0, 75 or 1, as `flush` for this remote alone
    # What a person must act on, from the last flush that ended in exit 1 for this
    # remote (its rows may wait on backoff meanwhile); None once a flush ends otherwise.
    needs_a_person: str | None = None
    # When the remote was last asked which delivered paths it still has, and how
    # many it had lost (queued again then).
    reconciled_at: float | None = None
    reconcile_requeued: int | None = None
    # A binary cache with skip_signed_by: the closure paths its last flush left to
    # the upstream caches that signed them (not rows: dependencies nobody recorded).
    left_to_upstream: int | None = None
    configured: bool = True  # the spool does not read the config: the command sets it

    def count(self, state: State) -> int:
        return int(getattr(self, state.value))


@dataclass
class Status:
    """The whole spool at a glance; `status --json` prints `to_json()`."""

    spool: str
    paths: int
    unresolved_derivations: int
    rejected: int
    remotes: dict[str, RemoteStatus] = field(default_factory=dict)

    @property
    def totals(self) -> dict[str, int]:
        return {s.value: sum(r.count(s) for r in self.remotes.values()) for s in DELIVERY_STATES}

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "totals": self.totals}


def untrusted_row(reason: str) -> str:
    return f"not a Nix store path: {reason} (nixspool did not write this row; it is never used)"


def store_paths(rows: Iterable[tuple[str]]) -> list[str]:
    """The paths of `rows` that are store paths: the only ones that leave the spool."""
    store_dir = storepath.store_dir()
    return [path for (path,) in rows if storepath.why_invalid(path, store_dir) is None]
