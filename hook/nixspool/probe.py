"""Can this remote be reached now? A bounded SSH probe, and the ssh options for nix copy.

The probe does what `ssh` would do as the configured user, each step bounded
by `connect_timeout`: resolve the host through the user's ~/.ssh/config, open
TCP, read the SSH banner, check the host key against the user's known_hosts,
authenticate with the agent or the user's keys. It tells apart

- UNREACHABLE: no route, no answer, refused, no banner. The laptop left home;
  rows stay queued, the flush exits 75, and no attempt is counted;
- MISCONFIGURED: the host answers but will not let us in (unknown or changed
  host key, no key accepted). Retrying will not help until someone acts, so
  the flush says so loudly and exits 1, and the rows still stay queued;
- ERROR: the probe itself failed (a bug, a surprise from paramiko, a probe
  that ran past its own bound). Not "away": that would hide it behind exit 75
  for ever. The flush exits 1; --debug shows the probe's traceback.

paramiko costs ~0.13 s to import: it is imported inside `probe()`, only
when there is an ssh remote with due rows.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import socket
import sys
import traceback
import urllib.parse
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from . import privileges
from .config import SFTP_SCHEME, SSH_SCHEMES, Remote
from .errors import CommandError
from .run import Account, Running, spawn


class Verdict(enum.StrEnum):
    OK = "ok"
    UNREACHABLE = "unreachable"
    MISCONFIGURED = "misconfigured"
    ERROR = "error"  # the probe's own failure


@dataclass(frozen=True)
class ProbeResult:
    verdict: Verdict
    stage: str  # the step that decided: resolve, tcp, banner, hostkey, auth, done, error
    message: str
    detail: str = ""  # ERROR: the probe's traceback, for --debug

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ProbeResult:
        data = json.loads(text)
        return cls(Verdict(data["verdict"]), data["stage"], data["message"], data.get("detail", ""))


@dataclass(frozen=True)
class SshTarget:
    """Where an ssh:// or ssh-ng:// store URL points, before ~/.ssh/config."""

    host: str
    user: str | None = None
    port: int | None = None
    ssh_key: str | None = None  # Nix's ?ssh-key= parameter

    @classmethod
    def from_url(cls, url: str) -> SshTarget:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme + "://" not in (*SSH_SCHEMES, SFTP_SCHEME) or not parsed.hostname:
            raise ValueError(f"{url!r} is not an ssh://, ssh-ng:// or sftp:// URL with a host")
        query = urllib.parse.parse_qs(parsed.query)
        return cls(
            host=parsed.hostname,
            user=urllib.parse.unquote(parsed.username) if parsed.username else None,
            port=parsed.port,
            ssh_key=query.get("ssh-key", [None])[0],
        )


@dataclass(frozen=True)
class ProbeRequest:
    """What the probe needs; crosses into a child process as JSON when dropping root."""

    url: str
    home: str
    local_user: str
    connect_timeout: float
    ssh_key: str | None = None
    accept_new_host_keys: bool = False
    agent_socket: str | None = None

    @classmethod
    def of(cls, remote: Remote, account: Account, accept_new_host_keys: bool) -> ProbeRequest:
        """The login to `remote` as `account`, as its ssh would make it."""
        return cls(
            url=remote.url,
            home=account.home,
            local_user=account.name,
            connect_timeout=remote.connect_timeout,
            ssh_key=remote.ssh_key,
            accept_new_host_keys=accept_new_host_keys,
            agent_socket=privileges.agent_socket(account),
        )

    @property
    def stall_seconds(self) -> float:
        """How long an open connection may go without an answer, or with what it
        sent unacknowledged, before it counts as gone (the link dropped)."""
        return max(5.0, 1.5 * self.connect_timeout)


def ssh_options(remote: Remote, accept_new_host_keys: bool) -> str:
    """NIX_SSHOPTS for `nix copy`: every ssh step bounded, never a prompt.

    Nix splits this on whitespace, so a key path with spaces cannot be passed
    (config.py refuses one).
    """
    alive = max(1, int(remote.connect_timeout / 2))
    options = [
        "-o",
        f"ConnectTimeout={max(1, int(remote.connect_timeout))}",
        "-o",
        "BatchMode=yes",  # a prompt would hang a flush started by systemd
        "-o",
        f"ServerAliveInterval={alive}",  # the link went down mid-copy
        "-o",
        "ServerAliveCountMax=3",
        "-o",
        f"StrictHostKeyChecking={'accept-new' if accept_new_host_keys else 'yes'}",
    ]
    if remote.ssh_key:
        options += ["-i", remote.ssh_key, "-o", "IdentitiesOnly=yes"]
    return " ".join(options)


