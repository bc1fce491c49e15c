"""How a batch reaches a remote: `nix copy` to a Nix store (NixCopy), or the cache
writer for a binary cache nixspool writes itself (CacheWriter: sftp://, s3://,
file:// with skip_signed_by). The batch loop (batches.py) takes either and does
not know which.

A transport makes one attempt at a time and says how it ended by what it raises:
nothing (delivered); CommandError (the remote or a path refused the batch: the
rows' own reason, which the batch loop bisects); UnreachableError (away: the rows
go back untouched); RemoteConfigError and LocalError (a person must look); or
one of the CopyFailed kinds below, each handled by the loop as its docstring says.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Protocol

from .. import filters, narinfo, nix, sign, static_cache, verify
from ..cache_files import Kind
from ..config import Remote
from ..errors import (
    CommandError,
    LocalError,
    NixOutputError,
    RemoteConfigError,
    UnreachableError,
)
from ..hook import storepath
from ..outcome import (
    Outcome,
    classify,
    reason_of,
    remote_message,
    said_by_the_network,
    unsupported_store,
)
from ..probe import Verdict
from ..run import Account, Running, last_line
from ..spool import Spool
from .report import RemoteReport

log = logging.getLogger(__name__)

# A row whose last error starts with this ran past copy_timeout: it is copied
# alone from then on (batches.py).
TIMED_OUT = "nix copy did not finish within copy_timeout"


class CopyFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RemoteFailed(CopyFailed):
    """The host answers SSH, but what keeps the store there failed (its Nix, or the
    cache directory it will not let us write): an attempt, and a person must look."""


class Transient(CopyFailed):
    """A copy failed for a reason that may go away: tried again in this flush."""


class TimedOut(CopyFailed):
    """A copy ran past copy_timeout: an attempt, but not retried within this flush
    (it has had its time already)."""


class Stalled(CopyFailed):
    """A copy moved nothing for stall_timeout: an attempt, deferred with backoff, not
    tried again within this flush."""


class Link(Protocol):
    """What a transport asks of the flush it runs in (flusher.Flusher is one)."""

    spool: Spool
    account: Account

    def start_copy(self, remote: Remote, start: Callable[[], Running]) -> Running: ...

    def check_reachable(self, remote: Remote) -> None: ...

    def copy_env(self, remote: Remote) -> dict[str, str]: ...

    def key(self, remote: Remote) -> sign.SecretKey | None: ...


class Transport(Protocol):
    remote: Remote
    # The batch loop asks Nix for the batches' closures, not only the paths, and
    # hands them to prepare().
    wants_closures: bool

    def begin(self) -> None:
        """Rows are due: start what takes a while before the first copy (a login),
        while the batch loop asks Nix about them. Never raises."""

    def close(self) -> None:
        """The flush is done with this remote: stop what begin() started and no
        copy used."""

    def prepare(self, paths: list[str], closures: Mapping[str, nix.PathInfo]) -> None:
        """Before a batch is copied (signing it); LocalError if that fails.
        `closures`: path infos of the paths' closures where the loop has them (a
        path missing from them: ask Nix)."""

    def copy(self, paths: list[str], started: Callable[[], None]) -> None:
        """One attempt at `paths` and their closures (see the module); `started()`
        once it runs, before waiting for it (the batch loop asks Nix meanwhile)."""

    def delivered(self, paths: list[str], report: RemoteReport) -> None:
        """After the rows were marked delivered (verifying them there)."""

    def account_for(self, report: RemoteReport) -> None:
        """Add what this transport counted over the flush to the remote's report."""


def known_closures(
    paths: list[str], closures: Mapping[str, nix.PathInfo]
) -> dict[str, nix.PathInfo] | None:
    """The path infos of `paths`' closures, taken from `closures`; None if one of
    the paths is not among them."""
    if not all(p in closures for p in paths):
        return None
    return {p: closures[p] for p in nix.closure(paths, closures)}


