"""Opening files in a directory someone else owns, as root, safely.

Standard library only (the hook imports it).

The spool's directory belongs to the configured user, and the hook and the
flusher run as root. Whatever that user left at a name there (a symbolic link
to /etc/shadow, a FIFO, a directory) must not make root write through it, nor
block a build on it, nor crash a command. So every file nixspool opens beside
the spool goes through `open_regular`: no links followed, an open that cannot
block, and a check that what it got is a plain file. Files root creates there
go to the directory's owner, so the user's own `nixspool` can use them.
"""

from __future__ import annotations

import errno
import os
import stat

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a device"),
    (stat.S_ISBLK, "a device"),
)


class NotRegularFile(OSError):
    """Something other than a plain file sits where nixspool keeps one."""


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _refuse(path: str, mode: int) -> NotRegularFile:
    return NotRegularFile(
        f"{path} is {_kind(mode)}, not a regular file; nixspool will not use it "
        "(move it aside; see README#ownership)"
    )


def why_spool_unsafe(path: str, trusted_uids: set[int] | None) -> str | None:
    """The spool rule, for the spool file and its directory alike; the hook, every
    `nixspool` command and `doctor` apply this one: a row is a request to sign and
    upload, so only trusted users may be able to write one.

    Safe: not a symbolic link, not writable by group or others, and owned by a
    trusted uid (root, the configured user, whoever runs this; None: the caller
    cannot know the configured user, as the hook, which checks the mode only).
    Returns None if safe or absent, else what is wrong and the command that fixes it.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    kind = "directory" if stat.S_ISDIR(st.st_mode) else "file"
    if stat.S_ISLNK(st.st_mode):
        return f"spool {kind} {path} is a symbolic link; point 'spool' at the real file"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        mode = "0700" if kind == "directory" else "0600"
        return (
            f"spool {kind} {path} is writable by group or others: anyone could queue "
            f"uploads; run 'chmod {mode} {path}' (see README#ownership)"
        )
    if trusted_uids is not None and st.st_uid not in trusted_uids:
        directory = path if kind == "directory" else os.path.dirname(path)
        return (
            f"spool {kind} {path} belongs to uid {st.st_uid}, whom nixspool does not "
            f"trust (root or the config's 'user'); set 'user' to its owner, or run "
            f"'chown -R root {directory}' (see README#ownership)"
        )
    return None


def check_regular(path: str) -> None:
    """Raise NotRegularFile if `path` exists and is not a plain file (links included)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(path, st.st_mode)


def check_database(path: str) -> None:
    """check_regular() for an SQLite database and the -wal and -shm files SQLite
    opens beside it: SQLite follows links and blocks on a FIFO, so whatever else
    stands at these names must be refused before SQLite opens them."""
    for name in (path, path + "-wal", path + "-shm"):
        check_regular(name)


def open_regular(path: str, flags: int, mode: int = 0o600) -> int:
    """os.open(), refusing links and anything but a plain file, never blocking.

    O_NOFOLLOW: a link at `path` fails instead of being followed. O_NONBLOCK:
    opening a FIFO returns at once instead of waiting for its other end. Then
    fstat() on what was opened (not on the name, which may change meanwhile).
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as e:
        # A link, a FIFO nobody reads (for writing), a directory (for writing).
        if e.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            try:
                st = os.lstat(path)
            except OSError:
                raise e from None
            raise _refuse(path, st.st_mode) from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise _refuse(path, st.st_mode)
    return fd


def give_to_directory_owner(fd: int, directory: str) -> None:
    """As root, give an open file to the owner of the directory it is in.

    The spool's owner runs `nixspool` too: a root-only file beside the spool
    would lock them out. SQLite does the same for its -wal and -shm files.
    """
    if os.geteuid() != 0:
        return
    owner = os.lstat(directory)
    held = os.fstat(fd)
    if (held.st_uid, held.st_gid) != (owner.st_uid, owner.st_gid):
        os.fchown(fd, owner.st_uid, owner.st_gid)
