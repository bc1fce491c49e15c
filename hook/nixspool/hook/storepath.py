"""Which strings may enter the spool: absolute paths directly in the Nix store.

Standard library only: the post-build-hook imports this on every build.

A row in the spool is a request to sign and upload, so the check is strict:
`<store dir>/<32-char nix-base32 hash>-<name>` and nothing else. Anything that
fails is not an error of the hook but a *rejection*, kept with its reason so
that `nixspool status` can show it.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:  # collections.abc costs the hook ~0.15 of an interpreter start
    from collections.abc import Iterable

DEFAULT_STORE_DIR = "/nix/store"

# Nix's base-32 alphabet (no e, o, u, t) and the characters Nix allows in a
# store path name (see nix/src/libstore/path.cc, checkName).
NIX_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"
_HASH_CHARS = frozenset(NIX_BASE32)
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-._?=")
_HASH_LEN = 32
_MAX_NAME_LEN = 211

# At most this many rejections are kept per hook run, plus one line that
# counts the rest: a malicious or broken OUT_PATHS must not flood the spool.
MAX_REJECTS_PER_RUN = 20
# Shown values are cut to this length; the reason matters, not 128 KiB of junk.
MAX_SHOWN_VALUE = 300


def nix_base32(data: bytes) -> str:
    """Nix's base-32 (not RFC 4648): the alphabet above, least significant first."""
    length = (len(data) * 8 - 1) // 5 + 1
    out = []
    for n in range(length - 1, -1, -1):
        bit = n * 5
        i, j = divmod(bit, 8)
        c = data[i] >> j
        if i + 1 < len(data):
            c |= data[i + 1] << (8 - j)
        out.append(NIX_BASE32[c & 0x1F])
    return "".join(out)


def store_dir(environ: dict[str, str] | os._Environ[str] | None = None) -> str:
    """The store directory, honouring NIX_STORE_DIR like Nix does."""
    env = os.environ if environ is None else environ
    value = env.get("NIX_STORE_DIR") or DEFAULT_STORE_DIR
    return value.rstrip("/") or "/"


def why_invalid(path: str, store: str) -> str | None:
    """The reason `path` is not a store path directly in `store`, or None."""
    if not path:
        return "empty path"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        return "contains control characters"
    if any("\udc80" <= c <= "\udcff" for c in path):
        return "is not valid UTF-8"
    if not path.startswith("/"):
        return "is not an absolute path"
    parent, _, base = path.rpartition("/")
    if parent != store:
        return f"is not directly in the Nix store {store}"
    if base in ("", ".", ".."):
        return "has no store path name"
    hash_part, dash, name = base.partition("-")
    if not dash or len(hash_part) != _HASH_LEN or not set(hash_part) <= _HASH_CHARS:
        return "does not start with a 32-character Nix hash"
    if not name or len(name) > _MAX_NAME_LEN or not set(name) <= _NAME_CHARS:
        return "has an invalid store path name"
    if name.startswith("."):
        return "has an invalid store path name"
    return None


def why_not_derivation(path: str, store: str) -> str | None:
    """The reason `path` is not a derivation (.drv) directly in `store`, or None."""
    reason = why_invalid(path, store)
    if reason is None and not path.endswith(".drv"):
        reason = "is not a derivation (.drv)"
    return reason


def shown(value: str) -> str:
    """`value` made safe for one line of a table or log: escaped and cut."""
    text = value.encode("utf-8", "surrogateescape").decode("ascii", "backslashreplace")
    text = "".join(c if 0x20 <= ord(c) < 0x7F else repr(c)[1:-1] for c in text)
    if len(text) > MAX_SHOWN_VALUE:
        text = text[:MAX_SHOWN_VALUE] + f"... ({len(value)} characters)"
    return text


def partition(values: Iterable[str], store: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Valid store paths (in order, without duplicates) and rejections.

    Rejections are `(shown value, reason)` pairs, at most MAX_REJECTS_PER_RUN
    of them plus a summary of the rest, so a huge input costs linear time and
    bounded space. Empty values are skipped.
    """
    valid: dict[str, None] = {}
    rejects: list[tuple[str, str]] = []
    unshown = 0
    for token in values:
        if not token:
            continue
        reason = why_invalid(token, store)
        if reason is None:
            valid[token] = None
        elif len(rejects) < MAX_REJECTS_PER_RUN:
            rejects.append((shown(token), reason))
        else:
            unshown += 1
    if unshown:
        rejects.append((f"({unshown} more values)", "also rejected; not shown"))
    return list(valid), rejects
