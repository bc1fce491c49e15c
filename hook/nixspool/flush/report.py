"""What a flush did, for each remote and in all, and the exit status it makes."""

from __future__ import annotations

from dataclasses import dataclass, field

EX_OK, EX_FAILED, EX_TEMPFAIL = 0, 1, 75
FAILURES_LISTED = 100  # per remote, in a flush's report


@dataclass
class RemoteReport:
    """What one flush did for one remote; the `flush --json` shape."""

    remote: str
    delivered: int = 0
    failed: int = 0
    deferred: int = 0
    skipped: int = 0  # left out by the remote's filters (include, exclude, max_size)
    queued: int = 0
    unverified: int = 0
    resigned: int = 0  # had the path without our signature: signed there now
    # Binary caches: closure paths left to the caches that signed them (skip_signed_by).
    left_to_upstream: int = 0
    # Caches nixspool writes: the paths whose NAR and narinfo were written now, and the
    # compressed bytes (a path whose narinfo was there already is not written).
    uploaded: int = 0
    uploaded_bytes: int = 0
    # Delivered rows the remote no longer had (found by reconciling): queued again.
    requeued: int = 0
    reconcile_error: str | None = None
    unreachable: bool = False
    error: str | None = None
    seconds: float = 0.0
    failures: list[dict[str, str]] = field(default_factory=list)
    failures_not_listed: int = 0

    def fail(self, path: str, error: str) -> None:
        """Note a failed path. The first FAILURES_LISTED are listed, the rest counted:
        a flush over a million rows gone from the store must not hold a million
        of them in memory (`nixspool list --state failed` has every one)."""
        if len(self.failures) < FAILURES_LISTED:
            self.failures.append({"path": path, "error": error})
        else:
            self.failures_not_listed += 1


@dataclass
class FlushReport:
    """A whole flush: each remote's report, and what failed on this machine for all
    of them (resolving derivations)."""

    remotes: list[RemoteReport]
    errors: list[str] = field(default_factory=list)


def exit_code(flush: FlushReport) -> int:
    """0 done, 75 try later, 1 a person must look. 1 wins over 75: failed rows and a
    remote that refuses us need a person, while an unreachable remote is retried by
    the timer anyway."""
    reports = flush.remotes
    if flush.errors or any(
        r.failed or r.unverified or (r.error and not r.unreachable) for r in reports
    ):
        return EX_FAILED
    if any(r.unreachable or r.deferred for r in reports):
        return EX_TEMPFAIL
    return EX_OK
