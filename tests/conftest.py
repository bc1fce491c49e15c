from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import lab
from nixspool import config as nixspool_config
from nixspool import record
from nixspool.spool import Owner, Spool


@pytest.fixture
def hook_env(tmp_path: Path) -> Callable[..., dict[str, str]]:
    """An environment for running nixspool-hook against a spool in tmp_path."""

    def make(drv: str = "", outs: str = "", spool: Path | None = None) -> dict[str, str]:
        spool = spool or tmp_path / "spool" / "spool.sqlite"
        config = tmp_path / "config.toml"
        text = f'spool = "{spool}"\n'
        if not config.exists() or config.read_text() != text:
            config.write_text(text)  # not on every call: hooks may be reading it
        return {
            "PATH": os.environ["PATH"],
            "NIXSPOOL_CONFIG": str(config),
            "DRV_PATH": drv,
            "OUT_PATHS": outs,
        }

    return make


@pytest.fixture
def run_hook() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the installed nixspool-hook as Nix does: no stdin, its own environment."""
    hook = lab.installed_program("nixspool-hook")

    def run(env: dict[str, str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [hook],
            env=env,
            stdin=subprocess.DEVNULL,
            text=True,
            capture_output=True,
            timeout=30,
            **kwargs,
        )  # type: ignore

    return run


@pytest.fixture(scope="session")
def nix_lab() -> Iterator[Path]:
    """Root of a lab directory, once the lab's prerequisites are known to be there.

    Not under pytest's tmp_path: that is 0700 root, and the lab's other users
    (the builder, the flusher's user) must reach files in it.
    """
    lab.require_lab()
    lab.ensure_user(lab.BUILDER, groups=["nix-users"])
    root = Path(tempfile.mkdtemp(prefix="nixspool-lab-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


class SshLab:
    """The whole lab: a signing nix-daemon, two LAN hosts, the key owner."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(mode=0o755, exist_ok=True)
        self.secret_key, self.public_key = lab.signing_key(root)
        self.daemon = lab.NixDaemon(
            root / "nix",
            lab.installed_program("nixspool-hook"),
            extra_conf=f"secret-key-files = {self.secret_key}\n",
        )
        self.alice = lab.KeyOwner(root)
        self.hosts = [lab.LanHost(root / f"lan{i}", i, self.public_key) for i in range(2)]
        for host in self.hosts:
            host.authorize(self.alice.public_key)
            self.alice.know(host)
        self.expr = lab.write_expr(root)
        self.count = 0

    def config(self, work: Path, body: str = "", **top: object) -> Path:
        """A nixspool config in `work`: its own spool, alice as user, both hosts."""
        work.mkdir(parents=True, exist_ok=True)
        work.chmod(0o755)
        settings = {
            "spool": str(work / "spool" / "spool.sqlite"),
            "user": lab.ALICE,
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
        self, count: int = 6, bytes_each: int = 0, daemon: lab.NixDaemon | None = None
    ) -> set[str]:
        """Build `count` fresh derivations (some with 2 outputs, some with a dependency)
        and return all their outputs."""
        args = {"nonce": lab.nonce(), "count": str(count), "bytes": str(bytes_each)}
        (daemon or self.daemon).build(self.expr, args)
        return lab.expected_outputs(self.daemon, self.expr, args)

    def spool_in(self, config: Path, outputs: set[str]) -> None:
        """Record outputs as the hook would have (the hook itself is tested elsewhere)."""
        cfg = nixspool_config.load(str(config))
        owner = Owner.of_user(cfg.user) if cfg.user else None
        with Spool.open(cfg.spool, owner) as s, s.transaction():
            record.store(s.conn, [record.Record("", sorted(outputs), [], time.time())])

    def nixspool(
        self, config: Path, *args: str, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """The installed `nixspool`, as root, as systemd or NetworkManager would start it."""
        env = {"PATH": os.environ["PATH"], **self.daemon.client_env()}
        env.pop("NIX_REMOTE")
        return subprocess.run(
            [lab.installed_program("nixspool"), "--config", str(config), *args],
            env=env,
            text=True,
            capture_output=True,
            timeout=timeout,
            check=False,
        )

    def close(self) -> None:
        for host in self.hosts:
            host.close()
        self.daemon.stop()


@pytest.fixture(scope="session")
def ssh_lab(nix_lab: Path) -> Iterator[SshLab]:
    lab.require_lab("sshd", "ip", "ssh-keygen")
    the_lab = SshLab(nix_lab / "ssh")
    try:
        yield the_lab
    finally:
        the_lab.close()
