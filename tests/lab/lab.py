"""The test lab: a real nix-daemon (and, for the flusher, real sshd hosts).

Everything here is real: Debian's Nix, real users, real sockets. It needs
root. Where the lab cannot be built, tests that need it are skipped on a
developer's machine but *fail* when NIXSPOOL_REQUIRE_LAB=1 (set by the
README's test command and so by CI), so CI can never pass by skipping them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import textwrap
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from nixspool import config as nixspool_config
from nixspool.hook import files, rows
from nixspool.nix import NixVersion
from nixspool.spool import Owner, Spool
from programs import (
    installed_program as installed_program,  # the lab's tests say lab.installed_program
)

BUILDER = "nixspool-builder"


def require_lab(*commands: str) -> None:
    """Skip (or fail, under NIXSPOOL_REQUIRE_LAB=1) unless root with these commands."""
    missing = [c for c in ("nix-daemon", "nix-build", *commands) if shutil.which(c) is None]
    problem = None
    if os.geteuid() != 0:
        problem = "the lab needs root"
    elif missing:
        problem = f"the lab needs {', '.join(missing)} (`bash tests/run` installs it)"
    if problem:
        if os.environ.get("NIXSPOOL_REQUIRE_LAB") == "1":
            pytest.fail(f"NIXSPOOL_REQUIRE_LAB=1 but {problem}", pytrace=False)
        pytest.skip(problem)


@functools.cache
def nix_version() -> NixVersion:
    """The Nix under test: tests that depend on its behaviour ask this."""
    return NixVersion.parse(
        subprocess.run(["nix", "--version"], text=True, capture_output=True, check=True).stdout
    )


def hook_gets_out_paths() -> bool:
    """Nix 2.8.0 runs post-build-hook with OUT_PATHS empty (fixed in 2.8.1)."""
    v = nix_version()
    return (v.major, v.minor, v.patch) != (2, 8, 0)


def unsigned_refusal(remote: NixVersion | None = None) -> str:
    """How a remote Nix refuses a path without a trusted signature: the LAN host's
    own Nix says it, which is the Nix under test unless a test gives another."""
    v = remote or nix_version()
    return (
        "lacks a valid signature"
        if (v.major, v.minor) <= (2, 18)
        else "lacks a signature by a trusted key"
    )


def shift_clock(config: Path, seconds: float) -> None:
    """What a clock step of `-seconds` does to the spool: its stored times move by
    `seconds` against the clock (tests change times, never the machine's clock).
    Written as the spool's owner, as nixspool itself does (docs/security.md#ownership).
    Also how a test lets time pass for the spool's backoff without sleeping.."""
    spool = config.parent / "spool" / "spool.sqlite"
    with files.OwnersRights(files.rights_to_use(str(spool.parent))):
        with sqlite3.connect(spool) as db:
            db.execute(
                "UPDATE deliveries SET next_attempt_at = next_attempt_at + ?,"
                " updated_at = updated_at + ?",
                (seconds, seconds),
            )
        db.close()


def ensure_user(name: str, groups: Iterable[str] = ()) -> None:
    """Create a system user (idempotent), unlocked for key-based ssh."""
    if subprocess.run(["id", name], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)
        subprocess.run(["usermod", "-p", "*", name], check=True)
    for group in groups:
        subprocess.run(["usermod", "-a", "-G", group, name], check=True)


def run_as(
    user: str,
    argv: list[str],
    env: Mapping[str, str],
    prefix: Iterable[str] = (),
    **kwargs: object,
) -> subprocess.CompletedProcess[str]:
    """Run argv as `user` (with a login-like environment plus `env`), after `prefix`
    (e.g. an nsenter into another mount namespace)."""
    home = os.path.expanduser(f"~{user}")
    full_env = {"HOME": home, "USER": user, "PATH": os.environ["PATH"], **env}
    result: subprocess.CompletedProcess[str] = subprocess.run(
        [
            *prefix,
            *["runuser", "-u", user, "--", "env"],
            *[f"{k}={v}" for k, v in full_env.items()],
            *argv,
        ],
        text=True,
        capture_output=True,
        **kwargs,
    )  # type: ignore[call-overload]
    return result


def accepts(unix_socket: Path) -> bool:
    """Does something accept connections on this Unix socket?"""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        return probe.connect_ex(str(unix_socket)) == 0


def wait_until_accepting(
    unix_socket: Path, proc: subprocess.Popen[Any], log: Path | None = None
) -> None:
    """Until the nix-daemon `proc` accepts on `unix_socket` (20 s at most): a socket
    file alone, perhaps left by an earlier daemon, is not it being ready."""
    deadline = time.monotonic() + 20
    while not accepts(unix_socket):
        assert proc.poll() is None, log.read_text() if log else "nix-daemon exited"
        assert time.monotonic() < deadline, "nix-daemon does not accept connections"
        time.sleep(0.02)


class NixDaemon:
    """A nix-daemon on its own socket with its own nix.conf, sharing /nix/store."""

    def __init__(
        self,
        root: Path,
        hook: str | None,
        env: Mapping[str, str] | None = None,
        extra_conf: str = "",
    ) -> None:
        self.root = root
        self.socket = root / "socket" / "socket"
        self.conf_dir = root / "etc"
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        for d in (root, self.socket.parent, self.conf_dir):
            d.chmod(0o755)
        hook_line = f"post-build-hook = {hook}\n" if hook else ""
        (self.conf_dir / "nix.conf").write_text(
            textwrap.dedent("""\
            sandbox = false
            substituters =
            build-users-group = nixbld
            experimental-features = nix-command
            """)
            + hook_line
            + extra_conf
        )
        self.env = {"NIX_CONF_DIR": str(self.conf_dir), "NIX_DAEMON_SOCKET_PATH": str(self.socket)}
        # A socket file left by an earlier daemon is not this one being ready.
        self.socket.unlink(missing_ok=True)
        daemon_env = {**os.environ, **self.env, **(env or {})}
        self.log = open(root / "daemon.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["nix-daemon"],
            env=daemon_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.started_at = time.time()
        wait_until_accepting(self.socket, self.proc, root / "daemon.log")

    def client_env(self) -> dict[str, str]:
        return {**self.env, "NIX_REMOTE": "daemon"}

    def root_env(self, path: str | None = None) -> dict[str, str]:
        """The environment of a `nixspool` root starts, as systemd would: this
        daemon's nix.conf and socket, root opening the store itself (no NIX_REMOTE);
        `path`: another PATH, e.g. one without Nix."""
        return {"PATH": path or os.environ["PATH"], **self.env}

    def build(
        self,
        expr: Path,
        args: Mapping[str, str],
        user: str = BUILDER,
        check: bool = True,
        timeout: float | None = None,
    ) -> subprocess.CompletedProcess[str]:
        argv = ["nix-build", "--no-out-link", str(expr)]
        for name, value in args.items():
            argv += ["--argstr", name, value]
        result = run_as(user, argv, self.client_env(), timeout=timeout)
        if check:
            assert result.returncode == 0, result.stderr
        return result

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=20)
        self.log.close()


# Derivations without nixpkgs: /bin/sh as builder, a nonce for fresh paths.
# Every third has two outputs; every fourth depends on the one before (its
# output refers to it, so its closure has two paths).
TEST_EXPR = """\
{ nonce, count ? "10", bytes ? "0" }:
let
  n = builtins.fromJSON count;
  size = builtins.fromJSON bytes;
  mk = i: derivation ({
    name = "nixspool-test-${toString i}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    outputs = if i - (i / 3) * 3 == 0 then [ "out" "dev" ] else [ "out" ];
    args = [ "-c" (''
      echo ${nonce}-${toString i} > $out
      if [ -n "$dev" ]; then echo dev-${nonce} > $dev; fi
      if [ -n "$dep" ]; then echo $dep >> $out; fi
      if [ ${toString size} -gt 0 ]; then
        /usr/bin/head -c ${toString size} /dev/urandom >> $out
      fi
    '') ];
  } // (if i > 0 && i - (i / 4) * 4 == 0 then { dep = mk (i - 1); } else {}));
in builtins.genList mk n
"""


def write_expr(directory: Path) -> Path:
    path = directory / "test.nix"
    path.write_text(TEST_EXPR)
    path.chmod(0o644)
    directory.chmod(0o755)
    return path


def nonce() -> str:
    return uuid.uuid4().hex[:12]


def expected_outputs(daemon: NixDaemon, expr: Path, args: Mapping[str, str]) -> set[str]:
    """Every output path the expression's derivations have, asked of Nix itself."""
    argv = ["nix-instantiate", str(expr)]
    for name, value in args.items():
        argv += ["--argstr", name, value]
    env = {**os.environ, **daemon.client_env()}
    drvs = subprocess.run(argv, env=env, text=True, capture_output=True, check=True).stdout.split()
    outs = subprocess.run(
        ["nix-store", "--query", "--outputs", *drvs],
        env=env,
        text=True,
        capture_output=True,
        check=True,
    ).stdout.split()
    return set(outs)


# -- the LAN host: sshd in a network namespace, with a chroot Nix store -------

ALICE = "nixspool-alice"  # owns the SSH key on the building machine
CACHE = "nixspool-cache"  # + the host's index: the account whose store receives uploads
SFTP = "nixspool-sftp"  # + the host's index: an account that may only use SFTP


def sh(*argv: str, check: bool = True, **kwargs: object) -> subprocess.CompletedProcess[str]:
    result: subprocess.CompletedProcess[str] = subprocess.run(  # type: ignore[call-overload]
        list(argv), text=True, capture_output=True, check=check, **kwargs
    )
    return result


def signing_key(directory: Path, name: str = "nixspool-lab") -> tuple[Path, str]:
    """A Nix signing key pair: (secret key file, public key text)."""
    secret, public = directory / f"{name}.sec", directory / f"{name}.pub"
    if not secret.exists():
        sh("nix-store", "--generate-binary-cache-key", name, str(secret), str(public))
        secret.chmod(0o600)
    return secret, public.read_text().strip()


class LanHost:
    """A host on its own address in a network namespace, running sshd.

    `link_down()` makes it vanish the way a LAN host does when the laptop
    leaves home: packets go nowhere and connections hang until their timeout.
    `stop_sshd()` gives the quick "connection refused" case instead.

    `nix_root`, another Debian root of the matrix, makes the host run that
    root's Nix instead of the one under test: a 2.8 builder and a 2.34 cache.
    """

    def __init__(
        self,
        root: Path,
        index: int,
        trusted_key: str,
        nix_root: Path | None = None,
        behind: LanHost | None = None,
    ) -> None:
        self.root = root
        self.nix_root = nix_root
        # A host reached only through `behind` (a bastion): its link is to that
        # host's namespace, and this machine has no route to it.
        self.behind = behind
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)
        tag = f"{os.getpid() % 10000}{index}"
        self.netns = f"nsplan{tag}"
        self.veth_host, self.veth_lan = f"vsh{tag}", f"vsl{tag}"
        # Addresses of our own namespace: the only non-loopback ones ever used.
        self.address = f"10.231.{77 + index}.2"
        self.host_address = f"10.231.{77 + index}.1"
        self.alias = f"lanhost{index}"
        # Each host its own account: the store a login writes to is set in that
        # account's nix.conf, so two hosts sharing one would share a store.
        self.user = f"{CACHE}{index}"
        self.sftp_user = f"{SFTP}{index}"
        self.store = root / "store-root"
        self.sshd_log = root / "sshd.log"
        self.sshd: subprocess.Popen[str] | None = None
        try:
            self._netns_up()
            self._remote_user(trusted_key)
            self._sshd_config()
            self.start_sshd()
        except BaseException:
            self.close()  # no namespace, veth or sshd outlives a host that failed
            raise

    def _netns_up(self) -> None:
        sh("ip", "netns", "add", self.netns)
        sh("ip", "link", "add", self.veth_host, "type", "veth", "peer", "name", self.veth_lan)
        sh("ip", "link", "set", self.veth_lan, "netns", self.netns)
        outside: Callable[..., subprocess.CompletedProcess[str]] = sh
        if self.behind is not None:
            sh("ip", "link", "set", self.veth_host, "netns", self.behind.netns)
            outside = self.behind.in_ns
        outside("ip", "addr", "add", f"{self.host_address}/30", "dev", self.veth_host)
        outside("ip", "link", "set", self.veth_host, "up")
        self.in_ns("ip", "addr", "add", f"{self.address}/30", "dev", self.veth_lan)
        self.in_ns("ip", "link", "set", self.veth_lan, "up")
        self.in_ns("ip", "link", "set", "lo", "up")

    def in_ns(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.netns, *argv, check=check)

    def _remote_user(self, trusted_key: str) -> None:
        ensure_user(self.user)
        home = Path(os.path.expanduser(f"~{self.user}"))
        self.store.mkdir(exist_ok=True)
        sh("chown", "-R", self.user, str(self.store))
        nix_conf = home / ".config" / "nix" / "nix.conf"
        nix_conf.parent.mkdir(parents=True, exist_ok=True)
        # The LAN host checks signatures, as a real cache does: it trusts the
        # lab's key, which the lab's nix-daemon signs every build with.
        nix_conf.write_text(
            f"store = local?root={self.store}\n"
            f"trusted-public-keys = {trusted_key}\n"
            "experimental-features = nix-command\n"
        )
        sh("chown", "-R", self.user, str(home / ".config"))

    def _sshd_config(self) -> None:
        key = self.root / "ssh_host_ed25519_key"
        if not key.exists():
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
        self.host_key = (self.root / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        (self.root / "sshd_config").write_text(
            textwrap.dedent(f"""\
            Port 22
            ListenAddress {self.address}
            HostKey {key}
            PidFile {self.root}/sshd.pid
            UsePAM no
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            PubkeyAuthentication yes
            PermitRootLogin no
            StrictModes yes
            LogLevel VERBOSE
            AuthorizedKeysFile .ssh/authorized_keys
            Subsystem sftp internal-sftp
            # The static cache's account (serve_sftp): SFTP only, no shell, no Nix.
            Match User {self.sftp_user}
                ForceCommand internal-sftp
                DisableForwarding yes
            """)
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation

    def sshd_mounts(self) -> list[str]:
        """The prefix that enters sshd's mount namespace (`ip netns exec` gave it its
        own): what runs there sees the host's mounts, and its Nix."""
        assert self.sshd is not None
        return ["nsenter", "-t", str(self.sshd.pid), "-m", "--"]

    def in_sshd_mounts(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return sh(*self.sshd_mounts(), *argv)

    def _run_other_nix(self, nix_root: Path) -> None:
        """In sshd's mount namespace only, /usr/bin/nix (which nix-store and
        nix-daemon link to) becomes a wrapper that starts `nix_root`'s nix with that
        root's own dynamic loader and libraries: the host's sessions, and so the
        builder's ssh:// and ssh-ng:// copies, talk to that Nix. The builder keeps
        its own: the mount is not seen outside."""
        loaders = sorted((nix_root / "usr" / "lib").glob("*-linux-gnu*/ld-linux*.so.[0-9]"))
        assert loaders, f"no dynamic loader in {nix_root}: not a Debian root with Nix"
        loader = loaders[0]
        # Debian 12's Nix keeps its own libraries in /usr/lib/nix (its RUNPATH,
        # which would name the builder's): searched first, by --library-path.
        libraries = [d for d in (loader.parent, nix_root / "usr/lib/nix") if d.is_dir()]
        wrapper = self.root / "other-nix"
        wrapper.write_text(
            "#!/bin/sh\n"
            "# nix-store, nix-daemon, nix: one binary that reads its name from argv[0]\n"
            f"exec {loader} --library-path {':'.join(map(str, libraries))} "
            f'--argv0 "${{0##*/}}" {nix_root}/usr/bin/nix "$@"\n'
        )
        wrapper.chmod(0o755)
        self.in_sshd_mounts("mount", "--bind", str(wrapper), "/usr/bin/nix")

    def nix_version(self) -> NixVersion:
        """The Nix this host's sessions run."""
        return NixVersion.parse(
            run_as(self.user, ["nix-store", "--version"], {}, prefix=self.sshd_mounts()).stdout
        )

    def start_sshd(self) -> None:
        self.sshd = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.netns,
                shutil.which("sshd") or "/usr/sbin/sshd",
                "-D",
                "-e",
                "-f",
                str(self.root / "sshd_config"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.sshd_log, "a"),  # noqa: SIM115
            text=True,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while "Server listening" not in self.sshd_log.read_text():
            assert self.sshd.poll() is None, self.sshd_log.read_text()
            assert time.monotonic() < deadline, "sshd did not start"
            time.sleep(0.05)
        if self.nix_root is not None:  # a new sshd, a new mount namespace
            self._run_other_nix(self.nix_root)

    def configure_sshd(self, extra: str) -> None:
        """Add lines to this host's sshd_config (before its Match block) and restart it."""
        config = self.root / "sshd_config"
        main, match, rest = config.read_text().partition("# The static cache's account")
        config.write_text(main + extra.rstrip("\n") + "\n" + match + rest)
        self.stop_sshd()
        self.start_sshd()

    def stop_sshd(self) -> None:
        if self.sshd is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.sshd.pid, signal.SIGTERM)
            self.sshd.wait(timeout=10)
            self.sshd = None

    def link_down(self) -> None:
        self.in_ns("ip", "link", "set", self.veth_lan, "down")

    def link_up(self) -> None:
        """Bring the host back, and wait (bounded) until its sshd answers again: the
        kernel remembers the failed neighbour lookup for a few seconds otherwise."""
        self.in_ns("ip", "link", "set", self.veth_lan, "up")
        sh("ip", "neigh", "flush", "dev", self.veth_host, check=False)
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection((self.address, 22), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, f"{self.address} did not come back"
                time.sleep(0.1)

    @contextlib.contextmanager
    def full_store_disk(self) -> Iterator[None]:
        """The host's store on a 6 MiB disk while inside: room for its database, not
        for paths of several MB; the store as it was afterwards (the disk freed)."""
        uid = sh("id", "-u", self.user).stdout.strip()
        self.in_sshd_mounts(
            "mount", "-t", "tmpfs", "-o", f"size=6m,mode=0755,uid={uid}", "full", str(self.store)
        )
        try:
            yield
        finally:
            self.in_sshd_mounts("umount", str(self.store))

    def go_silent(self) -> None:
        """Drop every packet the host sends, connections and link left up: a host
        away behind a router, or one that stalls mid-transfer. A token bucket smaller
        than any packet does it (this kernel has no netem)."""
        self.in_ns(
            "tc", "qdisc", "add", "dev", self.veth_lan, "root",
            "tbf", "rate", "8bit", "burst", "10", "limit", "10",
        )  # fmt: skip

    def speak_again(self) -> None:
        self.in_ns("tc", "qdisc", "del", "dev", self.veth_lan, "root", check=False)

    def shape(self, rate: str | None) -> None:
        """Limit the link towards the host to `rate` (e.g. "1gbit"), like a real LAN;
        None: as fast as the machine's veth pair goes."""
        sh("tc", "qdisc", "del", "dev", self.veth_host, "root", check=False)
        if rate:
            sh(
                "tc",
                "qdisc",
                "add",
                "dev",
                self.veth_host,
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "512kb",
                "latency",
                "50ms",
            )

    def authorize(self, public_key: str) -> None:
        ssh_dir = Path(os.path.expanduser(f"~{self.user}")) / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text(public_key + "\n")
        sh("chown", "-R", self.user, str(ssh_dir))

    def serve_sftp(self, public_key: str, name: str = "cache") -> Path:
        """A new, empty directory for a static binary cache, which `public_key` may
        write through this host's SFTP-only account (internal-sftp: no shell, so no
        Nix either). Its sftp:// URL is sftp_url(directory)."""
        ensure_user(self.sftp_user)
        home = Path(os.path.expanduser(f"~{self.sftp_user}"))
        ssh_dir = home / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text(public_key + "\n")
        sh("chown", "-R", self.sftp_user, str(ssh_dir))
        directory = self.root / name
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(mode=0o755)
        sh("chown", self.sftp_user, str(directory))
        return directory

    def sftp_url(self, directory: Path) -> str:
        return f"sftp://{self.sftp_user}@{self.alias}{directory}"

    def wipe(self) -> None:
        """Empty the host's store, as if it had never received anything."""
        while self.store.exists():
            # The Nix of a session that just ended may be closing its database,
            # which deletes its -wal file under rmtree's feet: go again.
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(self.store)
        self.store.mkdir()
        sh("chown", self.user, str(self.store))

    def remote_valid(self, paths: Iterable[str]) -> set[str]:
        """The paths the LAN host's store holds, asked on the LAN host, as its user."""
        paths = list(paths)
        if not paths:
            return set()
        argv = ["nix-store", "--check-validity", "--print-invalid", *paths]
        # In sshd's mounts: its Nix, which may not be the builder's, owns that store.
        result = run_as(self.user, argv, {}, prefix=self.sshd_mounts())
        assert result.returncode == 0, result.stderr
        return set(paths) - set(result.stdout.split())

    def logins(self) -> list[str]:
        """sshd's 'Accepted publickey for USER ... KEYTYPE FINGERPRINT' lines."""
        return [
            line
            for line in self.sshd_log.read_text().splitlines()
            if "Accepted publickey for" in line
        ]

    def close(self) -> None:
        self.stop_sshd()
        sh("ip", "netns", "del", self.netns, check=False)
        sh("ip", "link", "del", self.veth_host, check=False)


class KeyOwner:
    """The local user who owns the SSH key (the config's `user`)."""

    def __init__(self) -> None:
        ensure_user(ALICE, groups=["nix-users"])
        self.home = Path(os.path.expanduser(f"~{ALICE}"))
        self.ssh_dir = self.home / ".ssh"
        sh("rm", "-rf", str(self.ssh_dir))
        self.ssh_dir.mkdir(mode=0o700)
        self.key = self.ssh_dir / "id_ed25519"
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "alice@lab", "-f", str(self.key))
        self.public_key = Path(str(self.key) + ".pub").read_text().strip()
        self.fingerprint = sh("ssh-keygen", "-l", "-f", str(self.key)).stdout.split()[1]
        # In her home, which the flush unit's sandbox keeps writable (ssh needs it
        # anyway): under /tmp, PrivateTmp would hide it and ssh would fail.
        self.uid_log = self.home / "ssh-uids"
        self.uid_log.write_text("")
        self.uid_log.chmod(0o666)
        self.hosts: list[LanHost] = []

    def know(self, host: LanHost | None = None) -> None:
        """Add the host to alice's ~/.ssh/config (alias) and known_hosts; None: write
        both anew from the hosts she knows (after a test changed them)."""
        if host is not None:
            self.hosts.append(host)
        config = []
        for h in self.hosts:
            # KnownHostsCommand runs on this machine, as whoever runs ssh, on every
            # connection: it records the uid, so tests see who really talked SSH.
            # (Not LocalCommand: Nix 2.26+ passes its own -oLocalCommand.)
            config.append(
                f"Host {h.alias}\n  HostName {h.address}\n  User {h.user}\n"
                f"  KnownHostsCommand /bin/sh -c 'id -u >> {self.uid_log}'\n"
            )
        (self.ssh_dir / "config").write_text("\n".join(config))
        (self.ssh_dir / "known_hosts").write_text(
            "".join(f"{h.address} {' '.join(h.host_key)}\n" for h in self.hosts)
        )
        sh("chown", "-R", ALICE, str(self.ssh_dir))

    def ssh(self, destination: str, *command: str) -> subprocess.CompletedProcess[str]:
        """alice's own `ssh -o BatchMode=yes DESTINATION true`: what nixspool says of a
        host must agree with it (255: ssh's own failure; any other exit: logged in)."""
        argv = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=3", destination]
        return run_as(ALICE, [*argv, *(command or ["true"])], {}, timeout=60)

    def ssh_uids(self) -> list[int]:
        return [int(line) for line in self.uid_log.read_text().split()]


class SshLab:
    """The whole lab: a signing nix-daemon, two LAN hosts, the key owner.

    `lan_nix` makes both hosts run another root's Nix (see LanHost); `first_host`
    numbers them, so that two labs in one process do not share addresses.
    """

    def __init__(self, root: Path, lan_nix: Path | None = None, first_host: int = 0) -> None:
        self.root = root
        root.mkdir(mode=0o755, exist_ok=True)
        self.secret_key, self.public_key = signing_key(root)
        # A key made by nixspool itself (issue: signing), which the LAN hosts trust too;
        # the daemon does not sign with it, so only nixspool's signing puts it on paths.
        from nixspool import sign

        secret, self.nixspool_public_key = sign.generate("nixspool-cache-key")
        self.nixspool_key = root / "nixspool-cache-key.sec"
        self.nixspool_key.write_text(secret + "\n")
        self.nixspool_key.chmod(0o600)
        # Its hook records into a spool of the lab, never the machine's default one.
        hook_config = root / "hook.toml"
        hook_config.write_text(f'spool = "{root / "hook-spool" / "spool.sqlite"}"\n')
        self.daemon = NixDaemon(
            root / "nix",
            installed_program("nixspool-hook"),
            env={"NIXSPOOL_CONFIG": str(hook_config)},
            extra_conf=f"secret-key-files = {self.secret_key}\n",
        )
        self.hosts: list[LanHost] = []
        self._unsigned: NixDaemon | None = None
        try:
            self.alice = KeyOwner()
            trusted = f"{self.public_key} {self.nixspool_public_key}"
            for i in range(first_host, first_host + 2):
                self.hosts.append(LanHost(root / f"lan{i}", i, trusted, nix_root=lan_nix))
            for host in self.hosts:
                host.authorize(self.alice.public_key)
                self.alice.know(host)
        except BaseException:
            self.close()  # the daemon and the hosts made so far
            raise
        self.expr = write_expr(root)

    def config(self, work: Path, body: str = "", **top: object) -> Path:
        """A nixspool config in `work`: its own spool, alice as user, both hosts."""
        work.mkdir(parents=True, exist_ok=True)
        work.chmod(0o755)
        settings = {
            "spool": str(work / "spool" / "spool.sqlite"),
            "user": ALICE,
            "connect_timeout": 3,
            "retry_min": 1,
            "retry_max": 5,
            **top,
        }
        lines = [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
        text = (
            "\n".join(lines)
            + "\n"
            + (
                body
                or (
                    f'\n[remotes.pi]\nurl = "ssh-ng://{self.hosts[0].alias}"\n'
                    f'\n[remotes.nas]\nurl = "ssh://{self.hosts[1].alias}"\n'
                )
            )
        )
        path = work / "config.toml"
        path.write_text(text)
        return path

    def build(
        self, count: int = 6, bytes_each: int = 0, daemon: NixDaemon | None = None
    ) -> set[str]:
        """Build `count` fresh derivations (some with 2 outputs, some with a dependency)
        and return all their outputs."""
        args = {"nonce": nonce(), "count": str(count), "bytes": str(bytes_each)}
        (daemon or self.daemon).build(self.expr, args)
        return expected_outputs(self.daemon, self.expr, args)

    def spool_in(self, config: Path, outputs: set[str]) -> None:
        """Record outputs as the hook would have (the hook itself is tested elsewhere)."""
        cfg = nixspool_config.load(str(config))
        owner = Owner.of_user(cfg.user) if cfg.user else None
        with Spool.open(cfg.spool, owner) as s, s.transaction():
            rows.store(s.conn, [rows.Record("", sorted(outputs), [], time.time())])

    def alice_spool(self, work: Path) -> tuple[Path, Path]:
        """(config, spool) in `work`: a spool alice owns, as setup leaves it, and one
        file:// remote she can write (the adversarial and security tests' target)."""
        cache = work / "cache"
        cache.mkdir(parents=True)
        sh("chown", ALICE, str(cache))
        config = self.config(work, f'\n[remotes.cache]\nurl = "file://{cache}"\n')
        spool = work / "spool" / "spool.sqlite"
        Spool.open(str(spool), Owner.of_user(ALICE)).close()
        return config, spool

    def nixspool(
        self, config: Path, *args: str, timeout: float = 300, path: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """The installed `nixspool`, as root, as systemd or NetworkManager would start it
        (`path`: another PATH, e.g. one without Nix)."""
        return subprocess.run(
            [installed_program("nixspool"), "--config", str(config), *args],
            env=self.daemon.root_env(path),
            text=True,
            capture_output=True,
            timeout=timeout,
            check=False,
        )

    def rows(self, config: Path, remote: str) -> dict[str, dict[str, Any]]:
        """`nixspool list --json` for one remote, by path."""
        listed = self.nixspool(config, "list", "--json", "--remote", remote)
        assert listed.returncode == 0, listed.stderr
        return {r["path"]: r for r in json.loads(listed.stdout)}

    @property
    def unsigned(self) -> NixDaemon:
        """A nix-daemon on the same store that signs nothing it builds."""
        if self._unsigned is None:
            self._unsigned = NixDaemon(self.root / "nix-unsigned", None)
        return self._unsigned

    def close(self) -> None:
        for host in self.hosts:
            host.close()
        self.daemon.stop()
        if self._unsigned is not None:
            self._unsigned.stop()
