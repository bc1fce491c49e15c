"""Security, tested as the attacker would: a real second user, real links, a live flush.

The ownership model (docs/security.md#ownership): root works in a spool directory it does
not own with its owner's rights only, so nothing planted there can make root
write outside it; a root-owned spool directory is used only where nobody else
could swap it. Here alice (the configured user, who owns the spool) plants links,
bob (another local user) tries to queue, sign and read, and a flush started as
root is watched from /proc while it runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lab
from nixspool import nix
from nixspool.spool import Owner, Spool

pytestmark = pytest.mark.integration

H = "0123456789abcdfghijklmnpqrsvwxyz"
BOB = "nixspool-bob"
# Every name nixspool or SQLite keeps beside the spool, and the GC roots' directory.
NAMES = [
    "spool.sqlite",
    "spool.sqlite-wal",
    "spool.sqlite-shm",
    "spool.sqlite.fallback.jsonl",
    "spool.sqlite.fallback.jsonl.importing",
    "spool.sqlite.ballast",
    "spool.sqlite.flush.lock",
]


def out(name: str) -> str:
    return f"/nix/store/{H}-{name}"


class Victims:
    """Files and a directory of root's that nothing in the spool may touch."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(mode=0o755, parents=True)
        self.file = root / "precious"
        self.file.write_text("root's own\n")
        self.file.chmod(0o644)  # alice can read it: a link to it opens for her
        self.hidden = root / "private"
        self.hidden.mkdir(mode=0o700)
        self.absent = self.hidden / "never-created"
        self.before = self.snapshot()

    def snapshot(self) -> list[tuple[str, int, int, int, int, bytes]]:
        found = []
        for path in sorted(self.root.rglob("*")):
            st = path.lstat()
            data = path.read_bytes() if path.is_file() else b""
            found.append((str(path), st.st_mode, st.st_uid, st.st_gid, st.st_size, data))
        return found

    def assert_untouched(self, case: str) -> None:
        assert self.snapshot() == self.before, f"root wrote outside the spool: {case}"


def hook_as_nix_runs_it(config: Path, name: str) -> subprocess.CompletedProcess[str]:
    """The installed hook as root, as nix-daemon runs it."""
    return subprocess.run(
        [lab.installed_program("nixspool-hook")],
        env={
            "PATH": os.environ["PATH"],
            "NIXSPOOL_CONFIG": str(config),
            "DRV_PATH": out(f"{name}.drv"),
            "OUT_PATHS": out(name),
        },
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )


def as_alice(*argv: str) -> None:
    result = lab.run_as(lab.ALICE, list(argv), {})
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "dangling"])
def test_links_planted_at_every_name_never_make_root_write_outside(
    ssh_lab: lab.SshLab, kind: str
) -> None:
    """For each name, alice puts a link where the file was; the hook, `status` and
    `flush` then run as root. A hard link to a file of root's is what alice could
    make on a kernel without fs.protected_hardlinks (this one refuses her), so root
    makes it for her here."""
    base = ssh_lab.root / "planted" / kind
    victims = Victims(base / "victims")
    for name in NAMES:
        config, spool = ssh_lab.alice_spool(base / name)
        planted = spool.parent / name
        target = victims.absent if kind == "dangling" else victims.file
        if kind == "hardlink":
            planted.unlink(missing_ok=True)
            os.link(target, planted)
        else:
            as_alice("ln", "-sfn", str(target), str(planted))

        hooked = hook_as_nix_runs_it(config, name.replace(".", "-"))
        assert hooked.returncode == 0
        assert "Traceback" not in hooked.stderr, hooked.stderr
        for command in (["status"], ["flush"], ["add", out("by-hand")]):
            result = ssh_lab.nixspool(config, *command)
            assert "Traceback" not in result.stderr, (name, command, result.stderr)
        victims.assert_untouched(f"{kind} at {name}")


