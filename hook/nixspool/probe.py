"""Can this remote be reached now? The user's own OpenSSH says, and nothing else.

nix copy reaches ssh:// and ssh-ng:// stores through `ssh`, run as the configured
user with their ~/.ssh/config: Include, Match, ProxyJump, ProxyCommand,
CertificateFile, IdentityAgent, UserKnownHostsFile, HostKeyAlias, hashed and
@cert-authority/@revoked known_hosts lines, FIDO keys. A second SSH client that
read less of that would give verdicts `ssh` would not ("away" where nix copy
works, "logged in" where OpenSSH refuses a revoked key). So the probe *is*
`ssh`: the same program, user, environment and options nix copy gets
(ssh_options), running `true` on the host, or opening the sftp subsystem of an
sftp:// cache (such a host may allow nothing else). Its answer is classified:

- OK: ssh logged in (any exit but 255: the command ran, whatever it said);
- UNREACHABLE: ssh said the network failed it (no route, no answer, refused,
  no banner, a name that does not resolve), or it did not finish within its
  bound. The laptop left home: rows stay queued, the flush exits 75;
- MISCONFIGURED: the host answered, but ssh will not or cannot log in (host
  key unknown, changed or revoked; no key accepted; a bad ssh_config; a proxy
  that failed without a network error; no SFTP). A person must act: exit 1;
- ERROR: ssh could not be run at all, or died of a signal: a local fault, exit 1.

ssh's exit status 255 is its own failure; any other is the remote command's.
The cache writer (static_cache.py) speaks SFTP over the same `ssh` (SshCommand).
"""

from __future__ import annotations

import enum
import subprocess
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

from . import privileges
from .config import Remote
from .errors import CommandError
from .remote_rules import SFTP_SCHEME, SSH_SCHEMES
from .run import Account, Running, run, spawn

SSH_FAILED = 255  # ssh's own exit status; anything else came from the remote command


class Verdict(enum.StrEnum):
    OK = "ok"
    UNREACHABLE = "unreachable"
    MISCONFIGURED = "misconfigured"
    ERROR = "error"  # ssh could not be run, or died of a signal


@dataclass(frozen=True)
class ProbeResult:
    verdict: Verdict
    # The step that decided: resolve, tcp, banner, login, proxy, hostkey, auth,
    # sftp, config, ssh (another refusal of ssh's), done, error.
    stage: str
    message: str


@dataclass(frozen=True)
class SshTarget:
    """Where an ssh://, ssh-ng:// or sftp:// URL points, before ~/.ssh/config."""

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

    @property
    def destination(self) -> str:
        """As ssh takes it: ssh://[user@]host[:port] (ssh's own URI form, so a port
        and an IPv6 address need no options)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{urllib.parse.quote(self.user, safe='')}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"ssh://{user}{host}{port}"


def ssh_options(remote: Remote, accept_new_host_keys: bool) -> str:
    """NIX_SSHOPTS for `nix copy`: every ssh step bounded, never a prompt.

    Nix splits this on whitespace, so a key path with spaces cannot be passed
    (config.py refuses one).
    """
    alive = max(1, int(remote.connect_timeout / 2))
    options = [
        "-o",
        # Bounds the TCP connect (a ProxyCommand's too, through the banner
        # exchange) and the SSH handshake.
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


@dataclass(frozen=True)
class SshCommand:
    """`ssh` to a remote as nix copy runs it; crosses into the cache writer as JSON."""

    options: tuple[str, ...]
    destination: str
    connect_timeout: float

    @classmethod
    def of(cls, remote: Remote, accept_new_host_keys: bool) -> SshCommand:
        target = SshTarget.from_url(remote.url)
        options = ssh_options(remote, accept_new_host_keys).split()
        if target.ssh_key:  # as Nix passes ?ssh-key=
            options += ["-i", target.ssh_key]
        return cls(tuple(options), target.destination, remote.connect_timeout)

    def running(self, *command: str) -> list[str]:
        return ["ssh", *self.options, self.destination, *command]

    def subsystem(self, name: str, *options: str) -> list[str]:
        return ["ssh", *options, *self.options, "-s", self.destination, name]

    def resolving(self) -> list[str]:
        """`ssh -G`: what the user's ssh_config makes of this destination."""
        return ["ssh", "-G", *self.options, self.destination]

    @property
    def bound(self) -> float:
        """How long a login may take in all: connect and handshake are bounded by
        ConnectTimeout; authentication, a proxy, a slow host take the rest."""
        return 4 * self.connect_timeout + 5


class NotStarted:
    """A probe whose ssh could not even be started: wait() says why."""

    def __init__(self, error: CommandError) -> None:
        self.error = error

    def wait(self) -> subprocess.CompletedProcess[str]:
        raise self.error

    def kill(self) -> None:
        pass


Probe = Running | NotStarted