def start_probe(remote: Remote, account: Account, *, accept_new_host_keys: bool) -> Running:
    """The probe in a child process, as `account` (spawn switches only if that is not
    who runs nixspool), bounded in all."""
    request = ProbeRequest.of(remote, account, accept_new_host_keys)
    return spawn(
        [sys.executable, "-m", "nixspool.probe"],
        input=json.dumps(asdict(request)),
        account=account,
        env=privileges.child_env(account),
        timeout=4 * remote.connect_timeout + 5,
    )


def verdict(running: Running) -> ProbeResult:
    """A started probe's result. Every step of the probe is bounded, so a probe that
    crashed, printed nonsense or ran past its bound is an ERROR, not "away"."""
    try:
        completed = running.wait()
    except CommandError as e:
        return ProbeResult(Verdict.ERROR, "error", f"the probe failed: {e}", e.stderr)
    try:
        return ProbeResult.from_json(completed.stdout)
    except (ValueError, KeyError, TypeError) as e:
        return ProbeResult(
            Verdict.ERROR,
            "error",
            f"the probe printed what nixspool cannot read ({type(e).__name__}: {e})",
            completed.stderr,
        )


def nix_ssh_env(remote: Remote, account: Account, accept_new_host_keys: bool) -> dict[str, str]:
    """The environment for nix commands that talk to `remote` as `account`."""
    extra = {"NIX_SSHOPTS": ssh_options(remote, accept_new_host_keys)}
    return privileges.child_env(account, extra)


def _resolve(request: ProbeRequest, target: SshTarget) -> tuple[str, int, str, list[str]]:
    """(hostname, port, user, identity files) as ssh would see them for this user."""
    import paramiko

    ssh_config = paramiko.SSHConfig()
    for path in ("/etc/ssh/ssh_config", os.path.join(request.home, ".ssh", "config")):
        if os.path.exists(path):
            with open(path) as f:
                ssh_config.parse(f)
    found = ssh_config.lookup(target.host)
    hostname = found.get("hostname", target.host)
    port = target.port or int(found.get("port", 22))
    user = target.user or found.get("user") or request.local_user
    keys = [k for k in (request.ssh_key, target.ssh_key) if k]
    # The probe runs as the user with their HOME, so ~ is theirs.
    keys += [os.path.expanduser(k) for k in found.get("identityfile", [])]
    keys += [
        os.path.join(request.home, ".ssh", name) for name in ("id_ed25519", "id_ecdsa", "id_rsa")
    ]
    return hostname, port, user, list(dict.fromkeys(keys))


class LoginFailed(Exception):
    """logged_in() did not get in: the result says where and why."""

    def __init__(self, result: ProbeResult) -> None:
        super().__init__(result.message)
        self.result = result


@dataclass(frozen=True)
class Login:
    transport: Any  # paramiko.Transport, authenticated
    where: str  # host:port
    user: str
    key: str  # which key let us in


@contextlib.contextmanager
def logged_in(request: ProbeRequest) -> Iterator[Login]:
    """An SSH login as `ssh` would make it for the user, each step within
    connect_timeout; LoginFailed says which step failed. Closed on leaving."""
    import paramiko

    target = SshTarget.from_url(request.url)
    timeout = request.connect_timeout
    try:
        hostname, port, user, key_files = _resolve(request, target)
    except (OSError, ValueError, paramiko.SSHException) as e:
        raise LoginFailed(
            ProbeResult(Verdict.MISCONFIGURED, "resolve", f"reading ~/.ssh/config: {e}")
        ) from None
    where = f"{hostname}:{port}"
    try:
        sock = socket.create_connection((hostname, port), timeout=timeout)
    except socket.gaierror as e:
        raise LoginFailed(
            ProbeResult(Verdict.UNREACHABLE, "resolve", f"cannot resolve {hostname}: {e.strerror}")
        ) from None
    except TimeoutError:
        raise LoginFailed(
            ProbeResult(Verdict.UNREACHABLE, "tcp", f"no answer from {where} within {timeout:g} s")
        ) from None
    except OSError as e:
        raise LoginFailed(
            ProbeResult(Verdict.UNREACHABLE, "tcp", f"cannot connect to {where}: {e.strerror or e}")
        ) from None
    # A link that goes away mid-transfer leaves sent data unacknowledged: the kernel
    # then ends the connection after this long (paramiko's own writes never give up).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(request.stall_seconds * 1000))
    transport = paramiko.Transport(sock)
    transport.banner_timeout = timeout
    transport.auth_timeout = timeout
    transport.handshake_timeout = timeout
    try:
        try:
            transport.start_client(timeout=timeout)
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise LoginFailed(
                ProbeResult(
                    Verdict.UNREACHABLE,
                    "banner",
                    f"no SSH handshake with {where}: {e or type(e).__name__}",
                )
            ) from None
        if not transport.is_active() or not transport.initial_kex_done:
            # start_client() returns, without an error, when its timeout passes
            # before the key exchange is done: the host is too slow to answer.
            raise LoginFailed(
                ProbeResult(
                    Verdict.UNREACHABLE,
                    "banner",
                    f"no SSH key exchange with {where} within {timeout:g} s",
                )
            )
        failed = _check_host_key(request, transport, hostname, port)
        if failed is not None:
            raise LoginFailed(failed)
        key = _authenticate(request, transport, user, key_files, where)
        yield Login(transport, where, user, key)
    finally:
        transport.close()


