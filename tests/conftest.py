from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import lab


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


@pytest.fixture(scope="session")
def ssh_lab(nix_lab: Path) -> Iterator[lab.SshLab]:
    lab.require_lab("sshd", "ip", "ssh-keygen")
    the_lab = lab.SshLab(nix_lab / "ssh")
    try:
        yield the_lab
    finally:
        the_lab.close()
