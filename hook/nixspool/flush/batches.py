"""The batch loop of one remote in one flush: lease due rows, leave out what the
remote's filters do not take, copy the rest through a transport (transport.py),
and settle each row by how its copy ended.

A batch the remote refuses is split in halves until the bad paths are found, so
one bad path fails only its own row; refusals alike all the way down are the
remote's own (RemoteRefuses). A batch that fails for an unclear reason is tried
again within this flush (tenacity, exponential backoff with jitter, re-probing
first), then deferred to a later flush with a growing delay. A batch that runs
past copy_timeout counts an attempt and is deferred; its rows then go one at a
time, and a path that times out alone TIMEOUTS_ALONE times fails, with the
reason, for a person to raise the bound. tests/unit/test_batches.py drives it with a
fake transport.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import tenacity

from .. import filters, nix
from ..config import Remote
from ..errors import CommandError, LocalError, NixOutputError, RemoteConfigError
from ..nix import PathInfo
from ..outcome import refusal_of, same_refusal
from ..spool import Spool
from .report import RemoteReport
from .transport import (
    TIMED_OUT,
    CopyFailed,
    RemoteFailed,
    Stalled,
    TimedOut,
    Transient,
    Transport,
    local_path_infos,
)

log = logging.getLogger(__name__)

Row = tuple[int, str]  # (path id, store path), as the spool leases it
Progress = Callable[[str, int, int], None]  # (remote, delivered just now, due in all)

# Within one flush: how often a batch is tried for an unclear failure, and how
# long to wait in between (seconds, exponential with jitter).
ATTEMPTS_PER_FLUSH = 3
RETRY_WAIT = (1.0, 10.0)
TIMEOUTS_ALONE = 3  # a path that ran past copy_timeout alone this often fails


def backoff(attempts: int, retry_min: float, retry_max: float) -> float:
    """Seconds to wait after `attempts` failed attempts: exponential, capped, jittered."""
    delay: float = min(retry_max, retry_min * 2.0 ** max(0, attempts - 1))
    return delay * random.uniform(0.8, 1.0)  # noqa: S311 - jitter, not cryptography


def within_flush(
    wait: tuple[float, float], before_sleep: Callable[[tenacity.RetryCallState], None]
) -> tenacity.Retrying:
    """Unclear failures (Transient) tried again within this flush, up to
    ATTEMPTS_PER_FLUSH, exponential with jitter between `wait`'s bounds."""
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(Transient),
        stop=tenacity.stop_after_attempt(ATTEMPTS_PER_FLUSH),
        # tenacity's own wait_exponential_jitter names its first argument
        # differently across the versions we allow.
        wait=tenacity.wait_exponential(multiplier=wait[0], max=wait[1])
        + tenacity.wait_random(0, min(1.0, wait[1])),
        before_sleep=before_sleep,
        reraise=True,
    )


class RemoteRefuses(CopyFailed):
    """Bisection found every path refused in the same words: the remote refuses us
    (its trust, its store), not the paths. The rows wait for a person."""


class Reach(Protocol):
    def check_reachable(self, remote: Remote) -> None: ...