def test_a_planter_racing_root_never_gets_it_to_write_outside(ssh_lab: lab.SshLab) -> None:
    """No check before an open closes the race with a link planted right after it:
    alice swaps links in and out at SQLite's and the journal's names as fast as she
    can while root's hooks and commands work in her directory."""
    base = ssh_lab.root / "racing"
    victims = Victims(base / "victims")
    config, spool = ssh_lab.alice_spool(base / "alice")
    racer = base / "racer.py"
    racer.write_text(
        "import os, sys, time\n"
        "victim, directory = sys.argv[1], sys.argv[2]\n"
        "names = [n for n in os.listdir(directory)] + ['spool.sqlite.fallback.jsonl']\n"
        "end = time.monotonic() + float(sys.argv[3])\n"
        "while time.monotonic() < end:\n"
        "    for name in names:\n"
        "        tmp = os.path.join(directory, '.plant')\n"
        "        try:\n"
        "            os.symlink(victim, tmp)\n"
        "            os.rename(tmp, os.path.join(directory, name))\n"
        "        except OSError:\n"
        "            pass\n"
    )
    racer.chmod(0o644)
    argv = [sys.executable, str(racer), str(victims.file), str(spool.parent), "8"]
    planter = subprocess.Popen(["runuser", "-u", lab.ALICE, "--", *argv])
    try:
        deadline = time.monotonic() + 7
        runs = 0
        while time.monotonic() < deadline:
            assert hook_as_nix_runs_it(config, f"race-{runs}").returncode == 0
            if runs % 10 == 0:
                result = ssh_lab.nixspool(config, "status")
                assert "Traceback" not in result.stderr, result.stderr
            runs += 1
    finally:
        planter.wait(timeout=30)
    assert runs > 20
    victims.assert_untouched("racing links")