def start_probe(remote: Remote, account: Account, *, accept_new_host_keys: bool) -> Probe:
    """The user's ssh logging in to `remote`, as `account` (spawn switches only if
    that is not who runs nixspool), bounded in all; verdict() reads it."""
    ssh = SshCommand.of(remote, accept_new_host_keys)
    argv = ssh.subsystem("sftp") if remote.is_sftp_cache else ssh.running("true")
    try:
        return spawn(
            argv, account=account, env=privileges.child_env(account), timeout=ssh.bound, check=False
        )
    except CommandError as e:
        return NotStarted(e)


def verdict(running: Probe) -> ProbeResult:
    """A started probe's result, as ssh said it."""
    try:
        completed = running.wait()
    except CommandError as e:
        if e.timed_out:
            return ProbeResult(
                Verdict.UNREACHABLE,
                "login",
                f"ssh did not finish logging in ({e}): the host stopped answering",
            )
        return ProbeResult(Verdict.ERROR, "error", str(e))
    return classify_ssh(completed.returncode, completed.stderr)


# What ssh prints when it fails (exit 255), lower-cased, with the stage it tells.
# A person's problem is looked for first: a refused key behind a jump host is
# not "away" because the jump's connection then closes too.
_NEEDS_A_PERSON = (
    ("revoked", "hostkey"),
    ("remote host identification has changed", "hostkey"),
    ("host key verification failed", "hostkey"),
    ("no matching host key type", "hostkey"),
    ("permission denied", "auth"),
    ("too many authentication failures", "auth"),
    ("no more authentication methods", "auth"),
    ("subsystem request failed", "sftp"),
    ("administratively prohibited", "proxy"),  # the jump host forwards nothing
    ("bad configuration option", "config"),
    ("bad owner or permissions", "config"),
    ("command-line line", "config"),
    ("terminating, ", "config"),  # "... terminating, N bad configuration options"
    ("command not found", "proxy"),  # a ProxyCommand that is not there
)
_AWAY = (
    ("could not resolve hostname", "resolve"),
    ("name or service not known", "resolve"),
    ("temporary failure in name resolution", "resolve"),
    ("connection timed out during banner exchange", "banner"),
    ("kex_exchange_identification", "banner"),
    ("connection refused", "tcp"),
    ("connection timed out", "tcp"),
    ("operation timed out", "tcp"),
    ("no route to host", "tcp"),
    ("network is unreachable", "tcp"),
    ("host is down", "tcp"),
    ("connection reset", "banner"),
    ("broken pipe", "login"),
    ("timeout, server", "login"),
)


def classify_ssh(returncode: int, stderr: str) -> ProbeResult:
    """ssh's exit status and words to a verdict: pure (tests/unit/test_probe.py)."""
    if returncode < 0:
        return ProbeResult(Verdict.ERROR, "error", f"ssh was killed by signal {-returncode}")
    if returncode != SSH_FAILED:
        return ProbeResult(Verdict.OK, "done", "ssh logged in")
    said, text = _said(stderr), stderr.lower()
    for table, verdict_ in ((_NEEDS_A_PERSON, Verdict.MISCONFIGURED), (_AWAY, Verdict.UNREACHABLE)):
        for fragment, stage in table:
            if fragment in text:
                return ProbeResult(verdict_, stage, said)
    if "connection closed by unknown port" in text:  # a proxy's stdio, silent on why
        return ProbeResult(
            Verdict.MISCONFIGURED, "proxy", f"the proxy ended the connection: {said}"
        )
    return ProbeResult(Verdict.MISCONFIGURED, "ssh", said)


def _said(stderr: str) -> str:
    """ssh's words, one line: the lines that say something, warnings left out."""
    lines = [
        line.strip()
        for line in stderr.replace("\r", "\n").splitlines()
        if line.strip() and not line.lstrip().startswith(("Warning: Permanently added", "@@@"))
    ]
    return "; ".join(dict.fromkeys(lines[-4:])) or "ssh failed and said nothing"


def resolve(remote: Remote, account: Account) -> Mapping[str, str]:
    """`ssh -G` as the user: how their OpenSSH would reach the remote (hostname,
    port, user, proxyjump, proxycommand, ...; several values space-joined).
    CommandError if ssh refuses their config."""
    ssh = SshCommand.of(remote, False)
    out = run(
        ssh.resolving(), account=account, env=privileges.child_env(account), timeout=10
    ).stdout
    resolved: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        resolved[key] = f"{resolved[key]} {value}" if key in resolved else value
    return resolved


def nix_ssh_env(remote: Remote, account: Account, accept_new_host_keys: bool) -> dict[str, str]:
    """The environment for nix commands that talk to `remote` as `account`."""
    extra = {"NIX_SSHOPTS": ssh_options(remote, accept_new_host_keys)}
    return privileges.child_env(account, extra)
