"""What an adversarial run found: the spool's owner, or a fault, acting against root.

The spool's directory belongs to the configured user (docs/security.md#ownership), and
root's hook and flusher work in it. Each test here plants what that user, or a
fault, could leave there, runs the real programs as root, and checks that root
neither follows it, nor hangs on it, nor crashes, nor uses a planted row.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

import lab
from nixspool import gcroots
from nixspool.spool import Owner

pytestmark = pytest.mark.integration

H = "0123456789abcdfghijklmnpqrsvwxyz"


def out(name: str) -> str:
    return f"/nix/store/{H}-{name}"


@pytest.fixture
def alices_spool(ssh_lab: lab.SshLab, request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """(config, spool) of a spool owned by alice, with a file:// remote she can write."""
    return ssh_lab.alice_spool(ssh_lab.root / "adversarial" / request.node.name)


def as_alice(ssh_lab: lab.SshLab, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = ssh_lab.daemon.client_env()
    return lab.run_as(
        lab.ALICE, [lab.installed_program("nixspool"), "--config", str(config), *args], env
    )


def test_journal_lines_that_are_not_store_paths_never_become_rows(
    ssh_lab: lab.SshLab, alices_spool
) -> None:
    config, spool = alices_spool
    journal = Path(str(spool) + ".fallback.jsonl")
    planted = ["--version", "/etc/passwd", "/nix/store/../../etc/shadow", "relative/x"]
    lines = [
        {"v": 1, "t": 1.0, "drv": "", "out": [value, out("kept")], "rej": []} for value in planted
    ]
    lines.append({"v": 1, "t": 1.0, "drv": "--store", "out": [], "rej": []})
    journal.write_text("".join("\n" + json.dumps(line) + "\n" for line in lines))
    lab.sh("chown", lab.ALICE, str(journal))

    status = ssh_lab.nixspool(config, "status", "--json")  # as root: imports the journal
    assert status.returncode == 0, status.stderr
    with sqlite3.connect(spool) as db:
        assert [p for (p,) in db.execute("SELECT path FROM paths")] == [out("kept")]
        rejected = {v for (v,) in db.execute("SELECT value FROM rejects")}
    assert set(planted) | {"--store"} <= rejected


def test_rows_planted_by_the_spools_owner_never_become_arguments(
    ssh_lab: lab.SshLab, alices_spool
) -> None:
    config, spool = alices_spool
    marker = ssh_lab.root / "adversarial" / "pwned"
    url = f"ssh-ng://localhost?remote-program=touch%20{marker}%3B"
    with sqlite3.connect(spool) as db:  # what alice can do with her own spool
        db.executemany(
            "INSERT INTO paths (path, drv_path, needs_outputs, recorded_at) VALUES (?, ?, ?, 0)",
            [
                ("--store", "", 1),
                (url, "", 1),
                ("/etc/shadow", "", 0),
                (f"--store {url}", "", 0),
                (out("x/../../../etc"), "", 0),
            ],
        )
    flushed = ssh_lab.nixspool(config, "--debug", "flush", "--json")
    assert "Traceback" not in flushed.stderr, flushed.stderr
    assert not marker.exists()
    commands = [line for line in flushed.stderr.splitlines() if "$ " in line]
    assert not [c for c in commands if "remote-program" in c or "shadow" in c], commands
    listed = json.loads(ssh_lab.nixspool(config, "list", "--json").stdout)
    assert {row["state"] for row in listed} == {"failed"}
    assert all("not a Nix store path" in row["last_error"] for row in listed)


def test_a_directory_at_the_journals_name_is_an_error_not_a_traceback(
    ssh_lab, alices_spool
) -> None:
    config, spool = alices_spool
    Path(str(spool) + ".fallback.jsonl").mkdir()
    for command in ("status", "flush"):
        result = ssh_lab.nixspool(config, command)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        assert "is a directory, not a regular file" in result.stderr


@pytest.mark.parametrize("name", [".fallback.jsonl", "", "-wal"])
def test_a_fifo_beside_the_spool_never_makes_the_hook_wait(
    ssh_lab, alices_spool, run_hook, name: str
) -> None:
    config, spool = alices_spool
    if name == ".fallback.jsonl":
        spool.unlink()  # the hook then goes to the journal, which is the FIFO
    else:
        spool.with_name(spool.name + name).unlink(missing_ok=True)
    fifo = Path(str(spool) + name)
    os.mkfifo(fifo)
    os.chown(fifo, Owner.of_user(lab.ALICE).uid, -1)  # alice's doing, in her directory
    env = {
        "PATH": os.environ["PATH"],
        "NIXSPOOL_CONFIG": str(config),
        "DRV_PATH": out("a.drv"),
        "OUT_PATHS": out("a"),
    }
    # The timeout is the hang detector, not a performance bound: before, the hook
    # blocked on the FIFO until killed.
    result = run_hook(env)
    assert result.returncode == 0
    assert "a FIFO, not a regular file" in result.stderr


def test_a_root_flush_leaves_nothing_the_user_cannot_use(ssh_lab: lab.SshLab, alices_spool) -> None:
    config, spool = alices_spool
    ssh_lab.spool_in(config, {out("missing")})
    as_root = ssh_lab.nixspool(config, "flush")
    assert "Traceback" not in as_root.stderr
    alice = Owner.of_user(lab.ALICE)
    for leftover in spool.parent.iterdir():
        assert leftover.stat().st_uid == alice.uid, leftover
    own = as_alice(ssh_lab, config, "flush")
    assert "Traceback" not in own.stderr, own.stderr
    assert own.returncode == 0, own.stderr  # the missing path failed already: nothing to do


def test_root_does_not_follow_a_link_the_user_put_among_the_gc_roots(tmp_path: Path) -> None:
    lab.ensure_user(lab.ALICE)
    alice = Owner.of_user(lab.ALICE)
    env = {"NIX_STATE_DIR": str(tmp_path / "state")}
    spool = str(tmp_path / "spool.sqlite")
    directory = gcroots.roots_dir(spool, env)
    ours = Path(directory).parent  # gcroots/nixspool: setup gives it to the user
    ours.mkdir(parents=True)
    os.chown(ours, alice.uid, alice.gid)
    secret = tmp_path / "root-only"
    secret.mkdir(mode=0o700)
    (secret / "precious").write_text("root's")
    os.symlink(secret, directory)  # what alice can do in her directory
    os.lchown(directory, alice.uid, alice.gid)

    assert gcroots.sync(spool, [out("a")], directory) == (0, 0)
    assert os.listdir(secret) == ["precious"]  # nothing deleted, no root created there
