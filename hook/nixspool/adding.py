"""`nixspool add`: what the user names, as valid store paths of the local store.

A name is a store path, or a link to one (`./result`, a GC root): links are
followed one at a time until a store path, never into one, because a store
path may itself be a link to another. A path inside a store path is refused
rather than silently widened to the whole store path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from . import nix
from .errors import CommandError, NixOutputError, UsageError
from .hook import storepath

MAX_LINKS = 40  # as the kernel's ELOOP


def store_path_of(name: str, store_dir: str) -> str:
    """The store path `name` is or leads to; UsageError if none."""
    path = os.path.abspath(name)
    for _ in range(MAX_LINKS):
        if storepath.why_invalid(path, store_dir) is None:
            return path
        if not os.path.islink(path):
            break
        path = os.path.normpath(os.path.join(os.path.dirname(path), os.readlink(path)))
    if path.startswith(store_dir + "/"):
        top = "/".join(path.split("/")[: store_dir.count("/") + 2])
        raise UsageError(f"{name}: {path} is inside the store path {top}; name that instead")
    if not os.path.lexists(name):
        raise UsageError(f"{name}: no such file or store path")
    raise UsageError(f"{name}: not a store path, nor a link to one ({path})")


def store_paths(names: Sequence[str], *, closure: bool = False) -> list[str]:
    """The valid store paths `names` lead to (and their closures), sorted."""
    store_dir = storepath.store_dir()
    paths = sorted({store_path_of(name, store_dir) for name in names})
    try:
        invalid = nix.invalid_paths(paths)
        if invalid:
            raise UsageError(f"not valid in the local store: {', '.join(sorted(invalid))}")
        if closure:
            paths = sorted(nix.path_infos(paths, recursive=True))
    except (CommandError, NixOutputError) as e:
        raise UsageError(f"cannot ask the local Nix about these paths: {e}") from None
    return paths
