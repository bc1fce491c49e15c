"""The cache writer's files in a directory: SFTP sessions over the user's own
OpenSSH, or this machine's filesystem for a file:// cache, behind the same few
calls (DirectoryFiles, a cache_files.CacheFiles).

Each session is `ssh -s DESTINATION sftp` (probe.SshCommand: the options nix
copy gets), run as the user in the writer's process (started here rather than
through run.spawn: its ends are a socket paramiko reads, not pipes; the program
is found as spawn finds it), with paramiko's SFTP
client speaking the protocol over ssh's stdin and stdout. So an sftp:// cache
is reached exactly as `ssh` reaches it (ProxyJump, certificates, known_hosts
markers, ...), and a login that fails is told apart by the probe's own
classifier. Every read waits at most a bound: ConnectTimeout and the probe's
bound during the login, the stall bound after it (ssh's ServerAlive ends a
session whose link went away, which the writer then sees as its end).
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import select
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import IO, Any

from . import narinfo
from .cache_files import PARTIAL_MAX_AGE, Kind, Stop
from .errors import CommandError
from .narinfo import Entry
from .probe import ProbeResult, SshCommand, Verdict, classify_ssh
from .run import executable

PARTIAL_DIR = ".nixspool-partial"


class LoginFailed(Exception):
    """No SFTP session: the result says why, as the probe would."""

    def __init__(self, result: ProbeResult) -> None:
        super().__init__(result.message)
        self.result = result


class _Pipe:
    """ssh's stdin and stdout (one end of a socket pair), as the channel paramiko's
    SFTP client reads. Not a socket.socket: paramiko polls one of those without
    any bound, while this one's reads honour settimeout()."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def send(self, data: bytes) -> int:
        return self._sock.send(data)

    def recv(self, n: int) -> bytes:
        return self._sock.recv(n)

    def recv_ready(self) -> bool:
        return bool(select.select([self._sock], [], [], 0)[0])

    def settimeout(self, seconds: float | None) -> None:
        self._sock.settimeout(seconds)

    def gettimeout(self) -> float | None:
        return self._sock.gettimeout()

    def get_name(self) -> str:
        return "ssh"

    def close(self) -> None:
        self._sock.close()


