"""Which recorded paths a remote takes: its `include`, `exclude` and `max_size`.

Filters choose among the paths the spool holds (recorded by the hook, or added
with `nixspool add`), never inside a closure: `nix copy` to a Nix store copies
each chosen path with everything it refers to, because a store must hold whole
closures. A dependency whose name is excluded still goes when a path that needs
it goes; `max_size` therefore weighs a path's whole closure, which is what the
remote may have to receive (less what it already holds).

A path left out becomes a `skipped` row with the reason; it is never silent.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping

from .config import ByteSize, Remote
from .nix import PathInfo

HASH_LENGTH = 32  # the nix-base32 hash before the name: /nix/store/<hash>-<name>


def name_of(path: str) -> str:
    """The name part of a store path: `hello-2.12.1` of /nix/store/<hash>-hello-2.12.1."""
    return path.rsplit("/", 1)[-1][HASH_LENGTH + 1 :]


def why_name_left_out(remote: Remote, path: str) -> str | None:
    """The reason `remote`'s patterns leave `path` out, or None if they take it."""
    name = name_of(path)
    for pattern in remote.exclude:
        if fnmatch.fnmatchcase(name, pattern):
            return f"left out by {remote.name}'s exclude pattern {pattern!r}"
    if remote.include and not any(fnmatch.fnmatchcase(name, p) for p in remote.include):
        return f"left out: matches none of {remote.name}'s include patterns"
    return None


def closure_sizes(roots: Iterable[str], infos: Mapping[str, PathInfo]) -> dict[str, int]:
    """{root: NAR size of its closure}, from path infos that cover the closures."""
    sizes: dict[str, int] = {}
    for root in roots:
        seen, todo = {root}, [root]
        while todo:
            for ref in infos[todo.pop()].references:
                if ref not in seen:
                    seen.add(ref)
                    todo.append(ref)
        sizes[root] = sum(infos[p].nar_size for p in seen)
    return sizes


def why_too_big(remote: Remote, closure_size: int) -> str | None:
    if remote.max_size is not None and closure_size > remote.max_size:
        return (
            f"left out: its closure is {ByteSize(closure_size)}, over {remote.name}'s "
            f"max_size of {remote.max_size}"
        )
    return None
