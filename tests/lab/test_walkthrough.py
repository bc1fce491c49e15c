"""The walkthrough (docs/walkthrough.md), run as written, on a throwaway machine.

Every block marked `<!-- walkthrough: MACHINE USER -->` in docs/walkthrough.md runs in order:
the laptop is this root, alice a fresh account on it; the Pi is a LAN host of the
lab (its own address and sshd in a network namespace), with `cache` created by the
walkthrough's own commands. Then alice builds, `nixspool flush` runs, and the build must
be in the Pi's store. A step that fails as documented fails this test.

What the lab must do differently from a real laptop and Pi, and nothing else:
- no network: `apt-get install` checks the packages are there (tests/run installed
  them) and pip installs from the wheelhouse tests/run prepared;
- `pi.home.arpa` is an /etc/hosts line for the LAN host's address;
- the Pi shares this machine's filesystem, so `cache` gets a store of its own
  (`store = local?root=...`), as a real Pi has its own /nix/store;
- no systemd here (tests/run --systemd runs the units): `systemctl restart
  nix-daemon` restarts the daemon this test started, other systemctl lines are
  skipped; the daemon's nix.conf gets the lab's two lines (no sandbox in a chroot,
  no substituters);
- the walkthrough's placeholders are filled with what the earlier steps printed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import lab
from nixspool import setup

pytestmark = pytest.mark.integration

WALKTHROUGH = Path(__file__).parents[2] / "docs" / "walkthrough.md"
CHECKOUT = Path(__file__).parents[2]
THROWAWAY = Path("/etc/nixspool-test-root")  # written by tests/platform/root
WHEELS = os.environ.get("NIXSPOOL_WHEELS", "/opt/nixspool-wheels")
DAEMON_SOCKET = Path("/nix/var/nix/daemon-socket/socket")
NIX_CONF = Path("/etc/nix/nix.conf")
MARK = ".made-by-nixspool-walkthrough"
# What `nixspool setup` may create here, removed after unless it was there before.
SETUP_WRITES = [
    Path("/etc/nixspool"),
    Path("/var/lib/nixspool"),
    *(Path("/", setup.UNIT_DIR, unit) for unit in setup.UNITS),
    Path("/", setup.DISPATCHER),
    Path("/", setup.NETWORKD_DISPATCHER),
]
STEP = re.compile(
    r"<!-- walkthrough: (?P<machine>laptop|pi) (?P<who>\S+)(?: (?P<file>\S+))? -->\n"
    r"```[a-z]*\n(?P<text>.*?)```",
    re.DOTALL,
)


@dataclass(frozen=True)
class Step:
    machine: str  # laptop or pi
    who: str  # root, alice, or `append` (then `file` is where the lines go)
    file: str | None
    text: str


def steps() -> list[Step]:
    found = [
        Step(m["machine"], m["who"], m["file"], m["text"])
        for m in STEP.finditer(WALKTHROUGH.read_text())
    ]
    assert len(found) >= 6, "docs/walkthrough.md lost its markers"
    return found


class Daemon:
    """The laptop's nix-daemon, where Nix puts it: the default socket, /etc/nix."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        DAEMON_SOCKET.parent.mkdir(parents=True, exist_ok=True)
        DAEMON_SOCKET.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            ["nix-daemon"],
            env={"PATH": os.environ["PATH"]},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        lab.wait_until_accepting(DAEMON_SOCKET, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(timeout=20)


def remove_user(name: str) -> None:
    home = Path(os.path.expanduser(f"~{name}"))
    if subprocess.run(["id", name], capture_output=True).returncode != 0:
        return
    assert (home / MARK).exists(), f"a user {name} exists that this test did not make"
    subprocess.run(["userdel", "-r", name], capture_output=True)


@dataclass
class Machines:
    daemon: Daemon
    pi_store: Path  # the Pi's own store, made for `cache` once the walkthrough made it


@pytest.fixture
def machines() -> Iterator[Machines]:
    """This root as the laptop, a LAN host as the Pi; everything put back after."""
    if not THROWAWAY.exists():
        pytest.skip("changes the machine (users, /etc/nix/nix.conf): only in a tests/run root")
    assert Path(WHEELS).is_dir(), f"no wheelhouse at {WHEELS}: run `bash tests/run --prepare`"
    assert not lab.accepts(DAEMON_SOCKET), "a nix-daemon already runs here"
    saved = {p: p.read_bytes() if p.exists() else None for p in (NIX_CONF, Path("/etc/hosts"))}
    made = [p for p in SETUP_WRITES if not p.exists()]
    for name in ("alice", "cache"):
        remove_user(name)  # left by an interrupted run
    lab.ensure_user("alice")
    (Path("/home/alice") / MARK).touch()
    # Not under pytest's tmp_path (0700): `cache` must reach its store.
    base = Path(tempfile.mkdtemp(prefix="nixspool-walkthrough-"))
    base.chmod(0o755)
    pi = lab.LanHost(base / "pi", 6, "unused:key")
    daemon = Daemon()
    try:
        with open("/etc/hosts", "a") as hosts:
            hosts.write(f"{pi.address} pi.home.arpa\n")
        with NIX_CONF.open("a") as conf:
            conf.write("sandbox = false\nsubstituters =\n")  # the lab's lines
        daemon.start()
        yield Machines(daemon, base / "pi-store")
    finally:
        daemon.stop()
        pi.close()
        shutil.rmtree(base)
        for path, text in saved.items():
            if text is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(text)
        for path in made:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        for key in ("laptop-1.sec", "laptop-1.pub"):
            Path("/etc/nix", key).unlink(missing_ok=True)
        for name in ("alice", "cache"):
            remove_user(name)


def run(who: str, script: str, env: dict[str, str] | None = None) -> str:
    argv = ["bash", "-euo", "pipefail", "-c", script]
    if who == "root":
        result = subprocess.run(
            argv,
            env={"PATH": os.environ["PATH"], "HOME": "/root", **(env or {})},
            capture_output=True,
            text=True,
            cwd="/",
            timeout=300,
        )
    else:
        result = lab.run_as(who, argv, env or {}, cwd=os.path.expanduser(f"~{who}"), timeout=300)
    assert result.returncode == 0, f"as {who}:\n{script}\nfailed:\n{result.stdout}{result.stderr}"
    return result.stdout


def as_the_lab_runs_it(text: str, filled: dict[str, str]) -> list[str]:
    """The block with its placeholders filled, apt-get as a check, and cut into
    the parts before and after `systemctl restart nix-daemon`."""
    text = text.replace("/path/to/nixspool", str(CHECKOUT))
    for placeholder, value in filled.items():
        text = text.replace(placeholder, value)
    assert not re.search(r"<[a-z][^<>]*>", text), f"an unfilled placeholder in:\n{text}"
    parts = [""]
    for line in text.splitlines(keepends=True):
        if line.startswith("apt-get install -y "):
            packages = line.split()[3:]
            line = (
                f"for p in {' '.join(packages)}; do dpkg-query -W -f='${{Status}}' $p"
                " | grep -q 'install ok installed'; done\n"
            )
        if line.strip() == "systemctl restart nix-daemon":
            parts.append("")
        elif not line.startswith("systemctl "):
            parts[-1] += line
    return parts


def give_the_pi_its_store(store: Path) -> None:
    conf = Path("/home/cache/.config/nix/nix.conf")
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(f"store = local?root={store}\n")
    store.mkdir(exist_ok=True)
    subprocess.run(["chown", "-R", "cache", "/home/cache/.config", str(store)], check=True)
    (Path("/home/cache") / MARK).touch()


def test_the_readme_walkthrough_works_as_written(machines: Machines) -> None:
    filled: dict[str, str] = {}
    offline_pip = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": WHEELS}
    restarts = 0
    for step in steps():
        if step.who == "append":
            assert step.file is not None
            with open(step.file, "a") as f:
                f.write(step.text)
            continue
        if step.machine == "pi" and Path("/home/cache").is_dir() and not machines.pi_store.exists():
            give_the_pi_its_store(machines.pi_store)
        for i, part in enumerate(as_the_lab_runs_it(step.text, filled)):
            if i:
                machines.daemon.stop()
                machines.daemon.start()
                restarts += 1
            out = run(step.who, part, offline_pip if step.who == "root" else None)
            if "cat ~/.ssh/id_ed25519.pub" in part:
                filled["<the line alice printed>"] = out.strip().splitlines()[-1]
        public = Path("/etc/nix/laptop-1.pub")
        if public.exists():
            filled["<the content of laptop-1.pub>"] = public.read_text().strip()
    assert restarts == 1, "the walkthrough no longer restarts nix-daemon"
    # setup left the hook starting its Python directly: the build below runs it.
    hook = Path("/opt/nixspool/bin/nixspool-hook").read_text()
    assert hook.startswith("#!/opt/nixspool/bin/python3 -IS\n"), hook[:200]

    # "From now on every build is recorded; ... `nixspool flush` delivers it."
    nonce = time.time_ns()
    built = run(
        "alice",
        'nix-build --no-out-link -E \'derivation { name = "walkthrough"; '
        'system = builtins.currentSystem; builder = "/bin/sh"; '
        f'args = [ "-c" "echo {nonce} > $out" ]; }}\'\n',
    ).strip()
    assert built.startswith("/nix/store/"), built
    # alice, the spool's owner, reads the same spool as root (the one setup made).
    for who in ("root", "alice"):
        status = json.loads(run(who, "/opt/nixspool/bin/nixspool status --json"))
        assert status["totals"]["queued"] == 1, (who, status)
    run("root", "/opt/nixspool/bin/nixspool flush")
    on_pi = subprocess.run(
        ["nix-store", "--store", f"local?root={machines.pi_store}", "-q", "--hash", built],
        capture_output=True,
        text=True,
    )
    assert on_pi.returncode == 0, f"{built} is not on the Pi: {on_pi.stderr}"
