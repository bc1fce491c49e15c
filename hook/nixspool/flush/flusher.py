"""One flush over one open spool: the order of things, and each remote on its own.

For each remote: check that it can be reached (a bounded probe: the user's ssh;
an unreachable remote costs no attempt and keeps its rows as they were), once a
day ask it which delivered paths it still has (reconcile.py), then hand its due
rows to the batch loop (batches.py) with the transport that reaches it
(transport.py). One remote's trouble, even a bug, never stops another's: each
remote's failure ends up in its own report (flush_remote).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .. import gcroots, nix, reconcile, sign
from ..config import Config, Remote
from ..errors import (
    CommandError,
    LocalError,
    NixspoolError,
    ProbeError,
    RemoteConfigError,
    SigningKeyError,
    SpoolError,
    UnreachableError,
)
from ..hook import files, storepath
from ..outcome import Outcome, classify
from ..probe import Probe, ProbeResult, Verdict, nix_ssh_env, start_probe, verdict
from ..run import Account, Running, last_line
from ..spool import Spool
from .report import EX_FAILED, FlushReport, RemoteReport, exit_code
from .transport import CacheWriter, NixCopy, Transport

if TYPE_CHECKING:
    from .batches import Progress

log = logging.getLogger(__name__)

PRUNE_EVERY = 24 * 3600.0  # seconds between a flush's prunes of rows past retention


@contextmanager
def single_flusher(spool: Spool) -> Iterator[bool]:
    """Hold the spool's flush lock if nobody else does; yield whether we got it."""
    try:
        with files.OwnersRights(spool.rights):  # docs/security.md#ownership
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
    unresolved = spool.intake.unresolved()
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
                spool.intake.fail_unresolved(drv_id, reason)
    for drv_id, drv_path in unresolved:
        if drv_path in outputs:
            spool.intake.resolve(drv_id, outputs[drv_path])
    return len(outputs)


def prune(spool: Spool, cfg: Config) -> None:
    """Rows past their retention go, once a day (Admin.prune)."""
    pruned = spool.admin.prune_if_due(cfg.retention, cfg.failed_retention, every=PRUNE_EVERY)
    if pruned and (pruned.delivered or pruned.failed or pruned.rejects):
        log.info(
            "pruned %d delivered and %d failed rows and %d rejected records past their retention",
            pruned.delivered,
            pruned.failed,
            pruned.rejects,
        )


