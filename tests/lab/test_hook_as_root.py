"""The hook as root, in the lab: spools it must refuse or cannot use, other users'
spools, a full disk. Each record still lands somewhere a command imports.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

import lab
from nixspool.hook import rows
from nixspool.spool import Owner, Spool
from test_hook import out, paths_in

# -- the installed hook, run as Nix runs it -----------------------------------


def alices_directory(nix_lab: Path, name: str) -> Path:
    """A directory of alice's in the lab, for tests that run as her: root's default
    spool is this machine's own, which tests must never touch."""
    lab.ensure_user(lab.ALICE)
    work = nix_lab / name
    work.mkdir(mode=0o755)
    lab.sh("chown", lab.ALICE, str(work))
    return work


def alices_env(work: Path, config_text: str) -> dict[str, str]:
    """Her config in `work`, and her default spool there too (XDG_DATA_HOME)."""
    config = work / "config.toml"
    config.write_text(config_text)
    return {"NIXSPOOL_CONFIG": str(config), "XDG_DATA_HOME": str(work / "data")}


def alices_hook(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return lab.run_as(
        lab.ALICE,
        [lab.installed_program("nixspool-hook")],
        {**env, "DRV_PATH": out("a.drv"), "OUT_PATHS": out("a")},
    )


def test_an_unsafe_spool_directory_is_refused_and_the_record_kept_elsewhere(
    nix_lab: Path,
) -> None:
    """A spool directory anyone may write to is not used (a row there is a request to
    sign and upload). The record waits in the journal beside the default spool, and
    the next command, once the directory is safe, imports it. As alice, so that the
    machine's own default spool is never touched (root's is /var/lib/nixspool)."""
    work = alices_directory(nix_lab, "unsafe")
    spool = work / "spool" / "spool.sqlite"
    env = alices_env(work, f'spool = "{spool}"\n')
    nixspool = [lab.installed_program("nixspool"), "status", "--json"]
    assert lab.run_as(lab.ALICE, nixspool, env).returncode == 0  # makes the spool
    spool.parent.chmod(0o777)

    hooked = alices_hook(env)
    assert hooked.returncode == 0
    assert "writable by group or others" in hooked.stderr
    assert "recorded in " + str(work / "data" / "nixspool") in hooked.stderr
    with sqlite3.connect(spool) as db:
        assert db.execute("SELECT count(*) FROM paths").fetchone() == (0,)

    spool.parent.chmod(0o700)
    status = lab.run_as(lab.ALICE, nixspool, env)
    assert status.returncode == 0, status.stderr
    with sqlite3.connect(spool) as db:
        assert db.execute("SELECT path FROM paths").fetchall() == [(out("a"),)]


def test_records_made_while_the_config_is_broken_reach_the_configured_spool(
    nix_lab: Path,
) -> None:
    """Adversarial run: with a typo in the config the hook recorded into the default
    spool, and after the fix those builds were never delivered. Now they wait in the
    journal beside the default spool, and the next command imports them into the
    spool the config names. As alice (a single-user Nix runs the hook as its user),
    so the machine's own default spool is never touched."""
    work = alices_directory(nix_lab, "stray")
    env = alices_env(work, 'spool = "relative/path"\n')  # the typo
    config = Path(env["NIXSPOOL_CONFIG"])
    hooked = alices_hook(env)
    assert hooked.returncode == 0
    assert "must be an absolute path" in hooked.stderr
    assert len(hooked.stderr.splitlines()) == 1
    assert (work / "data" / "nixspool" / "spool.sqlite.fallback.jsonl").exists()
    assert not (work / "data" / "nixspool" / "spool.sqlite").exists()

    spool = work / "spool" / "spool.sqlite"
    config.write_text(f'spool = "{spool}"\n')  # fixed
    status = lab.run_as(lab.ALICE, [lab.installed_program("nixspool"), "status", "--json"], env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["paths"] == 1
    assert not (work / "data" / "nixspool" / "spool.sqlite.fallback.jsonl").exists()


def test_bytes_that_are_not_utf8_in_the_config_path_still_reach_its_spool(
    hook_env, nix_lab: Path, tmp_path: Path
) -> None:
    odd = os.fsencode(tmp_path) + b"/conf\xff\n"
    os.mkdir(odd)
    spool = tmp_path / "spool" / "spool.sqlite"
    Spool.open(str(spool)).close()
    with open(odd + b"/config.toml", "w") as f:
        f.write(f'spool = "{spool}"\n')
    env = {k.encode(): v.encode() for k, v in hook_env(out("a.drv"), out("a")).items()}
    env[b"NIXSPOOL_CONFIG"] = odd + b"/config.toml"
    ok = subprocess.run(
        [lab.installed_program("nixspool-hook")], env=env, capture_output=True, timeout=30
    )
    assert ok.returncode == 0 and ok.stderr == b""
    assert paths_in(spool) == {out("a")}
    # A missing file of that name: one clear line, the odd bytes escaped. As
    # alice, whose default spool (where the record then waits) is in the lab.
    lab.ensure_user(lab.ALICE)
    data = nix_lab / "odd-bytes"
    data.mkdir(mode=0o755)
    lab.sh("chown", lab.ALICE, str(data))
    env[b"NIXSPOOL_CONFIG"] = odd + b"/missing.toml"
    env[b"XDG_DATA_HOME"] = os.fsencode(data)
    env[b"HOME"] = os.fsencode(data)
    missing = subprocess.run(
        ["runuser", "-u", lab.ALICE, "--", "env", "-i"]
        + [k + b"=" + v for k, v in env.items()]
        + [lab.installed_program("nixspool-hook")],
        capture_output=True,
        timeout=30,
    )
    assert missing.returncode == 0
    assert len(missing.stderr.splitlines()) == 1, missing.stderr
    assert b"\\udcff\\n" in missing.stderr, missing.stderr
    assert (data / "nixspool" / "spool.sqlite.fallback.jsonl").exists()


# -- under fire ----------------------------------------------------------------


def test_a_read_only_spool_uses_the_journal(tmp_path: Path) -> None:
    # Root ignores file modes, so this runs the hook as an ordinary user.
    lab.require_lab()
    lab.ensure_user(lab.BUILDER)
    home = Path(os.path.expanduser(f"~{lab.BUILDER}"))
    work = home / "ro-test"
    subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(mode=0o700)
    subprocess.run(["chown", lab.BUILDER, str(work)], check=True)
    spool = work / "spool.sqlite"
    Spool.open(str(spool), Owner.of_user(lab.BUILDER)).close()
    config = work / "config.toml"
    config.write_text(f'spool = "{spool}"\n')
    spool.chmod(0o400)
    result = lab.run_as(
        lab.BUILDER,
        [lab.installed_program("nixspool-hook")],
        {"NIXSPOOL_CONFIG": str(config), "DRV_PATH": out("a.drv"), "OUT_PATHS": out("a")},
    )
    assert result.returncode == 0
    assert "readonly database; recorded in" in result.stderr
    # What a person runs to undo it: SQLite gave the -wal and -shm it made the
    # database's mode (root ignores modes, but root now works here as the builder).
    for name in work.glob("spool.sqlite*"):
        name.chmod(0o600)
    assert paths_in(spool, Owner.of_user(lab.BUILDER)) == {out("a")}


@pytest.fixture
def small_filesystem(tmp_path: Path):
    lab.require_lab("mount")
    mountpoint = tmp_path / "fs"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def fill(path: Path) -> None:
    """Write zeros to `path` until the filesystem is full (unbuffered: no late flush)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


def test_a_full_disk_still_records_through_the_ballast(
    small_filesystem, hook_env, run_hook
) -> None:
    spool = small_filesystem / "spool" / "spool.sqlite"
    Spool.open(str(spool)).close()  # creates the spool and its ballast
    filler = small_filesystem / "filler"
    fill(filler)
    result = run_hook(hook_env(out("a.drv"), out("a"), spool=spool))
    assert result.returncode == 0
    assert "used the ballast" in result.stderr
    filler.unlink()
    assert paths_in(spool) == {out("a")}
    assert Path(str(spool) + rows.BALLAST_SUFFIX).exists()  # kept again for next time


def test_nothing_left_anywhere_gives_one_error_line_and_exit_0(
    small_filesystem, hook_env, run_hook
) -> None:
    spool = small_filesystem / "spool" / "spool.sqlite"
    Spool.open(str(spool)).close()
    Path(str(spool) + rows.BALLAST_SUFFIX).unlink()
    fill(small_filesystem / "filler")
    result = run_hook(hook_env(out("a.drv"), out("a"), spool=spool))
    assert result.returncode == 0
    assert result.stderr.startswith(f"nixspool: error: did not record {out('a.drv')}: ")
    assert result.stderr.count("\n") == 1