def probe(request: ProbeRequest) -> ProbeResult:
    """Try to reach and log in to the remote, each step within connect_timeout."""
    try:
        with logged_in(request) as login:
            return ProbeResult(
                Verdict.OK, "done", f"logged in to {login.where} as {login.user} with {login.key}"
            )
    except LoginFailed as e:
        return e.result


def _check_host_key(
    request: ProbeRequest, transport: Any, hostname: str, port: int
) -> ProbeResult | None:
    import paramiko

    key = transport.get_remote_server_key()
    name = hostname if port == 22 else f"[{hostname}]:{port}"
    known = paramiko.HostKeys()
    user_file = os.path.join(request.home, ".ssh", "known_hosts")
    for path in ("/etc/ssh/ssh_known_hosts", user_file):
        if os.path.exists(path):
            try:
                known.load(path)
            except (paramiko.hostkeys.InvalidHostKey, paramiko.SSHException, ValueError) as e:
                # OpenSSH skips such a line; nixspool does not guess which key was
                # meant. Not "away": a person must fix the file.
                line = e.args[0] if isinstance(e, paramiko.hostkeys.InvalidHostKey) else e
                return ProbeResult(
                    Verdict.MISCONFIGURED,
                    "hostkey",
                    f"{path} has a line that is not a host key ({line!s:.80}); "
                    "fix or remove that line",
                )
    entries = known.lookup(name)
    if entries is not None and key.get_name() in entries:
        if entries[key.get_name()] == key:
            return None
        return ProbeResult(
            Verdict.MISCONFIGURED,
            "hostkey",
            f"the host key of {name} has CHANGED since it was recorded in "
            f"{request.local_user}'s known_hosts: check it before anything else",
        )
    if request.accept_new_host_keys:
        os.makedirs(os.path.dirname(user_file), mode=0o700, exist_ok=True)
        with open(user_file, "a") as f:
            f.write(f"{name} {key.get_name()} {key.get_base64()}\n")
        return None
    return ProbeResult(
        Verdict.MISCONFIGURED,
        "hostkey",
        f"{name} is not in {request.local_user}'s known_hosts; as "
        f"{request.local_user}, run `ssh {name}` once and check the key, or set "
        "accept_new_host_keys = true (see README#ssh)",
    )


def _authenticate(
    request: ProbeRequest, transport: Any, user: str, key_files: list[str], where: str
) -> str:
    """Log in with the agent's or the user's keys; which one worked, or LoginFailed."""
    import paramiko

    tried: list[str] = []
    keys: list[tuple[str, Any]] = []
    if request.agent_socket:
        os.environ["SSH_AUTH_SOCK"] = request.agent_socket
        with contextlib.suppress(paramiko.SSHException):  # a dead agent: try the files
            keys += [(f"agent key {k.get_name()}", k) for k in paramiko.Agent().get_keys()]
    for path in key_files:
        if not os.path.exists(path):
            continue
        try:
            keys.append((path, paramiko.PKey.from_path(path)))
        except paramiko.PasswordRequiredException:
            tried.append(f"{path} (encrypted; add it to an agent)")
        except (paramiko.SSHException, OSError, ValueError) as e:
            tried.append(f"{path} ({e})")
    for label, key in keys:
        try:
            transport.auth_publickey(user, key)
        except paramiko.AuthenticationException:
            tried.append(label)
            continue
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise LoginFailed(
                ProbeResult(
                    Verdict.UNREACHABLE, "auth", f"{where} went away during authentication: {e}"
                )
            ) from None
        if transport.is_authenticated():
            return label
    raise LoginFailed(
        ProbeResult(
            Verdict.MISCONFIGURED,
            "auth",
            f"{where} accepted none of {request.local_user}'s keys for user {user} "
            f"(tried: {', '.join(tried) or 'no key found'}); see README#ssh",
        )
    )


def main() -> None:
    """`python -m nixspool.probe`: one probe, request and result as JSON (for dropping root)."""
    request = ProbeRequest(**json.loads(sys.stdin.read()))
    try:
        result = probe(request)
    except Exception as e:  # a bug or a surprise from paramiko: say so, with where
        result = ProbeResult(
            Verdict.ERROR, "error", f"{type(e).__name__}: {e}", traceback.format_exc()
        )
    sys.stdout.write(result.to_json())


if __name__ == "__main__":
    main()
