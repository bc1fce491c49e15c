"""Keep queued paths alive until they are delivered.

A path queued on an offline laptop may wait days for the cache host, and
`nix-collect-garbage` in the meantime would delete it. nixspool keeps a
symlink per queued path in a directory of its own under Nix's gcroots; the
garbage collector treats every symlink there that points into the store as a
root. The roots are brought up to date at the end of every flush: paths
still queued get one, delivered or dropped ones lose theirs.

The roots are also the spool's backup of what was queued at the last flush.
Beside them, a link named SPOOL_ID_NAME holds the id of the spool they were
made for (`Spool.spool_id`). A flush that finds roots made for another id
knows the spool was deleted, emptied or set aside as broken since, and queues
their paths again (`left_by_another_spool`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
from collections.abc import Iterable, Mapping

log = logging.getLogger(__name__)

# Not a store path's name (those start with a hash): Nix's collector ignores it,
# and so do sync's add and remove. A link, so that reading it is one readlink.
SPOOL_ID_NAME = ".spool-id"


def base_dir(environ: Mapping[str, str] | None = None) -> str:
    """nixspool's directory in Nix's gcroots, holding one directory per spool."""
    env = os.environ if environ is None else environ
    return os.path.join(env.get("NIX_STATE_DIR", "/nix/var/nix"), "gcroots", "nixspool")


def roots_dir(spool: str, environ: Mapping[str, str] | None = None) -> str:
    """This spool's own directory of roots: two spools never touch each other's."""
    spool_id = hashlib.sha256(os.path.abspath(spool).encode()).hexdigest()[:16]
    return os.path.join(base_dir(environ), spool_id)


def _open_directory(directory: str) -> int:
    """A descriptor of `directory`, made if missing, without following a link in
    the part nixspool owns (below gcroots/): that part may belong to the spool's
    user, who must not be able to point root's unlink and symlink elsewhere."""
    gcroots_dir = os.path.dirname(os.path.dirname(directory))  # <state>/gcroots: Nix's
    os.makedirs(gcroots_dir, mode=0o755, exist_ok=True)
    fd = os.open(gcroots_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in os.path.relpath(directory, gcroots_dir).split(os.sep):
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def sync(
    spool: str, wanted: Iterable[str], directory: str | None = None, spool_id: str | None = None
) -> tuple[int, int]:
    """Make this spool's roots exactly `wanted`, made for `spool_id`; return (added,
    removed).

    Best effort: without the right to write there (a flusher started as the
    user before `nixspool setup` made the directory theirs), or where a link
    stands in for one of its directories, it warns and goes on; delivery does
    not depend on it. Every change is made through a descriptor of the
    directory: names in it are never resolved through links.
    """
    directory = directory or roots_dir(spool)
    want = {os.path.basename(p): p for p in wanted}
    added = removed = 0
    try:
        fd = _open_directory(directory)
        try:
            have = {name for name in os.listdir(fd) if not name.startswith(".")}
            for name in have - want.keys():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=fd)
                    removed += 1
            for name in want.keys() - have:
                with contextlib.suppress(FileExistsError):
                    os.symlink(want[name], name, dir_fd=fd)
                    added += 1
            if spool_id is not None:  # last: the roots are complete for this spool now
                _replace_link(fd, SPOOL_ID_NAME, spool_id)
        finally:
            os.close(fd)
    except OSError as e:
        reason = (
            "a symbolic link stands where a directory should be"
            if e.errno in (errno.ELOOP, errno.ENOTDIR)
            else e.strerror
        )
        log.warning(
            "cannot keep GC roots in %s: %s; queued paths are not protected from "
            "garbage collection (see man nixspool: GC roots)",
            directory,
            reason,
        )
    return added, removed


def _replace_link(fd: int, name: str, target: str) -> None:
    """Point the link `name` in the directory `fd` at `target`, atomically."""
    temporary = f"{name}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary, dir_fd=fd)
    os.symlink(target, temporary, dir_fd=fd)
    os.rename(temporary, name, src_dir_fd=fd, dst_dir_fd=fd)


def left_by_another_spool(spool: str, spool_id: str, directory: str | None = None) -> list[str]:
    """The paths rooted when the roots were last made for a spool other than
    `spool_id` at this path; [] when they were made for this one, or never
    marked (roots from before spool ids, or none yet): those are this spool's."""
    try:
        fd = _open_directory(directory or roots_dir(spool))  # as sync opens it: no links
    except OSError:
        return []  # none we may read: nothing to recover
    try:
        try:
            made_for = os.readlink(SPOOL_ID_NAME, dir_fd=fd)
        except OSError:
            return []
        if made_for == spool_id:
            return []
        targets = []
        for name in os.listdir(fd):
            if not name.startswith("."):
                with contextlib.suppress(OSError):
                    targets.append(os.readlink(name, dir_fd=fd))
        return targets
    finally:
        os.close(fd)