def test_a_spool_directory_swapped_for_a_link_is_not_entered(ssh_lab: lab.SshLab) -> None:
    """alice owns the directory above the spool's, so she can swap the spool's
    directory for a link to one of root's. The hook refuses it and records in the
    journal beside the default spool, which is a tmpfs here (a private mount
    namespace), so that this machine's own spool is never touched."""
    base = ssh_lab.root / "swapped"
    victims = Victims(base / "victims")
    home = base / "alice-home"
    home.mkdir(parents=True)
    lab.sh("chown", lab.ALICE, str(home))
    config = ssh_lab.config(base, '\n[remotes.cache]\nurl = "file:///nonexistent"\n')
    config.write_text(config.read_text().replace(str(base / "spool"), str(home / "spool")))
    Spool.open(str(home / "spool" / "spool.sqlite"), Owner.of_user(lab.ALICE)).close()
    as_alice("mv", str(home / "spool"), str(home / "old"))
    as_alice("ln", "-s", str(victims.hidden), str(home / "spool"))

    script = (
        "mount -t tmpfs -o mode=0755 tmpfs /var/lib && "
        f"{lab.installed_program('nixspool-hook')} && "
        "cat /var/lib/nixspool/spool.sqlite.fallback.jsonl"
    )
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        env={
            "PATH": os.environ["PATH"],
            "NIXSPOOL_CONFIG": str(config),
            "DRV_PATH": out("swapped.drv"),
            "OUT_PATHS": out("swapped"),
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "is a symbolic link" in result.stderr
    assert out("swapped") in result.stdout  # recorded, beside the default spool
    victims.assert_untouched("the spool's directory swapped for a link")


@pytest.fixture(scope="module")
def bob() -> str:
    lab.ensure_user(BOB, groups=["nix-users"])
    return BOB


def test_a_second_user_cannot_queue_sign_upload_or_read_the_key(
    ssh_lab: lab.SshLab, bob: str, tmp_path: Path
) -> None:
    """bob, a local user who may build through the daemon, against a spool alice owns
    and a signing key only she and root read."""
    work = ssh_lab.root / "bob"
    key = work / "cache-key.sec"
    work.mkdir()
    key.write_bytes(ssh_lab.nixspool_key.read_bytes())
    lab.sh("chown", lab.ALICE, str(key))
    key.chmod(0o600)
    body = f'\n[remotes.pi]\nurl = "ssh-ng://{ssh_lab.hosts[0].alias}"\nsign_key_file = "{key}"\n'
    config = ssh_lab.config(work, body)
    config.chmod(0o644)
    spool = work / "spool" / "spool.sqlite"
    Spool.open(str(spool), Owner.of_user(lab.ALICE)).close()
    env = {**ssh_lab.daemon.client_env(), "XDG_DATA_HOME": f"/home/{bob}/data"}

    # A path of bob's choosing in the store, and a build (through the daemon, whose
    # hook records it) whose output refers to it.
    chosen = work / "chosen"
    chosen.write_text("bob's bytes\n")
    chosen.chmod(0o644)
    added = lab.run_as(bob, ["nix-store", "--add", str(chosen)], env)
    assert added.returncode == 0, added.stderr
    added_path = added.stdout.strip()
    expr = work / "bob.nix"
    expr.write_text(  # refers to the file, so the output refers to the added path
        f'derivation {{ name = "bobs-build-{lab.nonce()}"; system = builtins.currentSystem; '
        f'builder = "/bin/sh"; args = ["-c" "echo ${{{chosen}}} > $out"]; }}\n'
    )
    expr.chmod(0o644)
    built = lab.run_as(bob, ["nix-build", "--no-out-link", str(expr)], env)
    assert built.returncode == 0, built.stderr
    bobs_build = built.stdout.strip()

    # bob records by hand, three ways; none reaches alice's spool.
    nixspool = [lab.installed_program("nixspool"), "--config", str(config)]
    tries = {
        "hook": lab.run_as(
            bob,
            [lab.installed_program("nixspool-hook")],
            {**env, "NIXSPOOL_CONFIG": str(config), "OUT_PATHS": added_path},
        ),
        "add": lab.run_as(bob, [*nixspool, "add", added_path], env),
        "flush": lab.run_as(bob, [*nixspool, "flush"], env),
        "write": lab.run_as(bob, ["sh", "-c", f"echo x >> {spool}"], env),
        "journal": lab.run_as(bob, ["sh", "-c", f"echo x >> {spool}.fallback.jsonl"], env),
        "key": lab.run_as(bob, ["cat", str(key)], env),
    }
    assert tries["hook"].returncode == 0  # a hook never fails a build
    for what in ("add", "flush", "write", "journal", "key"):
        assert tries[what].returncode != 0, what
    assert "Traceback" not in "".join(t.stderr for t in tries.values())
    assert key.read_text() not in "".join(t.stdout + t.stderr for t in tries.values())

    # What the daemon's hook recorded for bob's build goes through alice's spool
    # (a build by the daemon is what a cache signs); bob's added path goes along
    # as its dependency, unsigned by our key.
    ssh_lab.spool_in(config, {bobs_build})
    flushed = ssh_lab.nixspool(config, "--debug", "flush", "--json")
    assert flushed.returncode == 0, flushed.stderr
    with Spool.open(str(spool), Owner.of_user(lab.ALICE)) as s:
        recorded = {p for (p,) in s.conn.execute("SELECT path FROM paths")}
    assert recorded == {bobs_build}
    infos = nix.path_infos([bobs_build, added_path], env=ssh_lab.daemon.client_env())
    ours = "nixspool-cache-key:"
    assert any(sig.startswith(ours) for sig in infos[bobs_build].signatures)
    assert not any(sig.startswith(ours) for sig in infos[added_path].signatures)


def _tree(root_pid: int) -> dict[int, dict[str, str]]:
    """Every live process under root_pid: its uids, command line, environment, parent."""
    children: dict[int, list[int]] = {}
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
        parents[int(entry)] = parent
    found: dict[int, dict[str, str]] = {}
    todo = [root_pid]
    while todo:
        pid = todo.pop()
        try:
            # The command line before the uids: a child changes uid before it execs,
            # so uids read after a command line are at least as new as the program
            # it names. (Read the other way round, a child that was still root's
            # copy of nixspool when its status was read, and was nix when its
            # command line was, looked like nix running as root.)
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
            status = Path(f"/proc/{pid}/status").read_text()
            found[pid] = {
                "uids": next(line for line in status.splitlines() if line.startswith("Uid:")),
                "cmdline": cmdline,
                "environ": environ,
                "parent": str(parents.get(pid, 0)),
            }
        except (OSError, StopIteration):
            continue
        todo += children.get(pid, [])
    return found


def test_a_root_flush_runs_ssh_and_nix_copy_as_the_user_and_never_shows_the_key(
    ssh_lab: lab.SshLab,
) -> None:
    """A signing flush of large paths over a slow link, started as root with
    --debug, watched from /proc every few milliseconds while it runs."""
    host = ssh_lab.hosts[0]
    host.wipe()
    secret = ssh_lab.nixspool_key.read_text().strip()
    secret_half = secret.split(":", 1)[1]
    work = ssh_lab.root / "process-tree"
    body = (
        f'\n[remotes.pi]\nurl = "ssh-ng://{host.alias}"\nsign_key_file = "{ssh_lab.nixspool_key}"\n'
        f'\n[remotes.nas]\nurl = "ssh://{ssh_lab.hosts[1].alias}"\n'
    )
    config = ssh_lab.config(work, body)
    outputs = ssh_lab.build(3, bytes_each=4 << 20)
    ssh_lab.spool_in(config, outputs)
    alice = Owner.of_user(lab.ALICE).uid
    env = ssh_lab.daemon.root_env()
    host.shape("20mbit")
    try:
        flush = subprocess.Popen(
            [lab.installed_program("nixspool"), "--config", str(config), "--debug", "flush"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Every snapshot of every process: a child is first a copy of its parent
        # (root, nixspool's command line) until it switches user and execs.
        seen: dict[int, list[dict[str, str]]] = {}
        while flush.poll() is None:
            for pid, info in _tree(flush.pid).items():
                if info not in seen.setdefault(pid, []):
                    seen[pid].append(info)
            time.sleep(0.005)
        stdout, stderr = flush.communicate(timeout=60)
    finally:
        host.shape(None)
    assert flush.returncode == 0, stderr
    snapshots = [
        (pid, info, info["cmdline"].split("\0")) for pid, infos in seen.items() for info in infos
    ]

    # ssh, the probe (an SSH login of its own), and every Nix command that talks to
    # a remote (`nix copy`, the read-back of signatures); local ones (`nix path-info`
    # of our own store) may be root's.
    def talks_to_remote(argv: list[str]) -> bool:
        name = os.path.basename(argv[0])
        if name == "ssh" or "nixspool.probe" in argv:
            return True
        remote = any(a.startswith(("ssh://", "ssh-ng://")) for a in argv)
        return name in ("nix", "nix-store") and (remote or "copy" in argv)

    transfers = [(argv, info) for _, info, argv in snapshots if talks_to_remote(argv)]
    assert any(os.path.basename(argv[0]) == "ssh" for argv, _ in transfers), seen
    for argv, info in transfers:
        real, effective = info["uids"].split()[1:3]
        assert (int(real), int(effective)) == (alice, alice), (argv, info["uids"])

    # ssh itself runs commands through the user's shell: Nix's LocalCommand (how
    # Nix 2.26+ learns the connection is up), the lab's KnownHostsCommand (it logs
    # who ran ssh). Nothing else may start one.
    by_ssh = ([f"id -u >> {ssh_lab.alice.uid_log}"], ["echo started"])
    shells = [
        argv
        for _, _, argv in snapshots
        if os.path.basename(argv[0]) in ("sh", "bash", "dash")
        and not any(argv[2:3] == command for command in by_ssh)
    ]
    assert shells == [], f"a shell ran in the flush's process tree: {shells}"
    for _, info, argv in snapshots:
        assert secret_half not in info["cmdline"] + info["environ"], argv
    assert secret_half not in stdout + stderr
    assert "$ " in stderr  # --debug did show the commands


def test_the_key_never_appears_in_errors(ssh_lab: lab.SshLab) -> None:
    """A key nixspool refuses, or one the remote refuses: the error names the file,
    never its contents."""
    work = ssh_lab.root / "key-errors"
    work.mkdir()
    secret = ssh_lab.nixspool_key.read_text().strip()
    cases = {
        "readable": (secret, 0o644),
        "truncated": (secret[:-10], 0o600),
        "wrong-name": ("other" + secret[secret.index(":") :], 0o600),
    }
    for name, (text, mode) in cases.items():
        key = work / f"{name}.sec"
        key.write_text(text + "\n")
        key.chmod(mode)
        config = ssh_lab.config(
            work / name,
            f'\n[remotes.pi]\nurl = "ssh-ng://{ssh_lab.hosts[0].alias}"\nsign_key_file = "{key}"\n',
        )
        ssh_lab.spool_in(config, ssh_lab.build(1))
        result = ssh_lab.nixspool(config, "--debug", "flush", "--json")
        shown = result.stdout + result.stderr
        assert result.returncode != 0 or name == "wrong-name", (name, shown)
        assert "Traceback" not in shown, shown
        assert secret.split(":", 1)[1][:20] not in shown, name
        assert text.split(":", 1)[1][:20] not in shown, name


def test_sigterm_to_a_root_flush_leaves_no_child_running(ssh_lab: lab.SshLab) -> None:
    """What a person's Ctrl-C or systemd's stop does: the flush's children (as alice)
    go with it; nothing keeps uploading as the user after the flush is gone."""
    host = ssh_lab.hosts[0]
    host.wipe()
    config = ssh_lab.config(ssh_lab.root / "sigterm")
    ssh_lab.spool_in(config, ssh_lab.build(2, bytes_each=4 << 20))
    env = ssh_lab.daemon.root_env()
    host.shape("10mbit")
    try:
        flush = subprocess.Popen(
            [lab.installed_program("nixspool"), "--config", str(config), "flush"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 20
        while not any(
            os.path.basename(i["cmdline"].split("\0")[0]) == "ssh"
            for i in _tree(flush.pid).values()
        ):
            assert time.monotonic() < deadline and flush.poll() is None
            time.sleep(0.01)
        children = set(_tree(flush.pid)) - {flush.pid}
        flush.send_signal(signal.SIGTERM)
        flush.wait(timeout=30)
    finally:
        host.shape(None)
    deadline = time.monotonic() + 0.5  # killed as one group: gone within the old bound
    while True:
        alive: dict[int, dict[str, str]] = {}
        for pid in children:
            alive.update(_tree(pid))
        if not alive:
            break
        assert time.monotonic() < deadline, f"children outlived the flush: {alive}"
        time.sleep(0.05)
    assert json.loads(ssh_lab.nixspool(config, "status", "--json").stdout)["paths"] > 0
