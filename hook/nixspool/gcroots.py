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
import hashlib
import logging
import os
from collections.abc import Iterable

log = logging.getLogger(__name__)


def roots_dir(spool: str, environ: dict[str, str] | None = None) -> str:
    """This spool's own directory of roots: two spools never touch each other's."""
    env = os.environ if environ is None else environ
    state = env.get("NIX_STATE_DIR", "/nix/var/nix")
    spool_id = hashlib.sha256(os.path.abspath(spool).encode()).hexdigest()[:16]
    return os.path.join(state, "gcroots", "nixspool", spool_id)


def sync(spool: str, wanted: Iterable[str], directory: str | None = None) -> tuple[int, int]:
    """Make this spool's roots exactly `wanted`; return (added, removed).

    Best effort: without the right to write there (a flusher started as the
    user before `nixspool setup` made the directory theirs) it warns and goes
    on; delivery does not depend on it.
    """
    directory = directory or roots_dir(spool)
    want = {os.path.basename(p): p for p in wanted}
    added = removed = 0
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
        have = set(os.listdir(directory))
        for name in have - want.keys():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))
                removed += 1
        for name in want.keys() - have:
            with contextlib.suppress(FileExistsError):
                os.symlink(want[name], os.path.join(directory, name))
                added += 1
    except OSError as e:
        log.warning(
            "cannot keep GC roots in %s: %s; queued paths are not protected from "
            "garbage collection (see README#gc-roots)",
            directory,
            e.strerror,
        )
    return added, removed
