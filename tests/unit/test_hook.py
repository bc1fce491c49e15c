"""nixspool-hook: fast path, input hygiene, and the hook under fire."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from nixspool import setup
from nixspool.hook import locate
from nixspool.hook import main as hook
from nixspool.spool import Owner, Spool
from programs import installed_program

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
    package_dir = Path(__file__).parents[2] / "hook"
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
    launcher = Path(installed_program("nixspool-hook")).read_text()
    assert launcher.startswith("#!/bin/sh\n")
    assert '-IS "$0"' in launcher


@pytest.fixture
def pip_hook(tmp_path: Path) -> Path:
    """pip's launcher in a bin/ of its own, beside a python3 that is this one."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python3").symlink_to(sys.executable)
    hook_file = bin_dir / "nixspool-hook"
    hook_file.write_text(Path(installed_program("nixspool-hook")).read_text())
    hook_file.chmod(0o755)
    return hook_file


def test_setup_makes_the_hook_start_its_python_directly(pip_hook, hook_env, tmp_path) -> None:
    """What `nixspool setup` leaves (as root, in a root-only installation): the
    interpreter in the #! line, isolated and without site, no /bin/sh; it records
    as pip's launcher does, and a second setup changes nothing."""
    report = setup.SetupReport()
    setup.start_hook_directly(str(pip_hook), report)
    assert report.changed == [str(pip_hook)]
    text = pip_hook.read_text()
    assert text.startswith(f"#!{pip_hook.parent / 'python3'} -IS\n")
    assert "/bin/sh" not in text.splitlines()[0]
    spool = tmp_path / "spool" / "spool.sqlite"
    Spool.open(str(spool)).close()
    env = hook_env(out("a.drv"), out("a"))
    result = subprocess.run([str(pip_hook)], env=env, stdin=subprocess.DEVNULL, text=True,
                            capture_output=True, timeout=30)  # fmt: skip
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert paths_in(spool) == {out("a")}
    # The flags Python really starts with from that #! line: the same file, with
    # a question where it would launch the hook.
    probe = "print(sys.flags.isolated, sys.flags.no_site, 'site' in sys.modules)"
    flags = text.replace("from nixspool.hook.main import launch\nlaunch()\n", probe + "\n")
    pip_hook.with_name("flags").write_text(flags)
    pip_hook.with_name("flags").chmod(0o755)
    ran = subprocess.run([str(pip_hook.with_name("flags"))], text=True, capture_output=True)
    assert ran.stdout.split() == ["1", "1", "False"], ran.stderr
    again = setup.SetupReport()
    setup.start_hook_directly(str(pip_hook), again)
    assert (again.changed, again.unchanged) == ([], [str(pip_hook)])


def test_setup_leaves_a_hook_it_did_not_install(pip_hook, tmp_path) -> None:
    """Not pip's launcher (a file of the user's), a link, or an interpreter path a
    #! line cannot hold: left as it is."""
    mine = pip_hook.with_name("mine")
    mine.write_text("#!/bin/bash\nexec true\n")
    link = pip_hook.with_name("link")
    link.symlink_to(pip_hook)
    report = setup.SetupReport()
    for hook_file in (mine, link):
        setup.start_hook_directly(str(hook_file), report)
    assert mine.read_text() == "#!/bin/bash\nexec true\n" and link.is_symlink()
    assert report.changed == report.unchanged == []
    assert setup.direct_hook("/opt/my venv/bin/nixspool-hook") is None
    assert setup.direct_hook("/" + "d" * 250 + "/bin/nixspool-hook") is None
    assert setup.direct_hook("/opt/nixspool/bin/nixspool-hook") is not None


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


def test_a_nix_config_in_the_environment_changes_nothing(hook_env, run_hook, tmp_path) -> None:
    """Lix 2.93+ hands hooks a NIX_CONFIG of the settings that differ from their
    defaults; the hook reads no Nix setting, so it records as always (the flusher
    clears NIX_CONFIG for the Nix it runs: test_flush_logic)."""
    spool = tmp_path / "spool" / "spool.sqlite"
    Spool.open(str(spool)).close()
    env = hook_env(out("b.drv"), out("b"))
    env["NIX_CONFIG"] = "store = /elsewhere\npost-build-hook = /bin/false\nspool = /tmp/x\n"
    result = run_hook(env)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert paths_in(spool) == {out("b")}


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
        [installed_program("nixspool-hook")],
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


# -- under fire ----------------------------------------------------------------


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


@pytest.mark.parametrize("at_once", [0.0, 0.3, 1.9])
def test_a_locked_spool_is_waited_for_one_bound_in_all(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, at_once: float
) -> None:
    """WAL recovery answers "locked" at once, without SQLite's busy handler: a retry
    then must wait only what is left of HOOK_BUSY_TIMEOUT_SECONDS, not a whole
    bound anew (the hook could wait about twice its bound). A clock of our own:
    each first try fails `at_once` seconds in, every later one after its full wait."""
    from nixspool.hook import rows

    clock = [0.0]
    tries: list[float] = []

    class Clock:
        @staticmethod
        def monotonic() -> float:
            return clock[0]

        @staticmethod
        def sleep(seconds: float) -> None:
            clock[0] += seconds

    class LockedSpool:
        def __init__(self, timeout: float) -> None:
            self.timeout = timeout

        def execute(self, sql: str, *args: object) -> LockedSpool:
            if sql.startswith("BEGIN"):
                tries.append(self.timeout)
                clock[0] += at_once if len(tries) == 1 else self.timeout
                raise sqlite3.OperationalError("database is locked")
            return self

        def close(self) -> None:
            pass

    from nixspool.hook import files

    monkeypatch.setattr(hook, "time", Clock)
    monkeypatch.setattr(files, "check_database", lambda path: None)
    # The hook's own sqlite3: the C module behind it, where there is one.
    sqlite = sys.modules.get("_sqlite3", sqlite3)
    monkeypatch.setattr(sqlite, "connect", lambda *args, timeout, **kw: LockedSpool(timeout))
    record = rows.Record("", [f"/nix/store/{'a' * 32}-a"], [], 1.0)
    with pytest.raises(sqlite3.OperationalError):
        hook.write_spool(str(tmp_path / "spool.sqlite"), record)
    assert len(tries) >= 2
    assert clock[0] <= rows.HOOK_BUSY_TIMEOUT_SECONDS + 0.01, tries
