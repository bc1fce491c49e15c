"""Keep queued paths alive until they are delivered.

A path queued on an offline laptop may wait days for the cache host, and
`nix-collect-garbage` in the meantime would delete it. nixspool keeps a
symlink per queued path in a directory of its own under Nix's gcroots; the
garbage collector treats every symlink there that points into the store as a
root. The roots are brought up to date at the end of every flush: paths
still queued get one, delivered or dropped ones lose theirs.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
from collections.abc import Iterable, Mapping

log = logging.getLogger(__name__)


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


def sync(spool: str, wanted: Iterable[str], directory: str | None = None) -> tuple[int, int]:
    """Make this spool's roots exactly `wanted`; return (added, removed).

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
            have = set(os.listdir(fd))
            for name in have - want.keys():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=fd)
                    removed += 1
            for name in want.keys() - have:
                with contextlib.suppress(FileExistsError):
                    os.symlink(want[name], name, dir_fd=fd)
                    added += 1
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
            "garbage collection (see README#gc-roots)",
            directory,
            reason,
        )
    return added, removed
