"""`nixspool flush`: deliver the spool's due rows to each remote.

For each remote: resolve .drv rows into their outputs, check that the
remote can be reached (a bounded probe; an unreachable remote costs no
attempt and keeps its rows as they were), then lease batches of due rows,
drop the ones whose path was garbage-collected, and `nix copy` each batch.
A batch that fails for a reason retrying will not fix is split in halves
until the bad paths are found, so one bad path fails only its own row.
"""

from __future__ import annotations

import enum
import fcntl
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from . import nix
from .config import Config, Remote
from .errors import CommandError, UnreachableError
from .run import last_line
from .spool import Spool

log = logging.getLogger(__name__)

EX_OK, EX_FAILED, EX_TEMPFAIL = 0, 1, 75


class Outcome(enum.Enum):
    """How a failed `nix copy` is handled, from what it printed."""

    UNREACHABLE = "unreachable"  # the host went away: stop this remote, rows untouched
    TRANSIENT = "transient"  # try again later, with backoff
    PERMANENT = "permanent"  # the remote or the path says no: fail the row


# Lower-cased fragments of Nix's and ssh's error messages.
_UNREACHABLE = (
    "connection refused",
    "connection timed out",
    "no route to host",
    "network is unreachable",
    "could not resolve hostname",
    "name or service not known",
    "temporary failure in name",
    "host is down",
    "operation timed out",
    "did not finish within",
    "broken pipe",
    "connection reset",
    "connection closed",
    "cannot connect",
    "timeout, server",
    "unexpected end-of-file",
)
_PERMANENT = (
    "lacks a valid signature",
    "is not valid",
    "does not exist",
    "permission denied",
    "not allowed",
    "refusing",
    "is not a valid store path",
    "read-only file system",
    "cannot add path",
    "invalid",
    "no space left",
)


def classify(stderr: str) -> Outcome:
    text = stderr.lower()
    if any(fragment in text for fragment in _UNREACHABLE):
        return Outcome.UNREACHABLE
    if any(fragment in text for fragment in _PERMANENT):
        return Outcome.PERMANENT
    return Outcome.TRANSIENT


def backoff(attempts: int, retry_min: float, retry_max: float) -> float:
    """Seconds to wait after `attempts` failed attempts: exponential, capped, jittered."""
    delay: float = min(retry_max, retry_min * 2.0 ** max(0, attempts - 1))
    return delay * random.uniform(0.8, 1.0)  # noqa: S311 - jitter, not cryptography


@dataclass
class RemoteReport:
    """What one flush did for one remote; the `flush --json` shape."""

    remote: str
    delivered: int = 0
    failed: int = 0
    deferred: int = 0
    queued: int = 0
    unreachable: bool = False
    error: str | None = None
    seconds: float = 0.0
    failures: list[dict[str, str]] = field(default_factory=list)


Progress = Callable[[str, int], None]  # (remote, paths just delivered)