class AskedOfNix:
    """What the batch loop asks the local Nix about a claimed batch's paths: their
    closures where max_size or skip_signed_by weigh them or the transport wants
    them (handed to it, so that it does not ask again), else only their NAR sizes
    (the bytes-delivered figure), asked alongside the copy. One call either way."""

    def __init__(self, transport: Transport, spool: Spool) -> None:
        self.remote = transport.remote
        self.spool = spool
        # What the filters weigh, asked before the copy: closures (max_size) or
        # signatures (skip_signed_by); closures for a transport that wants them.
        self.for_filters = bool(self.remote.max_size or self.remote.skip_signed_by)
        self.recursive = bool(self.remote.max_size) or transport.wants_closures
        self.needed = self.for_filters or transport.wants_closures
        self.closures: Mapping[str, PathInfo] = {}  # the batch's, if recursive
        # Paths whose sizes are to be asked of Nix once the copy runs; then those
        # paths and the answer to wait for.
        self._to_ask: list[str] | None = None
        self._sizes: tuple[list[str], Callable[[], dict[str, PathInfo]]] | None = None

    def about(self, paths: list[str]) -> dict[str, PathInfo]:
        """The path infos the filters need now ({} if none); the sizes either way.
        LocalError if the filters need them and Nix cannot say."""
        self.closures, self._to_ask, self._sizes = {}, None, None
        if not self.needed:
            self._to_ask = paths  # by ask_sizes(), once the copy runs
            return {}
        try:
            infos = local_path_infos(self.remote, paths, recursive=self.recursive)
        except LocalError as e:
            if self.for_filters:
                raise
            self._unknown(e)  # the transport asks again, and says why it cannot
            return {}
        if self.recursive:
            self.closures = infos
        self._remember_sizes(paths, infos)
        return infos

    def ask_sizes(self) -> None:
        """Ask Nix for the sizes about() left for later: called once the copy has
        started, which then need not wait for `nix --version` (path-info's flags
        depend on it; the copy's do not) nor share its first moments with it."""
        if self._to_ask is None:
            return
        paths, self._to_ask = self._to_ask, None
        try:
            self._sizes = (paths, nix.start_path_infos(paths))
        except (CommandError, NixOutputError) as e:
            self._unknown(e)

    def learn_sizes(self) -> None:
        """The sizes asked alongside the copy, into the rows (before any of them
        changes state: the spool's counts add them then)."""
        self._to_ask = None  # still unasked: the copy never started, nothing is delivered
        if self._sizes is None:
            return
        (paths, answer), self._sizes = self._sizes, None
        try:
            try:
                infos = answer()
            except (CommandError, NixOutputError):  # a path gone meanwhile: ask about the rest
                infos = local_path_infos(self.remote, paths, recursive=False)
        except LocalError as e:
            self._unknown(e)
            return
        self._remember_sizes(paths, infos)

    def _remember_sizes(self, paths: list[str], infos: Mapping[str, PathInfo]) -> None:
        self.spool.queue.set_nar_sizes({p: infos[p].nar_size for p in paths if p in infos})

    def _unknown(self, why: Exception) -> None:
        # The copy, which runs as the user and may find a Nix this process does
        # not, still goes: only the bytes-delivered figure needs the sizes.
        log.warning("%s: NAR sizes unknown, bytes delivered not counted: %s", self.remote.name, why)


