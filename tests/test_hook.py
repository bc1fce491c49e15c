"""nixspool-hook: fast path, input hygiene, and the hook under fire."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import lab
from nixspool.hook import locate, rows
from nixspool.hook import main as hook
from nixspool.spool import Owner, Spool

STORE = "/nix/store"
H = "0123456789abcdfghijklmnpqrsvwxyz"  # a valid 32-char hash


def out(name: str, digest: str = H) -> str:
    return f"{STORE}/{digest}-{name}"


def paths_in(spool: Path, owner: Owner | None = None) -> set[str]:
    with Spool.open(str(spool), owner) as s:  # imports the journal, like any command
        return {row[0] for row in s.conn.execute("SELECT path FROM paths")}


def unique_out(i: int) -> str:
    digest = "".join(H[(i >> (5 * k)) & 31] for k in range(7)) + H[7:]
    return out(f"p{i}", digest)


# -- the module itself ---------------------------------------------------------

# Standard library, but slow to import and not needed on every build.
AVOIDED = ("tomllib", "dataclasses", "sqlite3", "json", "subprocess")


def test_importing_the_hook_loads_only_the_standard_library() -> None:
    """Whatever the hook imports, directly or not, is in the standard library
    (Python's own list of its modules), and none of the slow parts it avoids."""
    package_dir = Path(__file__).parents[1] / "hook"
    code = (
        f"import sys; sys.path.insert(0, {str(package_dir)!r}); import nixspool.hook.main; "
        "print(' '.join(sorted(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], text=True, capture_output=True, check=True
    )
    modules = set(result.stdout.split())
    loaded = {m.partition(".")[0] for m in modules}
    assert "nixspool.hook.main" in modules  # the import did happen
    assert loaded - set(sys.stdlib_module_names) - {"nixspool", "__main__"} == set()
    assert loaded & set(AVOIDED) == set()
    # Nothing from the command's side: the subpackage is the hook's whole world.
    ours = {m for m in modules if m.startswith("nixspool.")}
    assert {m for m in ours if not m.startswith("nixspool.hook")} == set()


def test_the_installed_hook_runs_python_isolated_without_site() -> None:
    launcher = Path(lab.installed_program("nixspool-hook")).read_text()
    assert launcher.startswith("#!/bin/sh\n")
    assert '-IS "$0"' in launcher


# -- input hygiene -------------------------------------------------------------


@pytest.mark.parametrize(
    ("drv", "outs", "outputs", "reasons"),
    [
        (out("a.drv"), out("a"), [out("a")], []),
        (out("a.drv"), f"{out('a')} {out('a-dev')}", [out("a"), out("a-dev")], []),
        (out("a.drv"), f"{out('a')}  {out('a')} ", [out("a")], []),  # dedup, extra spaces
        (out("a.drv"), "", [], []),  # Nix 2.8.0: the .drv row stands for its outputs
        ("", out("a"), [out("a")], []),
        (out("a.drv"), "relative/path", [], ["OUT_PATHS entry is not an absolute path"]),
        (
            out("a.drv"),
            f"{STORE}/../etc/passwd",
            [],
            ["OUT_PATHS entry is not directly in the Nix store /nix/store"],
        ),
        (
            out("a.drv"),
            f"{out('a')}/sub",
            [],
            ["OUT_PATHS entry is not directly in the Nix store /nix/store"],
        ),
        (
            out("a.drv"),
            "/tmp/" + H + "-a",
            [],
            ["OUT_PATHS entry is not directly in the Nix store /nix/store"],
        ),
        (
            out("a.drv"),
            f"{STORE}/short-a",
            [],
            ["OUT_PATHS entry does not start with a 32-character Nix hash"],
        ),
        (
            out("a.drv"),
            f"{STORE}/{'e' * 32}-a",
            [],  # e is not in Nix's base-32
            ["OUT_PATHS entry does not start with a 32-character Nix hash"],
        ),
        (out("a.drv"), out("a\nb"), [], ["OUT_PATHS entry contains control characters"]),
        (out("a.drv"), out("a\tb"), [], ["OUT_PATHS entry contains control characters"]),
        (out("a.drv"), out("a\udcffb"), [], ["OUT_PATHS entry is not valid UTF-8"]),
        (out("a.drv"), out("a b"), [out("a")], ["OUT_PATHS entry is not an absolute path"]),
        (
            out("a.drv"),
            out("a$(rm -rf /)"),
            [],  # splits into three values, all refused
            [
                "OUT_PATHS entry has an invalid store path name",
                "OUT_PATHS entry is not an absolute path",
                "OUT_PATHS entry is not directly in the Nix store /nix/store",
            ],
        ),
        (out("a.drv"), out(".hidden"), [], ["OUT_PATHS entry has an invalid store path name"]),
        (
            "/etc/passwd",
            out("a"),
            [out("a")],
            ["DRV_PATH is not directly in the Nix store /nix/store"],
        ),
        (out("a"), out("a"), [out("a")], ["DRV_PATH is not a derivation (.drv)"]),
    ],
)
def test_read_record(drv: str, outs: str, outputs: list[str], reasons: list[str]) -> None:
    record = hook.read_record({"DRV_PATH": drv, "OUT_PATHS": outs}, 1.0)
    assert record.outputs == outputs
    assert [reason for _, reason in record.rejects] == reasons


def test_nix_store_dir_is_respected() -> None:
    env = {"NIX_STORE_DIR": "/gnu/store/", "OUT_PATHS": f"/gnu/store/{H}-a {out('b')}"}
    record = hook.read_record(env, 1.0)
    assert record.outputs == [f"/gnu/store/{H}-a"]
    assert record.rejects[0][1] == "OUT_PATHS entry is not directly in the Nix store /gnu/store"


def test_a_hundred_thousand_bad_values_are_bounded_and_fast(tmp_path: Path) -> None:
    env = {
        "OUT_PATHS": " ".join(f"x{i}" for i in range(100_000)),
        "DRV_PATH": out("a.drv"),
        "NIXSPOOL_CONFIG": str(tmp_path / "c.toml"),
    }
    (tmp_path / "c.toml").write_text(f'spool = "{tmp_path}/s/spool.sqlite"\n')
    Spool.open(str(tmp_path / "s" / "spool.sqlite")).close()
    hook.run(env)  # in-process: the kernel caps one variable at 128 KiB for exec
    with Spool.open(str(tmp_path / "s" / "spool.sqlite")) as s:
        rejects = s.reports.rejects()
    assert len(rejects) == 21  # 20 shown and one line counting the rest
    assert rejects[0].value == "(99980 more values)"


# -- the installed hook, run as Nix runs it -----------------------------------


def test_success_prints_nothing_and_records_each_output(hook_env, run_hook, tmp_path) -> None:
    spool = tmp_path / "spool" / "spool.sqlite"
    Spool.open(str(spool)).close()
    result = run_hook(hook_env(out("a.drv"), f"{out('a')} {out('a-dev')}"))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert paths_in(spool) == {out("a"), out("a-dev")}
    assert not Path(locate.fallback_journal(str(spool))).exists()


def test_the_same_path_twice_is_one_row(hook_env, run_hook, tmp_path) -> None:
    spool = tmp_path / "spool" / "spool.sqlite"
    Spool.open(str(spool)).close()
    for _ in range(2):
        assert run_hook(hook_env(out("a.drv"), out("a"))).returncode == 0
    with Spool.open(str(spool)) as s:
        assert s.reports.status().paths == 1


def test_not_run_by_nix_says_so_and_exits_0(hook_env, run_hook) -> None:
    result = run_hook(hook_env("", ""))
    assert result.returncode == 0
    assert result.stderr == (
        "nixspool: error: DRV_PATH and OUT_PATHS are empty: run me as Nix's post-build-hook\n"
    )


def test_bytes_that_are_not_utf8_are_rejected(hook_env, run_hook, tmp_path) -> None:
    spool = tmp_path / "spool" / "spool.sqlite"
    Spool.open(str(spool)).close()
    env = {k.encode(): v.encode() for k, v in hook_env(out("a.drv"), "").items()}
    env[b"OUT_PATHS"] = out("a").encode() + b" " + out("b").encode() + b"\xff\xfe"
    result = subprocess.run(
        [lab.installed_program("nixspool-hook")],
        env=env,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, b"")
    with Spool.open(str(spool)) as s:
        assert [r.reason for r in s.reports.rejects()] == ["OUT_PATHS entry is not valid UTF-8"]
        assert s.reports.rejects()[0].value.endswith("-b\\xff\\xfe")
    assert paths_in(spool) == {out("a")}


def test_a_variable_at_the_kernel_limit_passes_through(hook_env, run_hook, tmp_path) -> None:
    spool = tmp_path / "spool" / "spool.sqlite"
    Spool.open(str(spool)).close()
    many = [unique_out(i) for i in range(128 * 1024 // 50)]
    value = " ".join(many)
    assert len(value) < 128 * 1024
    result = run_hook(hook_env(out("a.drv"), value))
    assert (result.returncode, result.stderr) == (0, "")
    assert paths_in(spool) == set(many)


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


def test_32_concurrent_hooks_lose_nothing(hook_env, run_hook, tmp_path) -> None:
    spool = tmp_path / "spool" / "spool.sqlite"
    Spool.open(str(spool)).close()
    expected = [unique_out(i) for i in range(1000)]

    def record(i: int) -> subprocess.CompletedProcess[str]:
        result: subprocess.CompletedProcess[str] = run_hook(hook_env(out(f"d{i}.drv"), expected[i]))
        return result

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(record, range(1000)))
    assert all(r.returncode == 0 for r in results)
    assert paths_in(spool) == set(expected)


def test_a_locked_spool_waits_a_bounded_time_then_uses_the_journal(
    hook_env, run_hook, tmp_path
) -> None:
    spool = tmp_path / "spool" / "spool.sqlite"
    Spool.open(str(spool)).close()
    holder = sqlite3.connect(spool, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        result = run_hook(hook_env(out("a.drv"), out("a")))
        waited = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert result.returncode == 0
    assert "database is locked; recorded in" in result.stderr
    assert rows.HOOK_BUSY_TIMEOUT_SECONDS <= waited < rows.HOOK_BUSY_TIMEOUT_SECONDS + 10
    assert Path(locate.fallback_journal(str(spool))).exists()
    assert paths_in(spool) == {out("a")}
    assert not Path(locate.fallback_journal(str(spool))).exists()


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


def test_sigkill_at_any_moment_keeps_every_committed_row(hook_env, tmp_path) -> None:
    spool = tmp_path / "spool" / "spool.sqlite"
    Spool.open(str(spool)).close()
    hook_program = lab.installed_program("nixspool-hook")
    completed: set[str] = set()
    rng = random.Random(7)
    # Kill within twice the hook's own run time here, so that on any machine
    # some hooks are killed mid-way and some finish.
    runs = []
    for i in range(3):
        started = time.monotonic()
        subprocess.run(
            [hook_program],
            env=hook_env(out(f"w{i}.drv"), unique_out(1000 + i)),
            stdin=subprocess.DEVNULL,
            check=True,
        )
        runs.append(time.monotonic() - started)
    window = 2 * sorted(runs)[1]
    for i in range(60):
        proc = subprocess.Popen(
            [hook_program],
            env=hook_env(out(f"d{i}.drv"), unique_out(i)),
            stdin=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0, window))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        if proc.wait() == 0:
            completed.add(unique_out(i))
    con = sqlite3.connect(spool)
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    con.close()
    recorded = paths_in(spool)
    assert completed <= recorded  # every hook that finished kept its row
    assert recorded <= {unique_out(i) for i in range(60)} | {unique_out(1000 + i) for i in range(3)}
    assert 0 < len(completed) < 60, "the kill timing did not hit both cases; adjust it"


def test_a_hook_in_a_spool_with_a_newer_schema_uses_the_journal(
    hook_env, run_hook, tmp_path
) -> None:
    # Whatever a future migration does to `paths`, a failing INSERT loses nothing.
    spool = tmp_path / "spool" / "spool.sqlite"
    Spool.open(str(spool)).close()
    con = sqlite3.connect(spool)
    con.execute("ALTER TABLE paths RENAME TO paths_v2")
    con.close()
    result = run_hook(hook_env(out("a.drv"), out("a")))
    assert result.returncode == 0
    assert "no such table: paths; recorded in" in result.stderr