def requeue_lost_rows(spool: Spool, cfg: Config) -> None:
    """Queue again what the GC roots say was queued, when they were made for another
    spool: this one was deleted, emptied or set aside as broken since the last flush
    (docs/operations.md#when-things-go-wrong)."""
    if not cfg.gc_roots:
        return
    rooted = gcroots.left_by_another_spool(spool.path, spool.spool_id)
    good, _ = storepath.partition(rooted, storepath.store_dir())
    again = spool.intake.add(good)
    if again:
        spool.intake.sync_remotes(r.name for r in cfg.remotes)
        log.warning(
            "the spool is not the one the GC roots were kept for (it was lost or replaced "
            "since the last flush): %d paths queued at that flush are queued again",
            len(again),
        )


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
        self.progress = progress
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

    def run(self, only: str | None = None) -> FlushReport:
        """Flush; the caller holds the flush lock (see single_flusher)."""
        remotes = self.cfg.selected(only)
        stale = self.spool.queue.reclaim_leases()
        if stale:
            log.info("took back %d rows leased by a flusher that did not finish", stale)
        requeue_lost_rows(self.spool, self.cfg)
        stepped = self.spool.queue.undo_clock_steps(self.cfg.retry_max, now=self.due_by)
        if stepped:
            log.warning(
                "%d rows were due after retry_max from now: the clock went back; they are due now",
                stepped,
            )
        # The spool was opened with every recorded path fanned out to the remotes
        # (cli.open_spool); only outputs resolved below need it again.
        # Probes take a moment (an SSH login): start them now, so they run while the
        # local work below and the first copy do; each remote's verdict is still
        # awaited before anything counts.
        due = [r for r in remotes if self.spool.queue.due_count(r.name, now=self.due_by)]
        for remote in due:
            if remote.uses_ssh:
                self._probes[remote.name] = self._start_probe(remote)
        if due:
            nix.ask_version()  # path-info's options depend on it
        errors = []
        try:
            try:
                if resolve_derivations(self.spool):
                    self.spool.intake.sync_remotes(r.name for r in self.cfg.remotes)
            except NixspoolError as e:  # local: the rows already resolved still go
                errors.append(f"resolving derivations: {e}")
                log.error("cannot resolve derivations recorded without outputs: %s", e)
            report = FlushReport([self.flush_remote(remote) for remote in remotes], errors)
            prune(self.spool, self.cfg)
            return report
        finally:
            for running in self._probes.values():
                running.kill()
            # Roots for what is still queued, once, at the end: rooting paths that
            # are about to be delivered would cost a symlink each, for nothing.
            self.protect()

    def flush_remote(self, remote: Remote) -> RemoteReport:
        report = RemoteReport(remote.name)
        transport = self._transport(remote)
        try:
            if self._reconcile_due(remote):
                self._reconcile(remote, report)
            due = self.spool.queue.due_count(remote.name, now=self.due_by)
            if due:
                from .batches import Batches  # only a flush with work pays for the import

                self.key(remote)  # an unusable key stops this remote before anything moves
                transport.begin()
                try:
                    Batches(
                        transport,
                        self.spool,
                        self.owner,
                        report,
                        self,
                        retry=(self.cfg.retry_min, self.cfg.retry_max),
                        progress=self.progress,
                    ).deliver(due, self.due_by)
                finally:
                    transport.close()
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
        transport.account_for(report)
        report.queued = self.spool.queue.queued_count(remote.name)
        report.seconds = round(time.monotonic() - self.started, 3)
        code = exit_code(FlushReport([report]))
        self.spool.remotes.flush_finished(
            remote.name,
            code,
            left_to_upstream=report.left_to_upstream if remote.skip_signed_by else None,
            needs_a_person=report.error if code == EX_FAILED and report.error else None,
        )
        return report

    def _transport(self, remote: Remote) -> Transport:
        if remote.nixspool_writes:
            return CacheWriter(remote, self, accept_new_host_keys=self.cfg.accept_new_host_keys)
        return NixCopy(remote, self)

    # -- what a remote still has, what waits for a person, what is kept ---------------

    def _reconcile_due(self, remote: Remote) -> bool:
        """Once per reconcile_interval (0: never), before delivering."""
        if not self.cfg.reconcile_interval:
            return False
        last = self.spool.remotes.reconciled_at(remote.name)
        return last is None or not 0 <= self.due_by - last < self.cfg.reconcile_interval

    def _reconcile(self, remote: Remote, report: RemoteReport) -> None:
        """Queue again what the remote lost of its delivered paths (reconcile.py), so
        that this flush delivers them again."""
        delivered = self.spool.queue.delivered_paths(remote.name)
        if remote.uses_ssh and delivered:
            pending = self._probes.pop(remote.name, None)
            self._require(self._verdict(remote, pending or self._start_probe(remote)))
        try:
            done = reconcile.reconcile(
                remote,
                self.spool,
                account=self.account,
                env=self.copy_env(remote),
                accept_new_host_keys=self.cfg.accept_new_host_keys,
                delivered=delivered,
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
        previous = self.spool.remotes.needs_a_person(remote.name)
        if previous and self.spool.queue.queued_count(remote.name):
            log.info("%s: its rows wait on backoff; its last flush needed a person", remote.name)
            raise RemoteConfigError(previous)

    def protect(self) -> None:
        if self.cfg.gc_roots:
            added, removed = gcroots.sync(
                self.spool.path, self.spool.queue.protected_paths(), spool_id=self.spool.spool_id
            )
            log.debug("GC roots: %d added, %d removed", added, removed)

    # -- what the transports and the batch loop ask of the flush (transport.Link) --

    def _start_probe(self, remote: Remote) -> Probe:
        return start_probe(remote, self.account, accept_new_host_keys=self.cfg.accept_new_host_keys)

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

    def start_copy(self, remote: Remote, start: Callable[[], Running]) -> Running:
        """start() a copy; the probe started with the flush decides before it counts."""
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

    def copy_env(self, remote: Remote) -> dict[str, str]:
        return nix_ssh_env(remote, self.account, self.cfg.accept_new_host_keys)

    def key(self, remote: Remote) -> sign.SecretKey | None:
        if not remote.sign_key_file:
            return None
        if remote.name not in self._keys:
            try:
                self._keys[remote.name] = sign.load_secret_key(remote.sign_key_file)
            except SigningKeyError as e:
                raise RemoteConfigError(str(e)) from None
        return self._keys[remote.name]
