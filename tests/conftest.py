"""The fixtures of both tiers: running the installed hook as Nix does (unit and
lab), the lab's directory and LAN hosts, and guards that a run with lab tests
leaves this machine's own spool, config and GC roots as it found them. One
conftest for both tiers: pytest puts this directory on sys.path for it, so
`programs` imports from either, and mypy sees one module named conftest."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent / "lab"))  # the lab's helpers, for its fixtures
sys.path.insert(0, str(Path(__file__).parent / "unit"))  # data the lab reuses (test_nar.odd_tree)

from programs import installed_program

# How many examples a property test tries: a few in the fast tier (it must stay
# seconds on two cores), many where tests/run runs everything (NIXSPOOL_HYPOTHESIS=
# thorough). A test sets its own count only where its range needs more than that.
settings.register_profile("fast", max_examples=10)
settings.register_profile("thorough", max_examples=400)
settings.load_profile(os.environ.get("NIXSPOOL_HYPOTHESIS", "fast"))

if TYPE_CHECKING:
    import lab

LAB_TIER = Path(__file__).parent / "lab"


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
    hook = installed_program("nixspool-hook")

    def run(env: dict[str, str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        result: subprocess.CompletedProcess[str] = subprocess.run(  # type: ignore[call-overload]
            [hook],
            env=env,
            stdin=subprocess.DEVNULL,
            text=True,
            capture_output=True,
            timeout=30,
            **kwargs,
        )
        return result

    return run


def _machine_state() -> dict[str, object]:
    """What a test run must leave alone: this machine's own spool and config."""
    state: dict[str, object] = {}
    for where in (Path("/var/lib/nixspool"), Path("/etc/nixspool")):
        if where.is_dir():
            state.update({str(p): p.stat().st_mtime_ns for p in where.iterdir()})
    return state


def runs_the_lab(session: pytest.Session) -> bool:
    """The guards below are for runs with lab tests; the unit tier, as a normal
    user, leaves this machine's files alone, not even reading them."""
    return any(LAB_TIER in item.path.parents for item in session.items)


@pytest.fixture(scope="session", autouse=True)
def machine_spool_untouched(request: pytest.FixtureRequest) -> Iterator[None]:
    """A daemon of the lab whose hook fell back to the machine's default spool would
    queue test paths for upload on a developer's real machine: fail the run if any
    test wrote there. (The systemd tests own the machine they boot, and skip this.)"""
    if not runs_the_lab(request.session):
        yield
        return
    before = _machine_state()
    yield
    if os.environ.get("NIXSPOOL_TESTS_OWN_MACHINE") != "1":
        assert _machine_state() == before, "tests wrote to /var/lib/nixspool or /etc/nixspool"


MACHINE_GC_ROOTS = Path("/nix/var/nix/gcroots/nixspool")


@pytest.fixture(scope="session", autouse=True)
def machine_gc_roots_restored(request: pytest.FixtureRequest) -> Iterator[None]:
    """The lab's flushes root their queued paths where Nix looks for roots, this
    machine's /nix/var/nix/gcroots/nixspool (a root anywhere else is no root). Each
    lab spool has its own directory there: remove those, and give the directory
    back its owner and mode, so that the machine's own nixspool and `doctor` find
    it as they left it. The lab's spools are all new, so every new entry is ours."""
    if not runs_the_lab(request.session):
        yield
        return
    existed = MACHINE_GC_ROOTS.is_dir()
    before = set(os.listdir(MACHINE_GC_ROOTS)) if existed else set()
    st = MACHINE_GC_ROOTS.stat() if existed else None
    yield
    if os.environ.get("NIXSPOOL_TESTS_OWN_MACHINE") == "1" or not MACHINE_GC_ROOTS.is_dir():
        return
    for name in set(os.listdir(MACHINE_GC_ROOTS)) - before:
        shutil.rmtree(MACHINE_GC_ROOTS / name)
    if st is None:
        MACHINE_GC_ROOTS.rmdir()
    else:
        os.chown(MACHINE_GC_ROOTS, st.st_uid, st.st_gid)
        MACHINE_GC_ROOTS.chmod(st.st_mode & 0o7777)


@pytest.fixture(scope="session")
def nix_lab() -> Iterator[Path]:
    """Root of a lab directory, once the lab's prerequisites are known to be there.

    Not under pytest's tmp_path: that is 0700 root, and the lab's other users
    (the builder, the flusher's user) must reach files in it.
    """
    import lab  # only here: the unit tier runs without the lab's module

    lab.require_lab()
    lab.ensure_user(lab.BUILDER, groups=["nix-users"])
    root = Path(tempfile.mkdtemp(prefix="nixspool-lab-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def ssh_lab(nix_lab: Path) -> Iterator[lab.SshLab]:
    import lab

    lab.require_lab("sshd", "ip", "ssh-keygen")
    the_lab = lab.SshLab(nix_lab / "ssh")
    try:
        yield the_lab
    finally:
        the_lab.close()
