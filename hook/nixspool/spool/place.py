"""Where the spool lives: its directory and files, who owns them, and who may.

A row in the spool is a request to upload (and sign) a path, so the spool must
not be writable by anyone untrusted (docs/security.md#ownership): the directory
(0700) and the files (0600) belong to root or to the configured user, and root
works in a directory it does not own with its owner's rights only.
"""

from __future__ import annotations

import os
import pwd
import time
from dataclasses import dataclass

from ..errors import SpoolError
from ..hook import files
from ..hook.rows import BALLAST_SUFFIX

# What the hook may free to write its journal on a full disk.
BALLAST_BYTES = 1 << 20


@dataclass(frozen=True)
class Owner:
    """Who owns the spool's files."""

    uid: int
    gid: int
    name: str

    @classmethod
    def of_user(cls, name: str) -> Owner:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise SpoolError(f"user {name!r} (from the config's 'user') does not exist") from None
        return cls(entry.pw_uid, entry.pw_gid, name)


def trusted_uids(owner: Owner | None) -> set[int]:
    """Who may own the spool: root, whoever runs this, and the configured user."""
    return {0, os.geteuid()} | ({owner.uid} if owner else set())


def check_permissions(path: str, owner: Owner | None) -> None:
    """Refuse a spool (file or directory) that someone untrusted could write."""
    reason = files.why_spool_unsafe(path, trusted_uids(owner))
    if reason is not None:
        raise SpoolError(reason)


def check(path: str, owner: Owner | None) -> None:
    """Refuse a spool, or its directory, that someone untrusted could write, and a
    database that is not a plain file (SpoolError). PermissionError if this user
    cannot look."""
    try:
        check_permissions(os.path.dirname(path), owner)
        check_permissions(path, owner)
        files.check_database(path)
    except files.NotRegularFile as e:
        raise SpoolError(f"spool: {e}") from None


def prepare(path: str, owner: Owner | None) -> tuple[int, int] | None:
    """Refuse a spool someone untrusted could write; make its directory and give
    it, and the files beside it, to `owner`. The rights root is to use in the
    directory (files.rights_to_use): its owner's, or None for root's own."""
    directory = os.path.dirname(path)
    try:
        check(path, owner)
    except PermissionError:
        raise SpoolError(
            f"spool {path}: permission denied; run nixspool as root or as "
            "the spool's owner (see man nixspool: Ownership)"
        ) from None
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        _give_to(owner, directory, [path + suffix for suffix in OWN_SUFFIXES])
        return files.rights_to_use(directory)
    except (files.NotRegularFile, PermissionError) as e:
        raise SpoolError(f"spool: {e}") from None


def set_aside(path: str) -> str:
    """Rename the spool and its -wal and -shm out of the way; the new name."""
    kept = f"{path}.broken-{time.strftime('%Y%m%dT%H%M%S')}"
    for suffix in ("", "-wal", "-shm"):
        if os.path.lexists(path + suffix):
            os.rename(path + suffix, kept + suffix)
    return kept


# The files beside the spool that nixspool and SQLite keep (docs/security.md#ownership).
OWN_SUFFIXES = ("", "-wal", "-shm", BALLAST_SUFFIX, ".fallback.jsonl", ".flush.lock")


def _give_to(owner: Owner | None, directory: str, names: list[str]) -> None:
    """As root, give the spool's directory and files to the configured user: a
    root-only file there would lock them out of their own spool (files an older
    nixspool made as root, a directory root just made). Through descriptors
    opened without following links, and never a file with a second name (a hard
    link to /etc/shadow would pass for a plain file)."""
    if owner is None or os.geteuid() != 0:
        return
    for name, opener in [(directory, files.open_directory)] + [
        (name, lambda n: files.open_regular(n, os.O_RDONLY)) for name in names
    ]:
        try:
            fd = opener(name)
        except OSError:
            continue  # absent, or refused when it is used, with its reason
        try:
            st = os.fstat(fd)
            if (st.st_uid, st.st_gid) != (owner.uid, owner.gid):
                os.fchown(fd, owner.uid, owner.gid)
        finally:
            os.close(fd)


def keep_ballast(path: str) -> None:
    # Disk space the hook may free to write its journal on a full disk.
    ballast = path + BALLAST_SUFFIX
    if os.path.lexists(ballast):
        return
    try:
        fd = files.open_regular(ballast, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except OSError:
        return
    try:
        os.posix_fallocate(fd, 0, BALLAST_BYTES)
    except OSError:
        os.unlink(ballast)  # no room for it now; try again next time
    finally:
        os.close(fd)
