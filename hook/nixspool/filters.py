"""Which recorded paths a remote takes: its `include`, `exclude` and `max_size`;
and for a binary cache, which paths of their closures it leaves to upstream
(`skip_signed_by`).

Filters choose among the paths the spool holds (recorded by the hook, or added
with `nixspool add`), never inside a closure: `nix copy` to a Nix store copies
each chosen path with everything it refers to, because a store must hold whole
closures. A dependency whose name is excluded still goes when a path that needs
it goes; `max_size` therefore weighs a path's whole closure, which is what the
remote may have to receive (less what it already holds).

A binary cache (sftp://, file://) may hold part of a closure: a path signed by
a key in its `skip_signed_by` (cache.nixos.org-1) is left to the cache that
signed it, whether it is a recorded path (then a `skipped` row) or a
dependency (counted per flush: `left_to_upstream`).

A path left out becomes a `skipped` row with the reason; it is never silent.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping

from . import nix
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


def upstream_key(remote: Remote, info: PathInfo) -> str | None:
    """The name of a key in `remote`'s skip_signed_by that signed this path, if any.
    Signatures are not checked here: only trusted users (and the daemon, when it
    substitutes from a cache whose key it trusts) add them to the local store."""
    for signature in info.signatures:
        name = signature.split(":", 1)[0]
        if name in remote.skip_signed_by:
            return name
    return None


def why_left_to_upstream(remote: Remote, info: PathInfo) -> str | None:
    key = upstream_key(remote, info)
    return f"left to upstream: signed by {key}, whose cache serves it" if key else None


def cache_closure(
    remote: Remote, roots: Iterable[str], infos: Mapping[str, PathInfo]
) -> tuple[set[str], set[str]]:
    """(paths to write, paths left to upstream) of the roots' closures, for a binary
    cache: unlike a Nix store it may hold part of a closure, the rest coming from
    the upstream caches its users also substitute from."""
    closure = nix.closure(roots, infos)
    left = {p for p in closure if upstream_key(remote, infos[p]) is not None}
    return closure - left, left
