"""Delivered means there: which delivered paths a remote still has.

Caches forget: a Nix store on a Pi is garbage-collected, a disk is replaced, a
static cache directory is pruned. Once a row is delivered nothing else looks
again, so `nixspool verify`, and a flush once per `reconcile_interval`, ask the
remote what it holds of them: one batched `nix path-info --store` for a Nix
store or a binary cache Nix reads, one listing of the directory for a cache
nixspool writes (sftp://, file:// with skip_signed_by). What it lost goes back
to `queued`; a path this machine has lost too fails, with that reason.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from . import narinfo, nix, static_cache
from .config import Remote
from .errors import CommandError
from .run import Account
from .spool import Spool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reconciled:
    checked: int
    requeued: int  # gone from the remote: queued again
    failed: list[str]  # gone from the remote and from this machine: their rows failed


def still_there(
    remote: Remote,
    paths: Sequence[str],
    *,
    account: Account,
    env: Mapping[str, str],
    accept_new_host_keys: bool,
) -> set[str]:
    """The ones of `paths` the remote holds, asked as `account`. CommandError if it
    cannot be asked (the caller tells "away" apart)."""
    if not paths:
        return set()
    if remote.nixspool_writes:
        result = static_cache.read_cache(remote, account, accept_new_host_keys=accept_new_host_keys)
        if result.error is not None:
            raise CommandError(f"{remote.url}: {result.error['message']}")
        hashes = set(result.narinfo_hashes)
        return {p for p in paths if narinfo.hash_part(p) in hashes}
    infos = nix.path_infos(
        list(paths), store=remote.url, env=env, account=account, timeout=remote.copy_timeout
    )
    return set(infos) & set(paths)


def reconcile(
    remote: Remote,
    spool: Spool,
    *,
    account: Account,
    env: Mapping[str, str],
    accept_new_host_keys: bool,
    delivered: Sequence[str] | None = None,
) -> Reconciled:
    """Queue again what `remote` lost of its delivered paths (see the module);
    `delivered`: those paths, when the caller has read them already."""
    if delivered is None:
        delivered = spool.queue.delivered_paths(remote.name)
    there = still_there(
        remote, delivered, account=account, env=env, accept_new_host_keys=accept_new_host_keys
    )
    gone = [p for p in delivered if p not in there]
    invalid_here = nix.invalid_paths(gone) if gone else set()
    gone_here = [p for p in gone if p in invalid_here]
    requeued, failed = spool.remotes.reconciled(
        remote.name, [p for p in gone if p not in invalid_here], gone_here
    )
    if requeued or failed:
        log.warning(
            "%s: %d of %d delivered paths are gone from it: %d queued again, %d failed "
            "(gone from this machine too)",
            remote.name,
            len(gone),
            len(delivered),
            requeued,
            failed,
        )
    return Reconciled(len(delivered), requeued, gone_here if failed else [])
