"""The cache writer's files: SFTP sessions over the user's own OpenSSH, or this
machine's filesystem for a file:// cache, behind the same few calls.

Each session is `ssh -s DESTINATION sftp` (probe.SshCommand: the options nix
copy gets), run as the user in the writer's process, with paramiko's SFTP
client speaking the protocol over ssh's stdin and stdout. So an sftp:// cache
is reached exactly as `ssh` reaches it (ProxyJump, certificates, known_hosts
markers, ...), and a login that fails is told apart by the probe's own
classifier. Every read waits at most a bound: ConnectTimeout and the probe's
bound during the login, the stall bound after it (ssh's ServerAlive ends a
session whose link went away, which the writer then sees as its end).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import IO, Any

from .probe import ProbeResult, SshCommand, Verdict, classify_ssh


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
    """The ssh processes of one upload, one per SFTP session."""

    def __init__(self, ssh: SshCommand) -> None:
        self.ssh = ssh
        self._sessions: list[tuple[subprocess.Popen[bytes], Any]] = []
        self._lock = threading.Lock()

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
        import paramiko

        ours, theirs = socket.socketpair()
        with tempfile.TemporaryFile() as stderr:
            try:
                proc = subprocess.Popen(
                    self.ssh.subsystem("sftp"),
                    stdin=theirs.fileno(),
                    stdout=theirs.fileno(),
                    stderr=stderr.fileno(),
                )
            except OSError as e:
                ours.close()
                raise LoginFailed(
                    ProbeResult(Verdict.ERROR, "error", f"cannot run ssh: {e.strerror}")
                ) from None
            finally:
                theirs.close()
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
        for proc, _ in sessions:
            try:
                proc.wait(timeout=self.ssh.connect_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


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