class SshLink:
    """The ssh processes of one upload, one per SFTP session, over one login.

    The first session's ssh is a ControlMaster on a socket in a directory of the
    user's own; the others are channels of its connection (`ssh -S`): no key
    exchange or authentication of their own, which cost 0.25-0.4 s each here with
    four sessions logging in at once on two cores. A host that refuses another
    channel (sshd's MaxSessions) gets a login per session, as without it."""

    def __init__(self, ssh: SshCommand) -> None:
        self.ssh = ssh
        self._sessions: list[tuple[subprocess.Popen[bytes], Any]] = []
        self._lock = threading.Lock()
        self._first = threading.Lock()  # held while the master logs in
        self._control: str | None = None  # the master's socket, once it is up
        self._control_dir: str | None = None

    @property
    def stall_seconds(self) -> float:
        """How long an open session may go without an answer before it counts as
        gone (the link dropped)."""
        return max(5.0, 1.5 * self.ssh.connect_timeout)

    def is_active(self) -> bool:
        """Every ssh still runs: a failure while they do is the host's answer."""
        with self._lock:
            return all(proc.poll() is None for proc, _ in self._sessions)

    def open_session(self) -> Any:
        """A new SFTP session (paramiko.SFTPClient); LoginFailed if ssh does not get
        one, with the probe's verdict on what ssh said."""
        with self._first:
            if self._control is None and self._control_dir is None:
                self._control_dir = tempfile.mkdtemp(prefix="nixspool-ssh-")
                control = os.path.join(self._control_dir, "master")
                master = ("ControlMaster=yes", f"ControlPath={control}", "ControlPersist=no")
                client = self._session(master)
                self._control = control
                return client
        if self._control is not None:
            try:
                return self._session(("ControlMaster=no", f"ControlPath={self._control}"))
            except LoginFailed:
                pass  # no second channel here: a login of its own
        return self._session(("ControlMaster=no", "ControlPath=none"))

    def _session(self, options: tuple[str, ...]) -> Any:
        argv = self.ssh.subsystem("sftp", *(o for option in options for o in ("-o", option)))
        ours, theirs = socket.socketpair()
        with tempfile.TemporaryFile() as stderr:
            try:
                proc = subprocess.Popen(
                    [executable(argv[0], None), *argv[1:]],
                    stdin=theirs.fileno(),
                    stdout=theirs.fileno(),
                    stderr=stderr.fileno(),
                )
            except (OSError, CommandError) as e:
                ours.close()
                said = str(e) if isinstance(e, CommandError) else f"cannot run ssh: {e.strerror}"
                raise LoginFailed(ProbeResult(Verdict.ERROR, "error", said)) from None
            finally:
                theirs.close()
            import paramiko  # while ssh logs in: its import takes 0.1 s

            pipe = _Pipe(ours)
            pipe.settimeout(self.ssh.bound)
            try:
                client = paramiko.SFTPClient(pipe)
            except (OSError, EOFError, paramiko.SSHException):
                ours.close()
                raise LoginFailed(self._why_not(proc, stderr)) from None
        pipe.settimeout(self.stall_seconds)
        with self._lock:
            self._sessions.append((proc, client))
        return client

    def _why_not(self, proc: subprocess.Popen[bytes], stderr: Any) -> ProbeResult:
        try:
            proc.wait(timeout=self.ssh.bound)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return ProbeResult(
                Verdict.UNREACHABLE,
                "login",
                f"ssh did not open an SFTP session within {self.ssh.bound:g} s",
            )
        stderr.seek(0)
        result = classify_ssh(proc.returncode, stderr.read().decode(errors="replace"))
        if result.verdict is Verdict.OK:  # logged in, but nothing spoke SFTP
            return ProbeResult(
                Verdict.MISCONFIGURED,
                "sftp",
                f"ssh logged in, but no SFTP server answered (exit {proc.returncode}); "
                "is the sftp subsystem on?",
            )
        return result

    def close(self) -> None:
        """End every session: ssh sees its input end and exits; one that does not
        within the bound is killed."""
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for _, client in sessions:
            with contextlib.suppress(Exception):
                client.close()
        for proc, _ in reversed(sessions):  # the master, which waits for the rest, last
            try:
                proc.wait(timeout=self.ssh.connect_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._control_dir is not None:
            shutil.rmtree(self._control_dir, ignore_errors=True)


class LocalFiles:
    """The few SFTP calls the writer makes, on this machine's filesystem (file://)."""

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def listdir_attr(self, path: str) -> list[SimpleNamespace]:
        return [
            SimpleNamespace(filename=e.name, st_mtime=e.stat(follow_symlinks=False).st_mtime)
            for e in os.scandir(path)
        ]

    def open(self, path: str, mode: str = "r") -> IO[bytes]:
        if "w" not in mode:
            return open(path, "rb")
        # Readable by all (a web server serves the cache); a name of our own making.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        os.fchmod(fd, 0o644)
        return os.fdopen(fd, "wb")

    def mkdir(self, path: str) -> None:
        os.mkdir(path, 0o755)

    def stat(self, path: str) -> os.stat_result:
        return os.stat(path, follow_symlinks=False)

    def posix_rename(self, old: str, new: str) -> None:
        os.replace(old, new)

    def remove(self, path: str) -> None:
        os.unlink(path)


class Here:
    """The transport of a local "connection": always there."""

    def is_active(self) -> bool:
        return True


@contextlib.contextmanager
def connection(login: SshCommand | None) -> Iterator[tuple[Callable[[], Any], Any]]:
    """(a way to open a session, the link) to the cache: SFTP over the user's ssh,
    or this machine's filesystem for a file:// cache (None). LoginFailed if no login."""
    if login is None:
        yield LocalFiles, Here()
        return
    link = SshLink(login)
    try:
        yield link.open_session, link
    finally:
        link.close()


class DirectoryFiles:
    """A cache in a directory (cache_files.CacheFiles): each thread with its own SFTP
    session (an SFTP session answers one request after another: with a few, small
    paths travel side by side, and compression uses both cores).

    How a cut link never leaves a file that looks whole: each NAR and narinfo is
    written to a temporary name in `.nixspool-partial/` and renamed into place
    (an atomic rename(2) on the host, through OpenSSH's posix-rename)."""

    def __init__(self, open_files: Callable[[], Any], transport: Any, root: str) -> None:
        self._open_files = open_files  # a new SFTPClient, or LocalFiles
        self._mine = threading.local()
        self.transport = transport
        self.root = root
        self.description = root
        self.notes: list[str] = []  # a directory has nothing to warn of
        self.credentials = ""  # the SSH login's, which ssh itself reports
        self.partial = posixpath.join(root, PARTIAL_DIR)
        self._names: set[str] | None = None  # the last listing of root

    @property
    def files(self) -> Any:
        """This thread's session."""
        files = getattr(self._mine, "files", None)
        if files is None:
            with self.step("opening an SFTP session"):
                files = self._mine.files = self._open_files()
        return files

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        """Turn what SFTP raises into why the upload stopped."""
        try:
            yield
        except Stop:
            raise
        except Exception as e:
            import paramiko  # not before the first session's ssh runs (see _session)

            if not isinstance(e, (OSError, EOFError, paramiko.SSHException)):
                raise
            # A request that waited past the stall bound (TimeoutError), a closed
            # channel or transport: the link, not the host's answer.
            broken = (TimeoutError, EOFError, ConnectionError, paramiko.SSHException)
            if isinstance(e, broken) or not self.transport.is_active():
                raise Stop(
                    Kind.LINK, f"the connection broke while {what}: {e or type(e).__name__}"
                ) from None
            if e.errno in (errno.ENOENT, errno.EACCES):
                raise Stop(
                    Kind.CACHE,
                    f"{what}: {e.strerror or e}; does {self.root} exist, writable by "
                    "the user nixspool writes as?",
                ) from None
            # OpenSSH reports most failed writes (ENOSPC, EROFS, EDQUOT) as the one
            # SFTP status "Failure": space may come back, so try again later.
            raise Stop(
                Kind.WRITE,
                f"{what}: the host refused a write ({e}); is its disk full?",
            ) from None

    def reach(self) -> None:
        self.files  # noqa: B018 - this thread's session: the SSH login

    def top_names(self, wanted: int) -> set[str]:
        """One listing of the directory, whatever its size (one request)."""
        with self.step(f"listing {self.root}"):
            self._names = set(self.files.listdir(self.root))
        return self._names

    def has(self, name: str) -> bool:
        path = posixpath.join(self.root, name)
        with self.step(f"looking for {path}"):
            try:
                self.files.stat(path)
            except FileNotFoundError:
                return False
        return True

    def read(self, name: str) -> bytes | None:
        path = posixpath.join(self.root, name)
        with self.step(f"reading {path}"):
            try:
                with self.files.open(path) as f:
                    data: bytes = f.read(4096)
                    return data
            except FileNotFoundError:
                return None

    def make_layout(self) -> None:
        names = self._names if self._names is not None else self.top_names(0)
        for name in (narinfo.NAR_DIR, PARTIAL_DIR):
            if name not in names:
                with self.step(f"creating {self.root}/{name}"):
                    try:
                        self.files.mkdir(posixpath.join(self.root, name))
                    except OSError:
                        if not self.transport.is_active():
                            raise
                        # Made by another writer just now; or the writes into it
                        # will say what is wrong.

    def clean_up(self) -> None:
        with self.step(f"cleaning {self.partial}"):
            for attr in self.files.listdir_attr(self.partial):
                if attr.st_mtime is not None and attr.st_mtime < time.time() - PARTIAL_MAX_AGE:
                    with contextlib.suppress(OSError):
                        self.files.remove(posixpath.join(self.partial, attr.filename))

    def _temporary(self, suffix: str) -> str:
        return posixpath.join(self.partial, f"{uuid.uuid4().hex}{suffix}")

    def _rename(self, temporary: str, name: str) -> None:
        """Into place, atomically, replacing what is there (another writer's copy of
        the same content)."""
        self.files.posix_rename(temporary, posixpath.join(self.root, name))

    def put(self, name: str, data: bytes) -> None:
        temporary = self._temporary(".tmp")
        with self.step(f"writing {self.root}/{name}"):
            with self.files.open(temporary, "wb") as f:
                _pipelined(f)
                f.write(data)
            self._rename(temporary, name)

    def put_narinfo(self, name: str, text: str, entry: Entry) -> None:
        self.put(name, text.encode())

    def add_signatures(self, name: str, entry: Entry) -> bool:
        return False  # no conditional write over SFTP: another writer's could be lost

    def new_nar(self, suffix: str) -> _DirectoryNar:
        return _DirectoryNar(self, self._temporary(suffix))


class _DirectoryNar:
    """A NAR written to a temporary name, renamed into place once whole."""

    def __init__(self, files: DirectoryFiles, temporary: str) -> None:
        self._files = files
        self._temporary = temporary
        self._file = files.files.open(temporary, "wb")
        _pipelined(self._file)

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def commit(self, name: str) -> None:
        self._file.close()
        self._files._rename(self._temporary, name)

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self._file.close()
        with contextlib.suppress(Exception):
            self._files.files.remove(self._temporary)


def _pipelined(file: Any) -> None:
    """Over SFTP, writes that do not wait for their answers: close() collects them,
    and fails if one did."""
    if hasattr(file, "set_pipelined"):
        file.set_pipelined(True)