@contextmanager
def single_flusher(spool_path: str) -> Iterator[bool]:
    """Hold the spool's flush lock if nobody else does; yield whether we got it."""
    fd = os.open(spool_path + ".flush.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


class Flusher:
    """One flush run over one open spool."""

    def __init__(self, cfg: Config, spool: Spool, progress: Progress | None = None) -> None:
        self.cfg = cfg
        self.spool = spool
        self.progress = progress or (lambda remote, n: None)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    # -- resolving .drv rows -----------------------------------------------------

    def resolve_derivations(self) -> None:
        """Replace rows recorded by DRV_PATH alone (Nix 2.8.0) by their outputs."""
        for drv_id, drv_path in self.spool.unresolved():
            try:
                outputs = nix.outputs_of(drv_path)
            except CommandError as e:
                reason = f"cannot resolve outputs of {drv_path}: {last_line(e.stderr)}"
                log.warning("%s", reason)
                self.spool.fail_unresolved(drv_id, reason)
                continue
            self.spool.resolve(drv_id, outputs)

    # -- delivering ----------------------------------------------------------------

    def run(self, only: str | None = None) -> list[RemoteReport]:
        remotes = self.cfg.selected(only)
        self.resolve_derivations()
        self.spool.sync_remotes(r.name for r in self.cfg.remotes)
        return [self.flush_remote(remote) for remote in remotes]

    def flush_remote(self, remote: Remote) -> RemoteReport:
        report = RemoteReport(remote.name)
        started = time.monotonic()
        try:
            if self.spool.due_count(remote.name):
                self.check_reachable(remote)
                self._deliver(remote, report)
        except UnreachableError as e:
            report.unreachable, report.error = True, str(e)
            log.warning("%s: unreachable, rows stay queued: %s", remote.name, e)
        report.queued = self.spool.queued_count(remote.name)
        report.seconds = round(time.monotonic() - started, 3)
        return report

    def check_reachable(self, remote: Remote) -> None:
        """Raise UnreachableError unless the remote answers (a bounded probe)."""
        # Non-ssh stores (file://, local, ...) have nothing to probe.

    def copy_env(self, remote: Remote) -> dict[str, str] | None:
        return None

    def _deliver(self, remote: Remote, report: RemoteReport) -> None:
        lease = remote.copy_timeout + 60
        while batch := self.spool.claim(remote.name, self.owner, remote.batch_size, lease):
            try:
                self._deliver_batch(remote, batch, report)
            except BaseException:
                # Unreachable, interrupted or a bug: what this batch did not
                # finish goes back untouched, and the next flush resumes.
                self.spool.released(remote.name, self.owner, [i for i, _ in batch])
                raise

    def _deliver_batch(
        self, remote: Remote, batch: list[tuple[int, str]], report: RemoteReport
    ) -> None:
        gone = nix.invalid_paths([p for _, p in batch])
        if gone:
            ids = [i for i, p in batch if p in gone]
            reason = "no longer in the local store (garbage-collected before upload)"
            report.failed += self.spool.failed(remote.name, self.owner, ids, reason)
            report.failures += [{"path": p, "error": reason} for p in sorted(gone)]
            batch = [(i, p) for i, p in batch if p not in gone]
        if batch:
            self._copy(remote, batch, report)

    def _copy(self, remote: Remote, batch: Sequence[tuple[int, str]], report: RemoteReport) -> None:
        ids = [i for i, _ in batch]
        try:
            nix.copy(
                remote.url,
                [p for _, p in batch],
                timeout=remote.copy_timeout,
                env=self.copy_env(remote),
            )
        except CommandError as e:
            outcome = classify(e.stderr or str(e))
            reason = last_line(e.stderr) if e.stderr else str(e)
            if outcome is Outcome.UNREACHABLE:
                raise UnreachableError(f"{remote.url}: {reason}") from None
            if outcome is Outcome.PERMANENT and len(batch) > 1:
                middle = len(batch) // 2  # find the bad paths; the others go through
                self._copy(remote, batch[:middle], report)
                self._copy(remote, batch[middle:], report)
                return
            if outcome is Outcome.PERMANENT:
                report.failed += self.spool.failed(remote.name, self.owner, ids, reason)
                report.failures.append({"path": batch[0][1], "error": reason})
                return
            self._defer(remote, ids, reason, report)
            return
        report.delivered += self.spool.delivered(remote.name, self.owner, ids)
        self.progress(remote.name, len(ids))

    def _defer(self, remote: Remote, ids: list[int], reason: str, report: RemoteReport) -> None:
        now = time.time()
        for path_id, attempts in self.spool.attempts(remote.name, ids).items():
            retry_at = now + backoff(attempts + 1, self.cfg.retry_min, self.cfg.retry_max)
            report.deferred += self.spool.deferred(
                remote.name, self.owner, [path_id], reason, retry_at, now
            )


def exit_code(reports: Sequence[RemoteReport]) -> int:
    """DESIGN.md: 75 if a remote was unreachable, else 1 if rows failed, else 0."""
    if any(r.unreachable or r.deferred for r in reports):
        return EX_TEMPFAIL
    if any(r.failed for r in reports):
        return EX_FAILED
    return EX_OK