def local_path_infos(
    remote: Remote, paths: list[str], *, recursive: bool
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


def past_copy_timeout(link: Link, remote: Remote) -> TimedOut:
    """A copy ran past copy_timeout: our own bound, not the network's. Away
    (UnreachableError) only if the probe says so; else an attempt that timed out."""
    link.check_reachable(remote)
    return TimedOut(f"{TIMED_OUT} ({remote.copy_timeout:g} s)")


class NixCopy:
    """`nix copy --to URL` as the user, signed here first where the remote has a key."""

    def __init__(self, remote: Remote, link: Link) -> None:
        self.remote = remote
        self.link = link
        self.wants_closures = bool(remote.sign_key_file)  # what prepare() signs

    def begin(self) -> None:
        pass  # nix copy logs in itself

    def close(self) -> None:
        pass

    def prepare(self, paths: list[str], closures: Mapping[str, nix.PathInfo]) -> None:
        """Sign what the batch will upload (its closure) that lacks our signature, but
        only paths the hook recorded: nothing a user can slip into a closure is signed."""
        key = self.link.key(self.remote)
        if key is None:
            return
        try:
            infos = known_closures(paths, closures) or nix.path_infos(paths, recursive=True)
            ours = self.link.spool.queue.recorded(infos)
            signed = sign.attach(key, [info for path, info in infos.items() if path in ours])
        except (CommandError, NixOutputError, OSError) as e:
            raise LocalError(
                f"signing for {self.remote.name} failed, nothing was copied: {e}"
            ) from None
        if signed:
            log.info("%s: signed %d paths with %s", self.remote.name, len(signed), key.name)

    def copy(self, paths: list[str], started: Callable[[], None]) -> None:
        remote = self.remote
        running = self.link.start_copy(
            remote,
            lambda: nix.start_copy(
                remote.url,
                paths,
                timeout=remote.copy_timeout,
                stall=remote.stall_timeout,
                env=self.link.copy_env(remote),
                account=self.link.account,
            ),
        )
        started()
        try:
            running.wait()
        except CommandError as e:
            raise self._failure(e) from None

    def _failure(self, e: CommandError) -> Exception:
        """What a failed nix copy means (outcome.py), as the exception to raise."""
        remote = self.remote
        if e.stalled:
            # A remote Nix that hangs (holding its store lock, say) while sshd
            # still answers keep-alives: not worth the rest of copy_timeout.
            self.link.check_reachable(remote)  # away now: UnreachableError
            said = f": {last_line(e.stderr)}" if e.stderr.strip() else ""
            return Stalled(
                f"nix copy moved nothing for {remote.stall_timeout:g} s (stall_timeout){said}"
            )
        if e.timed_out:
            return past_copy_timeout(self.link, remote)
        outcome = classify(e.stderr or str(e))
        reason = reason_of(e.stderr) if e.stderr else str(e)
        if outcome is Outcome.UNSUPPORTED:
            return RemoteFailed(unsupported_store(remote.url, reason))
        if outcome is Outcome.UNREACHABLE:
            if not remote.uses_ssh:
                return UnreachableError(f"{remote.url}: {reason}")
            # What nix copy prints when the link drops is also what it prints when
            # the remote's Nix is missing or broken (the connection ends early).
            # The probe tells them apart: "away" only if the host does not answer
            # SSH now.
            self.link.check_reachable(remote)
            if said_by_the_network(e.stderr or ""):
                return Transient(f"{reason} (the host answers again)")
            return RemoteFailed(f"the host answers SSH, but Nix there did not: {remote_message(e)}")
        if outcome is Outcome.TRANSIENT:
            return Transient(reason)
        return e  # refused: the rows' own reason

    def delivered(self, paths: list[str], report: RemoteReport) -> None:
        if not self.remote.verifies:
            return
        key = self.link.key(self.remote)
        if key is None:
            return
        try:
            verdicts = verify.check(
                self.remote,
                key,
                paths,
                self.link.spool,
                account=self.link.account,
                env=self.link.copy_env(self.remote),
            )
        except CommandError as e:
            why = f"{self.remote.url}: delivered, but reading the signatures back failed ({e})"
            if classify(e.stderr or str(e)) is Outcome.UNREACHABLE:
                raise UnreachableError(why) from None
            raise RemoteConfigError(f"{why}; `nixspool verify` checks again") from None
        report.unverified += len(verdicts.bad)
        report.resigned += len(verdicts.resigned)

    def account_for(self, report: RemoteReport) -> None:
        pass


class CacheWriter:
    """A binary cache nixspool writes (static_cache.py): its closure less what its
    upstream caches serve, references first, signed here with the key only this
    process reads, where the spool recorded the paths."""

    def __init__(self, remote: Remote, link: Link, *, accept_new_host_keys: bool) -> None:
        self.remote = remote
        self.link = link
        self.accept_new_host_keys = accept_new_host_keys
        # Over the whole flush (retries write nothing twice): closure paths left to
        # upstream, paths written, compressed bytes written.
        self.left_to_upstream: set[str] = set()
        self.uploaded: set[str] = set()
        self.uploaded_bytes = 0
        self.wants_closures = True  # they are what it writes
        self._closures: Mapping[str, nix.PathInfo] = {}
        self._writer: Running | None = None  # started by begin(), for the first copy

    def begin(self) -> None:
        if self._writer is None:
            with contextlib.suppress(CommandError):  # copy() tries again, and says why
                self._writer = self._start_writer()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.kill()
            self._writer = None

    def _start_writer(self) -> Running:
        return static_cache.start_writer(
            self.remote,
            self.link.account,
            accept_new_host_keys=self.accept_new_host_keys,
            store_dir=storepath.store_dir(),
        )

    def prepare(self, paths: list[str], closures: Mapping[str, nix.PathInfo]) -> None:
        self._closures = closures  # its narinfo files carry the signatures

    def delivered(self, paths: list[str], report: RemoteReport) -> None:
        pass  # it wrote each narinfo, signature and all

    def account_for(self, report: RemoteReport) -> None:
        report.left_to_upstream = len(self.left_to_upstream)
        report.uploaded = len(self.uploaded)
        report.uploaded_bytes = self.uploaded_bytes

    def _closure(self, paths: list[str]) -> list[nix.PathInfo]:
        """What the cache receives for `paths`, references first. CommandError (the
        rows' own reason) if a path is gone from the local store."""
        infos = known_closures(paths, self._closures) or local_path_infos(
            self.remote, paths, recursive=True
        )
        gone = [p for p in paths if p not in infos]
        if gone:
            raise CommandError(f"{gone[0]} is not valid in the local store")
        upload, left = filters.cache_closure(self.remote, paths, infos)
        self.left_to_upstream.update(left)
        return [infos[p] for p in narinfo.references_first(upload, infos)]

    def copy(self, paths: list[str], started: Callable[[], None]) -> None:
        remote = self.remote
        infos = self._closure(paths)
        key = self.link.key(remote)
        ours = self.link.spool.queue.recorded(i.path for i in infos) if key else set()
        entries = [
            narinfo.Entry.of(
                info,
                sign.signatures_with_ours(key, info)
                if key and info.path in ours
                else info.signatures,
            )
            for info in infos
        ]
        writer, self._writer = self._writer, None  # begin()'s, logged in by now
        running = self.link.start_copy(
            remote,
            lambda: static_cache.send(writer or self._start_writer(), entries, sorted(ours)),
        )
        started()
        try:
            result = static_cache.result_of(running)
        except CommandError as e:
            if e.timed_out:
                raise past_copy_timeout(self.link, remote) from None
            log.debug("%s: the cache writer said:\n%s", remote.name, e.stderr)
            raise RuntimeError(f"the cache writer failed: {e}") from None
        self.uploaded.update(result.uploaded)
        self.uploaded_bytes += result.bytes
        log.debug("%s: which paths are there: %s", remote.name, result.looked_up)
        if result.present:
            log.info("%s: %d paths were in the cache already", remote.name, len(result.present))
        if result.signed:
            log.info("%s: our signature added to %d of them", remote.name, len(result.signed))
        for note in result.notes:
            log.warning("%s: %s", remote.name, note)
        if result.error is None:
            return
        kind, message = result.error["kind"], f"{remote.url}: {result.error['message']}"
        if kind == Kind.AWAY:  # the endpoint did not answer a connect
            raise UnreachableError(message)
        if kind == Kind.LOGIN:  # as the probe would have said
            if result.error.get("verdict") == Verdict.UNREACHABLE:
                raise UnreachableError(message)
            raise RemoteConfigError(message)
        if kind == Kind.LINK:
            self.link.check_reachable(remote)  # away now: UnreachableError; back: try again
            raise Transient(result.error["message"])
        if kind == Kind.WRITE:
            raise Transient(result.error["message"])
        if kind == Kind.PATH:  # the rows' own reason: the loop finds which
            raise CommandError(message, stderr=result.error["message"])
        if kind == Kind.LOCAL:  # not the remote's doing: rows untouched, a person looks
            raise LocalError(result.error["message"])
        raise RemoteFailed(result.error["message"])  # Kind.CACHE
