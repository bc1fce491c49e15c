"""`nixspool flush`: deliver the spool's due rows to each remote.

For each remote: resolve .drv rows into their outputs, check that the remote
can be reached (a bounded probe; an unreachable remote costs no attempt and
keeps its rows as they were), then lease batches of due rows, fail the ones
whose path was garbage-collected, and `nix copy` each batch as the configured
user. A batch the remote rejects is split in halves until the bad paths are
found, so one bad path fails only its own row. A batch that fails for an
unclear reason is retried within this flush (tenacity, exponential backoff
with jitter, re-probing first), then deferred to a later flush with a
growing delay. A batch that runs past copy_timeout counts an attempt and is
deferred; its rows then go one at a time, and a path that times out alone
TIMEOUTS_ALONE times fails, with the reason, for a person to raise the bound.

One remote's trouble, even a bug, never stops another's: each remote's
failure ends up in its own report (see flush_remote).
"""

from __future__ import annotations

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

import tenacity

from . import filters, gcroots, narinfo, nix, reconcile, sign, static_cache, verify
from .config import Config, Remote
from .errors import (
    CommandError,
    LocalError,
    NixOutputError,
    NixspoolError,
    ProbeError,
    RemoteConfigError,
    SigningKeyError,
    SpoolError,
    UnreachableError,
)
from .hook import files, storepath
from .outcome import (
    Outcome,
    classify,
    reason_of,
    refusal_of,
    remote_message,
    said_by_the_network,
    same_refusal,
    unsupported_store,
)
from .probe import Probe, ProbeResult, Verdict, nix_ssh_env, start_probe, verdict
from .run import Account, Running, last_line
from .spool import Spool

log = logging.getLogger(__name__)

EX_OK, EX_FAILED, EX_TEMPFAIL = 0, 1, 75
# Within one flush: how often a batch is tried for an unclear failure, and how
# long to wait in between (seconds, exponential with jitter).
ATTEMPTS_PER_FLUSH = 3
RETRY_WAIT = (1.0, 10.0)
# A row whose last error starts with this ran past copy_timeout: it is copied
# alone from then on, and fails once it has timed out this often in all.
TIMED_OUT = "nix copy did not finish within copy_timeout"
TIMEOUTS_ALONE = 3
PRUNE_EVERY = 24 * 3600.0  # seconds between a flush's prunes of rows past retention


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


FAILURES_LISTED = 100  # per remote, in a flush's report

Progress = Callable[[str, int, int], None]  # (remote, delivered just now, due in all)


