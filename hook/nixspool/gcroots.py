"""Keep queued paths alive until they are delivered.

A path queued on an offline laptop may wait days for the cache host, and
`nix-collect-garbage` in the meantime would delete it. nixspool keeps a
symlink per queued path in a directory under Nix's gcroots; the garbage
collector treats every symlink there that points into the store as a root.
Roots are added at the start of every flush (the hook does nothing it can
leave to later) and removed once no remote still waits for the path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

log = logging.getLogger(__name__)


def roots_dir(environ: dict[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    state = env.get("NIX_STATE_DIR", "/nix/var/nix")
    return os.path.join(state, "gcroots", "nixspool")


def sync(wanted: Iterable[str], directory: str | None = None) -> tuple[int, int]:
    """Make the roots exactly `wanted`; return (added, removed).

    Best effort: without the right to write there (a flusher started as the
    user before `nixspool setup` made the directory theirs) it logs once and
    leaves things as they are; delivery does not depend on it.
    """
    directory = directory or roots_dir()
    want = {os.path.basename(p): p for p in wanted}
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
        have = set(os.listdir(directory))
    except OSError as e:
        log.warning(
            "cannot keep GC roots in %s: %s; queued paths are not protected from "
            "garbage collection (run nixspool as root, or see README#gc-roots)",
            directory,
            e.strerror,
        )
        return 0, 0
    added = removed = 0
    for name in have - want.keys():
        try:
            os.unlink(os.path.join(directory, name))
            removed += 1
        except FileNotFoundError:
            pass
    for name in want.keys() - have:
        try:
            os.symlink(want[name], os.path.join(directory, name))
            added += 1
        except FileExistsError:
            pass
    return added, removed
