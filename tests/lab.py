"""The test lab: a real nix-daemon (and, for the flusher, real sshd hosts).

Everything here is real: Debian's Nix, real users, real sockets. It needs
root. Where the lab cannot be built, tests that need it are skipped on a
developer's machine but *fail* when NIXSPOOL_REQUIRE_LAB=1 (set by the
README's test command and so by CI), so CI can never pass by skipping them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

BUILDER = "nixspool-builder"


def require_lab(*commands: str) -> None:
    """Skip (or fail, under NIXSPOOL_REQUIRE_LAB=1) unless root with these commands."""
    missing = [c for c in ("nix-daemon", "nix-build", *commands) if shutil.which(c) is None]
    problem = None
    if os.geteuid() != 0:
        problem = "the lab needs root"
    elif missing:
        problem = f"the lab needs {', '.join(missing)} (see README: the test command installs it)"
    if problem:
        if os.environ.get("NIXSPOOL_REQUIRE_LAB") == "1":
            pytest.fail(f"NIXSPOOL_REQUIRE_LAB=1 but {problem}", pytrace=False)
        pytest.skip(problem)


def installed_program(name: str) -> str:
    """A program installed with nixspool, next to the interpreter running the tests."""
    candidate = Path(sys.prefix) / "bin" / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    assert found, f"{name} is not installed; run `pip install .` first"
    return found


def ensure_user(name: str, groups: Iterable[str] = ()) -> None:
    """Create a system user (idempotent), unlocked for key-based ssh."""
    if subprocess.run(["id", name], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)
        subprocess.run(["usermod", "-p", "*", name], check=True)
    for group in groups:
        subprocess.run(["usermod", "-a", "-G", group, name], check=True)


def run_as(
    user: str, argv: list[str], env: Mapping[str, str], **kwargs: object
) -> subprocess.CompletedProcess[str]:
    """Run argv as `user` (with a login-like environment plus `env`)."""
    home = os.path.expanduser(f"~{user}")
    full_env = {"HOME": home, "USER": user, "PATH": os.environ["PATH"], **env}
    return subprocess.run(
        ["runuser", "-u", user, "--", "env", *[f"{k}={v}" for k, v in full_env.items()], *argv],
        text=True,
        capture_output=True,
        **kwargs,
    )  # type: ignore[call-overload]


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
        daemon_env = {**os.environ, **self.env, **(env or {})}
        self.log = open(root / "daemon.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["nix-daemon"],
            env=daemon_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while not self.socket.exists():
            assert self.proc.poll() is None, (root / "daemon.log").read_text()
            assert time.monotonic() < deadline, "nix-daemon did not create its socket"
            time.sleep(0.02)

    def client_env(self) -> dict[str, str]:
        return {**self.env, "NIX_REMOTE": "daemon"}

    def build(
        self, expr: Path, args: Mapping[str, str], user: str = BUILDER, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        argv = ["nix-build", "--no-out-link", str(expr)]
        for name, value in args.items():
            argv += ["--argstr", name, value]
        result = run_as(user, argv, self.client_env())
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
        head -c ${toString size} /dev/urandom >> $out
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