class Batches:
    """Deliver one remote's due rows through `transport` (see the module)."""

    def __init__(
        self,
        transport: Transport,
        spool: Spool,
        owner: str,
        report: RemoteReport,
        reach: Reach,
        *,
        retry: tuple[float, float],  # retry_min, retry_max: the backoff between flushes
        retry_wait: tuple[float, float] = RETRY_WAIT,
        progress: Progress | None = None,
    ) -> None:
        self.transport = transport
        self.remote = transport.remote
        self.spool = spool
        self.owner = owner
        self.report = report
        self.reach = reach
        self.retry = retry
        self.retry_wait = retry_wait
        self.progress = progress or (lambda remote, done, total: None)
        self.asked = AskedOfNix(transport, spool)

    def deliver(self, due: int, due_by: float) -> None:
        """Every row due by `due_by`, batch by batch, each once."""
        remote, report = self.remote, self.report
        lease = remote.copy_timeout * ATTEMPTS_PER_FLUSH + 60
        done = 0
        while batch := self.spool.queue.claim(
            remote.name, self.owner, remote.batch_size, lease, due_by=due_by
        ):
            try:
                before = report.delivered + report.skipped
                batch = self._select(batch)
                if batch:
                    self._copy(batch)
                done += report.delivered + report.skipped - before
                self.progress(remote.name, done, due)
            except BaseException:
                # Unreachable, interrupted or a bug: what this batch did not
                # finish goes back untouched, and the next flush resumes.
                self.spool.queue.release(remote.name, self.owner, [i for i, _ in batch])
                raise

    def _select(self, batch: list[Row]) -> list[Row]:
        """The claimed rows the remote's filters take; the others become `skipped` with
        their reason. Learns each path's NAR size on the way (bytes delivered)."""
        remote = self.remote
        reasons = {i: why for i, p in batch if (why := filters.why_name_left_out(remote, p))}
        kept = [(i, p) for i, p in batch if i not in reasons]
        infos = self.asked.about([p for _, p in kept])
        if remote.max_size:
            # A path Nix no longer has is not weighed: the copy fails it with its reason.
            sizes = filters.closure_sizes([p for _, p in kept if p in infos], infos)
            for i, p in kept:
                if p in sizes and (why := filters.why_too_big(remote, sizes[p])):
                    reasons[i] = why
        if remote.skip_signed_by:
            for i, p in kept:
                if p in infos and (why := filters.why_left_to_upstream(remote, infos[p])):
                    reasons[i] = why
        if reasons:
            self.report.skipped += self.spool.queue.mark_skipped(remote.name, self.owner, reasons)
            log.info(
                "%s: %d paths left out by its filters (`nixspool list --state skipped`)",
                remote.name,
                len(reasons),
            )
        return [(i, p) for i, p in batch if i not in reasons]

    def _copy(self, batch: Sequence[Row]) -> None:
        """A claimed batch; the rows that ran past copy_timeout before go one by one,
        so that one huge path cannot hold the others back for ever."""
        remote = self.remote
        last = self.spool.queue.last_errors(remote.name, [i for i, _ in batch])
        slow = [row for row in batch if (last.get(row[0]) or "").startswith(TIMED_OUT)]
        rest = [row for row in batch if row not in slow]
        try:
            for part in ([rest] if rest else []) + [[row] for row in slow]:
                self._copy_part(part)
        except RemoteRefuses as e:
            # One attempt for each row still waiting, with the reason `status` shows.
            self._defer([i for i, _ in batch], e.reason)
            if len(batch) == 1:
                raise RemoteConfigError(
                    f"{remote.url} refuses the one path offered: {e.reason}; with no other "
                    "path to compare, that is most likely the remote's settings (`nixspool "
                    "doctor` checks them); the row stays queued and is tried again after "
                    "its backoff"
                ) from None
            raise RemoteConfigError(
                f"{remote.url} refuses every path alike, so the remote's settings refuse "
                f"us, not the paths: {e.reason}; the rows stay queued and are tried "
                "again after their backoff"
            ) from None

    def _copy_part(self, batch: Sequence[Row]) -> None:
        refusal = self._attempt(batch)
        if refusal is not None:
            self._refused(batch, refusal)

    def _attempt(self, batch: Sequence[Row]) -> CommandError | None:
        """Copy `batch` once (with this flush's retries) and settle its rows, unless
        the remote refused it: that refusal is returned, the rows still leased."""
        remote, report = self.remote, self.report
        ids, paths = [i for i, _ in batch], [p for _, p in batch]
        try:
            self.transport.prepare(paths, self.asked.closures)
        except LocalError as signing:
            # Paths garbage-collected since they were queued make path-info fail:
            # theirs is a reason of their own. Anything else stops this remote.
            try:
                gone_handled = self._fail_gone(batch)
            except CommandError:
                raise signing from None
            if gone_handled:
                return None
            raise
        try:
            try:
                self._copy_with_retries(paths)
            finally:
                self.asked.learn_sizes()
        except TimedOut as e:
            self._timed_out(batch, e.reason)
            return None
        except (Transient, Stalled) as e:
            log.warning("%s: %s; %d rows deferred", remote.name, e.reason, len(ids))
            self._defer(ids, e.reason)
            return None
        except RemoteFailed as e:
            # Counts as an attempt, with its reason where `status` shows it; the
            # remote stops here and the flush exits 1: a person must look.
            self._defer(ids, e.reason)
            raise RemoteConfigError(f"{remote.url}: {e.reason}") from None
        except CommandError as e:  # the remote or a path says no
            return e
        report.delivered += self.spool.queue.mark_delivered(remote.name, self.owner, ids)
        self.transport.delivered(paths, report)
        return None

    def _fail_gone(self, batch: Sequence[Row]) -> bool:
        """Fail the rows whose path is no longer in the local store, and copy the
        rest; False if none is gone."""
        gone = nix.invalid_paths([p for _, p in batch])
        if not gone:
            return False
        reason = "no longer in the local store (garbage-collected before upload)"
        bad = [(i, p) for i, p in batch if p in gone]
        self.report.failed += self.spool.queue.mark_failed(
            self.remote.name, self.owner, [i for i, _ in bad], reason
        )
        for _, p in bad:
            self.report.fail(p, reason)
        rest = [(i, p) for i, p in batch if p not in gone]
        if rest:
            self._copy_part(rest)
        return True

    def _timed_out(self, batch: Sequence[Row], reason: str) -> None:
        """An attempt that ran past copy_timeout. What it copied stays on the remote
        (nix copy adds path by path), so trying again makes progress; a path that
        times out alone, again and again, needs a person to raise the bound."""
        remote, ids = self.remote, [i for i, _ in batch]
        if len(batch) == 1:
            attempts = self.spool.queue.attempts(remote.name, ids)[ids[0]] + 1
            if attempts >= TIMEOUTS_ALONE:
                why = (
                    f"{reason}, {attempts} attempts, the last ones alone: raise "
                    f"copy_timeout for {remote.name}, then `nixspool retry`"
                )
                self.report.failed += self.spool.queue.mark_failed(
                    remote.name, self.owner, ids, why
                )
                self.report.fail(batch[0][1], why)
                log.error("%s: %s failed: %s", remote.name, batch[0][1], why)
                return
        log.warning("%s: %s; %d rows deferred", remote.name, reason, len(ids))
        self._defer(ids, reason)

    def _refused(self, batch: Sequence[Row], error: CommandError, *, chain: bool = True) -> None:
        """Find which paths of a refused batch are bad; deliver the others.

        Bisection: each half is copied on its own. A remote that refuses every
        path (it trusts none of our keys, its store is read-only) would cost
        2N-1 copies and fail every row; so while both halves keep being refused
        in the same words as their parent (`chain`), only the first half is
        split further. A row fails only on evidence that the refusal is its
        path's own: another half went through, or was refused in other words
        (the chain broke). Refusals alike all the way down to one path, or of
        a batch of one, are the remote's as far as anyone can tell:
        RemoteRefuses, no row failed, 1 + 2·floor(log2 N) copies in all.
        """
        # Paths garbage-collected since they were queued are the usual suspects,
        # and cheap to find: asked only now, never for a batch that went through.
        if self._fail_gone(batch):
            return
        if len(batch) == 1 and chain:
            raise RemoteRefuses(refusal_of(error))
        if len(batch) == 1:
            reason = refusal_of(error)
            (path_id, path), remote = batch[0], self.remote
            self.report.failed += self.spool.queue.mark_failed(
                remote.name, self.owner, [path_id], reason
            )
            self.report.fail(path, reason)
            log.error("%s: %s failed: %s", remote.name, path, reason)
            return
        middle = len(batch) // 2
        halves = (batch[:middle], batch[middle:])
        refusals = [self._attempt(half) for half in halves]
        alike = chain and all(r is not None and same_refusal(r, error) for r in refusals)
        for i, (half, refusal) in enumerate(zip(halves, refusals, strict=True)):
            if refusal is not None:
                self._refused(half, refusal, chain=alike and i == 0)

    def _copy_with_retries(self, paths: list[str]) -> None:
        """One attempt; tried again here for unclear failures, re-probing the remote
        first."""
        remote = self.remote

        def before_retry(state: tenacity.RetryCallState) -> None:
            log.info(
                "%s: retrying a batch of %d paths (%s)",
                remote.name,
                len(paths),
                state.outcome.exception() if state.outcome else "",
            )
            self.reach.check_reachable(remote)  # gone meanwhile: UnreachableError ends it

        for attempt in within_flush(self.retry_wait, before_retry):
            with attempt:
                self.transport.copy(paths, self.asked.ask_sizes)

    def _defer(self, ids: list[int], reason: str) -> None:
        now = time.time()
        retry_min, retry_max = self.retry
        attempts = self.spool.queue.attempts(self.remote.name, ids)
        retry_at = {i: now + backoff(n + 1, retry_min, retry_max) for i, n in attempts.items()}
        self.report.deferred += self.spool.queue.mark_deferred(
            self.remote.name, self.owner, list(retry_at), reason, retry_at, now
        )