@contextmanager
def single_flusher(spool: Spool) -> Iterator[bool]:
    """Hold the spool's flush lock if nobody else does; yield whether we got it."""
    try:
        with files.OwnersRights(spool.rights):  # README#ownership
            fd = files.open_regular(spool.path + ".flush.lock", os.O_RDWR | os.O_CREAT)
    except OSError as e:
        raise SpoolError(f"flush lock: {e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def resolve_derivations(spool: Spool) -> int:
    """Replace rows recorded by DRV_PATH alone (Nix 2.8.0) by their outputs; how
    many were resolved."""
    unresolved = spool.queue.unresolved()
    if not unresolved:
        return 0
    try:  # one call for all of them, the common case
        outputs = nix.outputs_of_many([drv for _, drv in unresolved])
    except CommandError:  # some derivation is gone: find it, one by one
        outputs = {}
        for drv_id, drv_path in unresolved:
            try:
                outputs[drv_path] = nix.outputs_of(drv_path)
            except CommandError as e:
                reason = f"cannot resolve outputs of {drv_path}: {last_line(e.stderr)}"
                log.warning("%s", reason)
                spool.queue.fail_unresolved(drv_id, reason)
    for drv_id, drv_path in unresolved:
        if drv_path in outputs:
            spool.queue.resolve(drv_id, outputs[drv_path])
    return len(outputs)


class _CopyFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _RemoteFailed(_CopyFailed):
    """The host answers SSH, but what keeps the store there failed (its Nix, or the
    cache directory it will not let us write): a person must look."""


class _RemoteRefuses(_CopyFailed):
    """Bisection found every path refused in the same words: the remote refuses us
    (its trust, its store), not the paths. The rows wait for a person."""


class _Stalled(_CopyFailed):
    """A copy moved nothing for stall_timeout: an attempt, deferred with backoff, not
    tried again within this flush."""


class _Transient(_CopyFailed):
    """A copy failed for a reason that may go away: tenacity retries it."""


class _TimedOut(_CopyFailed):
    """A copy ran past copy_timeout: an attempt, but not retried within this flush
    (it has had its time already)."""


@dataclass
class FlushReport:
    """A whole flush: each remote's report, and what failed on this machine for all
    of them (resolving derivations)."""

    remotes: list[RemoteReport]
    errors: list[str] = field(default_factory=list)


class Flusher:
    """One flush run over one open spool."""

    def __init__(
        self,
        cfg: Config,
        spool: Spool,
        account: Account,
        progress: Progress | None = None,
    ) -> None:
        self.cfg = cfg
        self.spool = spool
        # Who runs ssh and nix copy (privileges.remote_account, which the command
        # asks before it opens the spool); run.spawn() switches to it only when
        # that is not who runs nixspool.
        self.account = account
        self.progress = progress or (lambda remote, done, total: None)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # A remote's `seconds` count from here: its probe starts with the flush,
        # and resolving derivations is done for it too.
        self.started = time.monotonic()
        # A flush takes the rows due when it started, each once: a row it defers
        # waits for the next flush, however short its backoff.
        self.due_by = time.time()
        # Probes started but not yet asked for their verdict, by remote name.
        self._probes: dict[str, Probe] = {}
        self._keys: dict[str, sign.SecretKey] = {}
        # Per binary-cache remote, over the whole flush (retries write nothing twice):
        # closure paths left to upstream, paths written, compressed bytes written.
        self._left_to_upstream: dict[str, set[str]] = {}
        self._uploaded: dict[str, set[str]] = {}
        self._uploaded_bytes: dict[str, int] = {}

    def protect(self) -> None:
        if self.cfg.gc_roots:
            added, removed = gcroots.sync(
                self.spool.path, self.spool.queue.protected_paths(), spool_id=self.spool.spool_id
            )
            log.debug("GC roots: %d added, %d removed", added, removed)

    def prune(self) -> None:
        """Rows past their retention go, once a day (Admin.prune)."""
        pruned = self.spool.admin.prune_if_due(
            self.cfg.retention, self.cfg.failed_retention, every=PRUNE_EVERY
        )
        if pruned and (pruned.delivered or pruned.failed or pruned.rejects):
            log.info(
                "pruned %d delivered and %d failed rows and %d rejected records past their "
                "retention",
                pruned.delivered,
                pruned.failed,
                pruned.rejects,
            )

    def requeue_lost_rows(self) -> None:
        """Queue again what the GC roots say was queued, when they were made for
        another spool: this one was deleted, emptied or set aside as broken since
        the last flush (README#when-things-go-wrong)."""
        if not self.cfg.gc_roots:
            return
        rooted = gcroots.left_by_another_spool(self.spool.path, self.spool.spool_id)
        good, _ = storepath.partition(rooted, storepath.store_dir())
        again = self.spool.queue.add(good)
        if again:
            self.spool.queue.sync_remotes(r.name for r in self.cfg.remotes)
            log.warning(
                "the spool is not the one the GC roots were kept for (it was lost or "
                "replaced since the last flush): %d paths queued at that flush are "
                "queued again",
                len(again),
            )

    # -- delivering ----------------------------------------------------------------

    def run(self, only: str | None = None) -> FlushReport:
        """Flush; the caller holds the flush lock (see single_flusher)."""
        remotes = self.cfg.selected(only)
        stale = self.spool.queue.reclaim_leases()
        if stale:
            log.info("took back %d rows leased by a flusher that did not finish", stale)
        self.requeue_lost_rows()
        stepped = self.spool.queue.undo_clock_steps(self.cfg.retry_max, now=self.due_by)
        if stepped:
            log.warning(
                "%d rows were due after retry_max from now: the clock went back; they are due now",
                stepped,
            )
        # The spool was opened with every recorded path fanned out to the remotes
        # (cli.open_spool); only outputs resolved below need it again.
        # Probes take a few hundred ms (a Python child, paramiko, an SSH login):
        # start them now, so they run while the local work below and the first
        # copy do; each remote's verdict is still awaited before anything counts.
        for remote in remotes:
            if remote.uses_ssh and self.spool.queue.due_count(remote.name, now=self.due_by):
                self._probes[remote.name] = self._start_probe(remote)
        errors = []
        try:
            try:
                if resolve_derivations(self.spool):
                    self.spool.queue.sync_remotes(r.name for r in self.cfg.remotes)
            except NixspoolError as e:  # local: the rows already resolved still go
                errors.append(f"resolving derivations: {e}")
                log.error("cannot resolve derivations recorded without outputs: %s", e)
            report = FlushReport([self.flush_remote(remote) for remote in remotes], errors)
            self.prune()
            return report
        finally:
            for running in self._probes.values():
                running.kill()
            # Roots for what is still queued, once, at the end: rooting paths that
            # are about to be delivered would cost a symlink each, for nothing.
            self.protect()

    def flush_remote(self, remote: Remote) -> RemoteReport:
        report = RemoteReport(remote.name)
        try:
            if self._reconcile_due(remote):
                self._reconcile(remote, report)
            due = self.spool.queue.due_count(remote.name, now=self.due_by)
            if due:
                self._deliver(remote, report, due)
            pending = self._probes.pop(remote.name, None)
            if pending is not None:  # nothing was copied; still say if it is reachable
                self._require(self._verdict(remote, pending))
            elif not due:
                self._still_needs_a_person(remote)
        except UnreachableError as e:
            report.unreachable, report.error = True, str(e)
            log.warning("%s: unreachable, rows stay queued: %s", remote.name, e)
        except NixspoolError as e:  # refuses us, its Nix failed, ours did: a person looks
            report.error = str(e)
            log.error("%s: %s", remote.name, e)
        except Exception as e:  # a bug: this remote stops here, the others go on
            report.error = (
                f"nixspool failed ({type(e).__name__}: {e}); this is a bug, please report "
                "it with the traceback `nixspool --debug flush` shows"
            )
            log.error("%s: %s", remote.name, report.error)
            log.debug("%s: the traceback", remote.name, exc_info=True)
        report.left_to_upstream = len(self._left_to_upstream.get(remote.name, ()))
        report.uploaded = len(self._uploaded.get(remote.name, ()))
        report.uploaded_bytes = self._uploaded_bytes.get(remote.name, 0)
        report.queued = self.spool.queue.queued_count(remote.name)
        report.seconds = round(time.monotonic() - self.started, 3)
        code = exit_code(FlushReport([report]))
        self.spool.queue.flush_finished(
            remote.name,
            code,
            left_to_upstream=report.left_to_upstream if remote.skip_signed_by else None,
            needs_a_person=report.error if code == EX_FAILED and report.error else None,
        )
        return report

    def _reconcile_due(self, remote: Remote) -> bool:
        """Once per reconcile_interval (0: never), before delivering."""
        if not self.cfg.reconcile_interval:
            return False
        last = self.spool.queue.reconciled_at(remote.name)
        return last is None or not 0 <= self.due_by - last < self.cfg.reconcile_interval

    def _reconcile(self, remote: Remote, report: RemoteReport) -> None:
        """Queue again what the remote lost of its delivered paths (reconcile.py), so
        that this flush delivers them again."""
        if remote.uses_ssh and self.spool.queue.delivered_paths(remote.name):
            pending = self._probes.pop(remote.name, None)
            self._require(self._verdict(remote, pending or self._start_probe(remote)))
        try:
            done = reconcile.reconcile(
                remote,
                self.spool,
                account=self.account,
                env=self.copy_env(remote),
                accept_new_host_keys=self.cfg.accept_new_host_keys,
            )
        except CommandError as e:
            why = f"could not ask which delivered paths it still has: {e}"
            if classify(e.stderr or str(e)) is Outcome.UNREACHABLE:
                raise UnreachableError(f"{remote.url}: {why}") from None
            # Delivering still goes on; the next flush asks again.
            report.reconcile_error = why
            log.warning("%s: %s", remote.name, why)
            return
        report.requeued = done.requeued
        report.failed += len(done.failed)
        for path in done.failed:
            report.fail(path, "gone from the remote and from the local store")

    def _still_needs_a_person(self, remote: Remote) -> None:
        """Nothing of `remote` is due: its rows wait on backoff. If its last flush
        needed a person, say it again (exit 1), or a timer's next run would report
        success until the backoff ends, and monitoring would see nothing wrong."""
        previous = self.spool.queue.needs_a_person(remote.name)
        if previous and self.spool.queue.queued_count(remote.name):
            log.info("%s: its rows wait on backoff; its last flush needed a person", remote.name)
            raise RemoteConfigError(previous)

    # -- reachability --------------------------------------------------------------

    def _start_probe(self, remote: Remote) -> Probe:
        return start_probe(
            remote,
            self.account,
            accept_new_host_keys=self.cfg.accept_new_host_keys,
        )

    def _verdict(self, remote: Remote, running: Probe) -> ProbeResult:
        result = verdict(running)
        log.debug(
            "%s: probe: %s at %s (%s)", remote.name, result.verdict, result.stage, result.message
        )
        return result

    @staticmethod
    def _require(result: ProbeResult) -> None:
        if result.verdict is Verdict.UNREACHABLE:
            raise UnreachableError(result.message)
        if result.verdict is Verdict.MISCONFIGURED:
            raise RemoteConfigError(result.message)
        if result.verdict is Verdict.ERROR:
            raise ProbeError(f"the SSH probe could not run: {result.message}")

    def check_reachable(self, remote: Remote) -> None:
        """Raise UnreachableError or RemoteConfigError unless the remote lets us in."""
        if remote.uses_ssh:  # file://, local, ...: nix copy itself says what is wrong
            self._require(self._verdict(remote, self._start_probe(remote)))

    def copy_env(self, remote: Remote) -> dict[str, str]:
        return nix_ssh_env(remote, self.account, self.cfg.accept_new_host_keys)

    # -- copying -------------------------------------------------------------------

    def _key(self, remote: Remote) -> sign.SecretKey | None:
        if not remote.sign_key_file:
            return None
        if remote.name not in self._keys:
            try:
                self._keys[remote.name] = sign.load_secret_key(remote.sign_key_file)
            except SigningKeyError as e:
                raise RemoteConfigError(str(e)) from None
        return self._keys[remote.name]

    def _sign(self, remote: Remote, paths: list[str]) -> None:
        """Sign what the batch will upload (its closure) that lacks our signature, but
        only paths the hook recorded: nothing a user can slip into a closure is signed."""
        key = self._key(remote)
        if key is None or remote.nixspool_writes:  # its narinfo files carry the signatures
            return
        try:
            infos = nix.path_infos(paths, recursive=True)
            ours = self.spool.queue.recorded(infos)
            signed = sign.attach(key, [info for path, info in infos.items() if path in ours])
        except (CommandError, NixOutputError, OSError) as e:
            raise LocalError(f"signing for {remote.name} failed, nothing was copied: {e}") from None
        if signed:
            log.info("%s: signed %d paths with %s", remote.name, len(signed), key.name)

    def verify(self, remote: Remote, paths: Sequence[str]) -> verify.Verdicts:
        """verify.check() with this remote's key, as the flush's user (none unsigned)."""
        key = self._key(remote)
        if key is None:
            return verify.Verdicts()
        return verify.check(
            remote, key, paths, self.spool, account=self.account, env=self.copy_env(remote)
        )

    def _deliver(self, remote: Remote, report: RemoteReport, due: int) -> None:
        self._key(remote)  # an unusable key stops this remote before anything moves
        lease = remote.copy_timeout * ATTEMPTS_PER_FLUSH + 60
        done = 0
        while batch := self.spool.queue.claim(
            remote.name, self.owner, remote.batch_size, lease, due_by=self.due_by
        ):
            try:
                before = report.delivered + report.skipped
                batch = self._select(remote, batch, report)
                if batch:
                    self._copy(remote, batch, report)
                done += report.delivered + report.skipped - before
                self.progress(remote.name, done, due)
            except BaseException:
                # Unreachable, interrupted or a bug: what this batch did not
                # finish goes back untouched, and the next flush resumes.
                self.spool.queue.released(remote.name, self.owner, [i for i, _ in batch])
                raise

    def _select(
        self, remote: Remote, batch: list[tuple[int, str]], report: RemoteReport
    ) -> list[tuple[int, str]]:
        """The claimed rows `remote`'s filters take; the others become `skipped` with
        their reason. Learns each path's NAR size on the way (bytes delivered)."""
        reasons = {i: why for i, p in batch if (why := filters.why_name_left_out(remote, p))}
        kept = [(i, p) for i, p in batch if i not in reasons]
        # The closures only when max_size weighs them: one call either way.
        try:
            infos = self._path_infos(remote, [p for _, p in kept], recursive=bool(remote.max_size))
        except LocalError as e:
            if remote.max_size or remote.skip_signed_by:
                raise
            # Only the bytes-delivered figure needs them: the copy, which runs as
            # the user and may find a Nix this process does not, still goes.
            log.warning("%s: NAR sizes unknown, bytes delivered not counted: %s", remote.name, e)
            infos = {}
        self.spool.queue.set_nar_sizes({p: infos[p].nar_size for _, p in kept if p in infos})
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
            report.skipped += self.spool.queue.skipped(remote.name, self.owner, reasons)
            log.info(
                "%s: %d paths left out by its filters (`nixspool list --state skipped`)",
                remote.name,
                len(reasons),
            )
        return [(i, p) for i, p in batch if i not in reasons]

    def _path_infos(
        self, remote: Remote, paths: list[str], *, recursive: bool
    ) -> dict[str, nix.PathInfo]:
        """Path infos of the valid ones of `paths`; LocalError if Nix cannot say."""
        if not paths:
            return {}
        try:
            try:
                return nix.path_infos(paths, recursive=recursive)
            except CommandError:  # some Nix refuse a path garbage-collected meanwhile
                gone = nix.invalid_paths(paths)
                if not gone:
                    raise
                rest = [p for p in paths if p not in gone]
                return nix.path_infos(rest, recursive=recursive) if rest else {}
        except (CommandError, NixOutputError) as e:
            raise LocalError(
                f"reading path info for {remote.name} failed, nothing was copied: {e}"
            ) from None

    def _copy(self, remote: Remote, batch: Sequence[tuple[int, str]], report: RemoteReport) -> None:
        """A claimed batch; the rows that ran past copy_timeout before go one by one,
        so that one huge path cannot hold the others back for ever."""
        last = self.spool.queue.last_errors(remote.name, [i for i, _ in batch])
        slow = [row for row in batch if (last.get(row[0]) or "").startswith(TIMED_OUT)]
        rest = [row for row in batch if row not in slow]
        try:
            for part in ([rest] if rest else []) + [[row] for row in slow]:
                self._copy_part(remote, part, report)
        except _RemoteRefuses as e:
            # One attempt for each row still waiting, with the reason `status` shows.
            self._defer(remote, [i for i, _ in batch], e.reason, report)
            raise RemoteConfigError(
                f"{remote.url} refuses every path alike, so the remote's settings refuse "
                f"us, not the paths: {e.reason}; the rows stay queued and are tried "
                "again after their backoff"
            ) from None

    def _copy_part(
        self, remote: Remote, batch: Sequence[tuple[int, str]], report: RemoteReport
    ) -> None:
        refusal = self._attempt(remote, batch, report)
        if refusal is not None:
            self._refused(remote, batch, refusal, report)

    def _attempt(
        self, remote: Remote, batch: Sequence[tuple[int, str]], report: RemoteReport
    ) -> CommandError | None:
        """Copy `batch` once (with this flush's retries) and settle its rows, unless
        the remote refused it: that refusal is returned, the rows still leased."""
        ids = [i for i, _ in batch]
        try:
            self._sign(remote, [p for _, p in batch])
        except LocalError as signing:
            # Paths garbage-collected since they were queued make path-info fail:
            # theirs is a reason of their own. Anything else stops this remote.
            try:
                gone_handled = self._fail_gone(remote, batch, report)
            except CommandError:
                raise signing from None
            if gone_handled:
                return None
            raise
        try:
            self._copy_with_retries(remote, [p for _, p in batch])
        except _TimedOut as e:
            self._timed_out(remote, batch, e.reason, report)
            return None
        except (_Transient, _Stalled) as e:
            log.warning("%s: %s; %d rows deferred", remote.name, e.reason, len(ids))
            self._defer(remote, ids, e.reason, report)
            return None
        except _RemoteFailed as e:
            # Counts as an attempt, with its reason where `status` shows it; the
            # remote stops here and the flush exits 1: a person must look.
            self._defer(remote, ids, e.reason, report)
            raise RemoteConfigError(f"{remote.url}: {e.reason}") from None
        except CommandError as e:  # the remote or a path says no
            return e
        report.delivered += self.spool.queue.delivered(remote.name, self.owner, ids)
        if remote.verifies:
            try:
                verdicts = self.verify(remote, [p for _, p in batch])
            except CommandError as e:
                why = f"{remote.url}: delivered, but reading the signatures back failed ({e})"
                if classify(e.stderr or str(e)) is Outcome.UNREACHABLE:
                    raise UnreachableError(why) from None
                raise RemoteConfigError(f"{why}; `nixspool verify` checks again") from None
            report.unverified += len(verdicts.bad)
            report.resigned += len(verdicts.resigned)
        return None

    def _fail_gone(
        self, remote: Remote, batch: Sequence[tuple[int, str]], report: RemoteReport
    ) -> bool:
        """Fail the rows whose path is no longer in the local store, and copy the
        rest; False if none is gone."""
        gone = nix.invalid_paths([p for _, p in batch])
        if not gone:
            return False
        reason = "no longer in the local store (garbage-collected before upload)"
        bad = [(i, p) for i, p in batch if p in gone]
        report.failed += self.spool.queue.failed(
            remote.name, self.owner, [i for i, _ in bad], reason
        )
        for _, p in bad:
            report.fail(p, reason)
        rest = [(i, p) for i, p in batch if p not in gone]
        if rest:
            self._copy_part(remote, rest, report)
        return True

    def _timed_out(
        self, remote: Remote, batch: Sequence[tuple[int, str]], reason: str, report: RemoteReport
    ) -> None:
        """An attempt that ran past copy_timeout. What it copied stays on the remote
        (nix copy adds path by path), so trying again makes progress; a path that
        times out alone, again and again, needs a person to raise the bound."""
        ids = [i for i, _ in batch]
        if len(batch) == 1:
            attempts = self.spool.queue.attempts(remote.name, ids)[ids[0]] + 1
            if attempts >= TIMEOUTS_ALONE:
                why = (
                    f"{reason}, {attempts} attempts, the last ones alone: raise "
                    f"copy_timeout for {remote.name}, then `nixspool retry`"
                )
                report.failed += self.spool.queue.failed(remote.name, self.owner, ids, why)
                report.fail(batch[0][1], why)
                log.error("%s: %s failed: %s", remote.name, batch[0][1], why)
                return
        log.warning("%s: %s; %d rows deferred", remote.name, reason, len(ids))
        self._defer(remote, ids, reason, report)

    def _refused(
        self,
        remote: Remote,
        batch: Sequence[tuple[int, str]],
        error: CommandError,
        report: RemoteReport,
        *,
        chain: bool = True,
    ) -> None:
        """Find which paths of a refused batch are bad; deliver the others.

        Bisection: each half is copied on its own. A remote that refuses every
        path (it trusts none of our keys, its store is read-only) would cost
        2N-1 copies and fail every row; so while both halves keep being refused
        in the same words as their parent (`chain`), only the first half is
        split further, and refusals alike all the way down to single paths are
        the remote's, not the paths': _RemoteRefuses (about 2·log2 N copies).
        One half that goes through ends the chain: the rest is bisected as usual.
        """
        # Paths garbage-collected since they were queued are the usual suspects,
        # and cheap to find: asked only now, never for a batch that went through.
        if self._fail_gone(remote, batch, report):
            return
        if len(batch) == 1:
            reason = refusal_of(error)
            report.failed += self.spool.queue.failed(remote.name, self.owner, [batch[0][0]], reason)
            report.fail(batch[0][1], reason)
            log.error("%s: %s failed: %s", remote.name, batch[0][1], reason)
            return
        middle = len(batch) // 2
        halves = (batch[:middle], batch[middle:])
        refusals = [self._attempt(remote, half, report) for half in halves]
        alike = chain and all(r is not None and same_refusal(r, error) for r in refusals)
        if alike and len(batch) == 2:
            raise _RemoteRefuses(refusal_of(error))
        for i, (half, refusal) in enumerate(zip(halves, refusals, strict=True)):
            if refusal is not None:
                self._refused(remote, half, refusal, report, chain=alike and i == 0)

    def _copy_with_retries(self, remote: Remote, paths: list[str]) -> None:
        """nix copy; retried here for unclear failures, re-probing the remote first."""

        def before_retry(state: tenacity.RetryCallState) -> None:
            log.info(
                "%s: retrying a batch of %d paths (%s)",
                remote.name,
                len(paths),
                state.outcome.exception() if state.outcome else "",
            )
            self.check_reachable(remote)  # gone meanwhile: UnreachableError ends it

        for attempt in tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_Transient),
            stop=tenacity.stop_after_attempt(ATTEMPTS_PER_FLUSH),
            wait=tenacity.wait_exponential_jitter(initial=RETRY_WAIT[0], max=RETRY_WAIT[1]),
            before_sleep=before_retry,
            reraise=True,
        ):
            with attempt:
                self._copy_once(remote, paths)

    def _cache_closure(self, remote: Remote, paths: list[str]) -> list[nix.PathInfo]:
        """What a binary cache receives for `paths`: their closures less what its
        upstream caches serve, references first. CommandError (the rows' own
        reason) if a path is gone from the local store."""
        infos = self._path_infos(remote, paths, recursive=True)
        gone = [p for p in paths if p not in infos]
        if gone:
            raise CommandError(f"{gone[0]} is not valid in the local store")
        upload, left = filters.cache_closure(remote, paths, infos)
        self._left_to_upstream.setdefault(remote.name, set()).update(left)
        return [infos[p] for p in narinfo.references_first(upload, infos)]

    def _started_copy(self, remote: Remote, start: Callable[[], Running]) -> Running:
        """start() the copy; the probe started with the flush decides before it counts."""
        try:
            running = start()
        except CommandError as e:  # could not even start: ours, not the remote's
            raise LocalError(str(e)) from None
        pending = self._probes.pop(remote.name, None)
        if pending is not None:
            # The first copy ran alongside the probe; the probe's verdict decides.
            try:
                self._require(self._verdict(remote, pending))
            except BaseException:
                running.kill()
                raise
        return running

    def _past_copy_timeout(self, remote: Remote) -> _TimedOut:
        """A copy ran past copy_timeout: our own bound, not the network's. Away
        (UnreachableError) only if the probe says so; else an attempt that timed out."""
        self.check_reachable(remote)
        return _TimedOut(f"{TIMED_OUT} ({remote.copy_timeout:g} s)")

    def _copy_once(self, remote: Remote, paths: list[str]) -> None:
        if remote.nixspool_writes:
            self._upload_once(remote, paths)
            return
        running = self._started_copy(
            remote,
            lambda: nix.start_copy(
                remote.url,
                paths,
                timeout=remote.copy_timeout,
                stall=remote.stall_timeout,
                env=self.copy_env(remote),
                account=self.account,
            ),
        )
        try:
            running.wait()
        except CommandError as e:
            if e.stalled:
                # A remote Nix that hangs (holding its store lock, say) while sshd
                # still answers keep-alives: not worth the rest of copy_timeout.
                self.check_reachable(remote)  # away now: UnreachableError
                said = f": {last_line(e.stderr)}" if e.stderr.strip() else ""
                raise _Stalled(
                    f"nix copy moved nothing for {remote.stall_timeout:g} s (stall_timeout){said}"
                ) from None
            if e.timed_out:
                raise self._past_copy_timeout(remote) from None
            outcome = classify(e.stderr or str(e))
            reason = reason_of(e.stderr) if e.stderr else str(e)
            if outcome is Outcome.UNSUPPORTED:
                raise _RemoteFailed(unsupported_store(remote.url, reason)) from None
            if outcome is Outcome.UNREACHABLE:
                if remote.uses_ssh:
                    # What nix copy prints when the link drops is also what it
                    # prints when the remote's Nix is missing or broken (the
                    # connection ends early). The probe tells them apart: "away"
                    # only if the host does not answer SSH now.
                    self.check_reachable(remote)
                    if said_by_the_network(e.stderr or ""):
                        raise _Transient(f"{reason} (the host answers again)") from None
                    raise _RemoteFailed(
                        f"the host answers SSH, but Nix there did not: {remote_message(e)}"
                    ) from None
                raise UnreachableError(f"{remote.url}: {reason}") from None
            if outcome is Outcome.TRANSIENT:
                raise _Transient(reason) from None
            raise

    def _upload_once(self, remote: Remote, paths: list[str]) -> None:
        """Write `paths` with their closures to a cache nixspool writes (sftp://, file://
        with skip_signed_by; static_cache.py): signed here, with the key only this
        process reads, where the spool recorded them."""
        infos = self._cache_closure(remote, paths)
        key = self._key(remote)
        ours = self.spool.queue.recorded(i.path for i in infos) if key else set()
        entries = [
            narinfo.Entry.of(
                info,
                sign.signatures_with_ours(key, info)
                if key and info.path in ours
                else info.signatures,
            )
            for info in infos
        ]
        running = self._started_copy(
            remote,
            lambda: static_cache.start_upload(
                remote,
                entries,
                self.account,
                accept_new_host_keys=self.cfg.accept_new_host_keys,
                store_dir=storepath.store_dir(),
            ),
        )
        try:
            result = static_cache.result_of(running)
        except CommandError as e:
            if e.timed_out:
                raise self._past_copy_timeout(remote) from None
            log.debug("%s: the cache writer said:\n%s", remote.name, e.stderr)
            raise RuntimeError(f"the cache writer failed: {e}") from None
        self._uploaded.setdefault(remote.name, set()).update(result.uploaded)
        self._uploaded_bytes[remote.name] = self._uploaded_bytes.get(remote.name, 0) + result.bytes
        if result.present:
            log.info("%s: %d paths were in the cache already", remote.name, len(result.present))
        if result.error is None:
            return
        kind, message = result.error["kind"], f"{remote.url}: {result.error['message']}"
        if kind == static_cache.Kind.LOGIN:  # as the probe would have said
            if result.error.get("verdict") == Verdict.UNREACHABLE:
                raise UnreachableError(message)
            raise RemoteConfigError(message)
        if kind == static_cache.Kind.LINK:
            self.check_reachable(remote)  # away now: UnreachableError; back: try again
            raise _Transient(result.error["message"])
        if kind == static_cache.Kind.WRITE:
            raise _Transient(result.error["message"])
        if kind == static_cache.Kind.PATH:  # the rows' own reason: _refused finds which
            raise CommandError(message, stderr=result.error["message"])
        raise _RemoteFailed(result.error["message"])  # Kind.CACHE

    def _defer(self, remote: Remote, ids: list[int], reason: str, report: RemoteReport) -> None:
        now = time.time()
        for path_id, attempts in self.spool.queue.attempts(remote.name, ids).items():
            retry_at = now + backoff(attempts + 1, self.cfg.retry_min, self.cfg.retry_max)
            report.deferred += self.spool.queue.deferred(
                remote.name, self.owner, [path_id], reason, retry_at, now
            )


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
