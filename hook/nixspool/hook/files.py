"""Working, as root, in a directory someone else owns.

Standard library only (the hook imports it).

The spool's directory may belong to the configured user, and the hook and the
flusher run as root. Whatever that user (or a fault) left at a name there (a
symbolic link to /etc/shadow, a hard link to it, a FIFO, a directory) must not
make root write, truncate, chown or chmod anything outside the spool, nor block
a build, nor crash a command. Two rules make that true by construction:

- Root works in a directory it does not own with its owner's rights, never its
  own (`drop_to_owner` in the hook, for good; `OwnersRights` in commands, for
  the moments they open files there). SQLite follows links and opens -wal and
  -shm by name, and no check before its open can close the race with a planted
  link; but whatever it opens then, the owner could have opened anyway.
- A directory root does own is used with root's rights only if every directory
  above it is root's and not writable by others (`why_ancestors_unsafe`):
  nobody else can then swap it for a link.

On top, every file nixspool itself opens there goes through `open_regular`: no
link followed, no hard link accepted, an open that cannot block on a FIFO, and
a check that what it got is a plain file.
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


def open_to_others(mode: int) -> bool:
    """Group or others may read, write or run it: a secret key (a signing key, an
    ssh key) must not be, as ssh itself refuses a private key that is."""
    return bool(mode & (stat.S_IRWXG | stat.S_IRWXO))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _refuse(path: str, mode: int) -> NotRegularFile:
    return NotRegularFile(
        f"{path} is {_kind(mode)}, not a regular file; nixspool will not use it "
        "(move it aside; see man nixspool: Ownership)"
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
            f"uploads; run 'chmod {mode} {path}' (see man nixspool: Ownership)"
        )
    if trusted_uids is not None and st.st_uid not in trusted_uids:
        directory = path if kind == "directory" else os.path.dirname(path)
        return (
            f"spool {kind} {path} belongs to uid {st.st_uid}, whom nixspool does not "
            f"trust (root or the config's 'user'); set 'user' to its owner, or run "
            f"'chown -R root {directory}' (see man nixspool: Ownership)"
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
    fstat() on what was opened (not on the name, which may change meanwhile):
    a plain file with no other name (a hard link to /etc/shadow is a plain file).
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
    if st.st_nlink > 1:  # the same file under another name, maybe one root must not touch
        os.close(fd)
        raise NotRegularFile(
            f"{path} has {st.st_nlink} hard links; nixspool will not use it "
            "(move it aside; see man nixspool: Ownership)"
        )
    return fd


def open_directory(directory: str) -> int:
    """A descriptor of the directory itself, never of what a link there points at."""
    try:
        return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        raise NotRegularFile(
            f"{directory} is {_kind(os.lstat(directory).st_mode)}, not a directory; "
            "nixspool will not use it (see man nixspool: Ownership)"
        ) from None


def directory_owner(directory: str) -> tuple[int, int] | None:
    """(uid, gid) of the directory, or None if there is none yet."""
    try:
        fd = open_directory(directory)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return st.st_uid, st.st_gid


def why_ancestors_unsafe(directory: str) -> str | None:
    """Why root may not use its own rights in `directory`, or None.

    Each existing component of the path, the directory included, must be root's
    (a link too: only root could have made it), and a directory among them not
    writable by group or others, unless sticky as /tmp is (there, nobody can
    rename or remove what root made). Otherwise whoever can write there could
    swap the spool's directory for a link to one of their choosing while root
    works in it.
    """
    path = "/"
    for part in ["", *os.path.abspath(directory).strip("/").split("/")]:
        path = os.path.join(path, part)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None  # root creates the rest
        if st.st_uid != 0:
            return (
                f"{path} belongs to uid {st.st_uid}, who could swap the spool's directory "
                f"{directory} for a link; give it to root, or the spool's directory to "
                "the config's 'user' (see man nixspool: Ownership)"
            )
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if stat.S_ISDIR(st.st_mode) and writable and not st.st_mode & stat.S_ISVTX:
            return (
                f"{path} is writable by group or others, who could swap the spool's "
                f"directory {directory} for a link; run 'chmod go-w {path}' "
                "(see man nixspool: Ownership)"
            )
    return None


def rights_to_use(directory: str) -> tuple[int, int] | None:
    """As root: the (uid, gid) whose rights root must use in `directory` (its
    owner's), or None where root may use its own: nobody else owns the directory
    or can swap it (PermissionError if somebody could)."""
    if os.geteuid() != 0:
        return None
    owner = directory_owner(directory)
    if owner is not None and owner[0] != 0:
        reason = why_unreachable(directory, *owner)
        if reason is not None:
            raise PermissionError(reason)
        return owner
    reason = why_ancestors_unsafe(directory)
    if reason is not None:
        raise PermissionError(reason)
    return None


def why_unreachable(directory: str, uid: int, gid: int) -> str | None:
    """Why the directory's owner cannot get to it (root, acting as them, would then
    fail where it used to pass), or None. Each directory above must let them search it."""
    import pwd  # a C module, and only on this path

    try:
        groups = set(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    except KeyError:
        groups = {gid}
    path = os.path.dirname(os.path.abspath(directory))
    while True:
        st = os.stat(path)
        if st.st_uid == uid:
            allowed = st.st_mode & stat.S_IXUSR
        elif st.st_gid in groups:
            allowed = st.st_mode & stat.S_IXGRP
        else:
            allowed = st.st_mode & stat.S_IXOTH
        if not allowed:
            return (
                f"{path} does not let uid {uid}, who owns the spool's directory {directory}, "
                "through; move the spool, or let them reach it (see man nixspool: Ownership)"
            )
        if path == "/":
            return None
        path = os.path.dirname(path)


def drop_to_owner(directory: str) -> None:
    """Become, for the rest of this process, whom `rights_to_use` names. For the
    hook, which works in the spool's directory only."""
    owner = rights_to_use(directory)
    if owner is not None:
        uid, gid = owner
        os.setgroups([gid])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)


class OwnersRights:
    """`with OwnersRights(files.rights_to_use(directory)):` act with those rights
    (effective uid, gid and groups), and get root's back after; None: as now.

    For commands, which work in the spool's directory and elsewhere as root: the
    spool's files are opened inside, and SQLite keeps them open. Effective ids
    are the whole process's, so this is for the main thread before any other
    starts.
    """

    def __init__(self, owner: tuple[int, int] | None) -> None:
        self.owner = owner
        self.saved: tuple[int, int, list[int]] | None = None

    def __enter__(self) -> None:
        if self.owner is None:
            return
        self.saved = (os.geteuid(), os.getegid(), os.getgroups())
        uid, gid = self.owner
        os.setgroups([gid])
        os.setegid(gid)
        os.seteuid(uid)

    def __exit__(self, *exc: object) -> None:
        if self.saved is None:
            return
        uid, gid, groups = self.saved
        self.saved = None
        os.seteuid(uid)
        os.setegid(gid)
        os.setgroups(groups)
