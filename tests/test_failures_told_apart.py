"""Failures told apart: our own bugs and local faults are errors a person sees,
never "the host is away" (exit 75, retried for ever in silence).

Real processes where a process is what fails (the probe, a child that crashes);
tables for the pure parts. The flusher's end-to-end cases are in
test_flush_ssh.py.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from nixspool import cli, setup
from nixspool import config as config_mod
from nixspool.errors import ProbeError, RemoteConfigError, UnreachableError
from nixspool.flush import Flusher
from nixspool.probe import ProbeResult, Verdict, verdict
from nixspool.run import command_name, spawn


def test_a_probe_that_crashes_is_an_error_not_away() -> None:
    result = verdict(spawn([sys.executable, "-c", "import sys; sys.exit(3)"], timeout=30))
    assert result.verdict is Verdict.ERROR
    assert "exit 3" in result.message


def test_a_probe_that_prints_nonsense_is_an_error() -> None:
    result = verdict(spawn([sys.executable, "-c", 'print(\'{"verdict": "ok"}\')'], timeout=30))
    assert result.verdict is Verdict.ERROR
    assert "cannot read" in result.message


def test_a_bug_inside_the_probe_comes_back_with_its_traceback() -> None:
    """The probe process itself, given a request its code cannot handle."""
    request = {
        "url": "file:///not-ssh",
        "home": "/nonexistent",
        "local_user": "nobody",
        "connect_timeout": 1,
    }
    done = subprocess.run(
        [sys.executable, "-m", "nixspool.probe"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result = ProbeResult.from_json(done.stdout)
    assert result.verdict is Verdict.ERROR
    assert result.message.startswith("ValueError: 'file:///not-ssh' is not an ssh://")
    assert "Traceback (most recent call last)" in result.detail


@pytest.mark.parametrize(
    ("verdict_", "error"),
    [
        (Verdict.UNREACHABLE, UnreachableError),
        (Verdict.MISCONFIGURED, RemoteConfigError),
        (Verdict.ERROR, ProbeError),
    ],
)
def test_each_verdict_has_its_own_error(verdict_: Verdict, error: type[Exception]) -> None:
    with pytest.raises(error):
        Flusher._require(ProbeResult(verdict_, "x", "message"))
    Flusher._require(ProbeResult(Verdict.OK, "done", "fine"))


@pytest.mark.parametrize(
    ("argv", "name"),
    [
        (["nix", "--extra-experimental-features", "nix-command", "copy", "--to", "x"], "nix copy"),
        (
            ["nix", "--extra-experimental-features", "nix-command", "store", "info"],
            "nix store info",
        ),
        (
            ["/usr/bin/nix-store", "--check-validity", "--print-invalid"],
            "nix-store --check-validity",
        ),
        (["/v/bin/python3", "-m", "nixspool.probe"], "python3 -m nixspool.probe"),
        (["ssh"], "ssh"),
    ],
)
def test_failures_name_the_subcommand(argv: list[str], name: str) -> None:
    assert command_name(argv) == name


def test_a_failed_command_says_which_subcommand_failed() -> None:
    from nixspool.errors import CommandError

    with pytest.raises(CommandError, match=r"^`python3 -c` failed \(exit 4\): boom$"):
        spawn(["python3", "-c", "import sys; print('boom', file=sys.stderr); sys.exit(4)"]).wait()
    with pytest.raises(CommandError, match=r"did not finish within 0.2 s") as stopped:
        spawn(["sleep", "5"], timeout=0.2).wait()
    assert stopped.value.timed_out


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (
            NotADirectoryError(20, "Not a directory", "/etc/hostname/sub"),
            "/etc/hostname/sub: Not a directory",
        ),
        (PermissionError(13, "Permission denied", "/a", None, "/b"), "/a -> /b: Permission denied"),
        (OSError("no errno"), "no errno"),
        (
            sqlite3.OperationalError("disk I/O error"),
            "spool database: disk I/O error",
        ),
    ],
)
def test_os_and_sqlite_errors_read_as_one_line(error: Exception, line: str) -> None:
    assert cli.describe(error).startswith(line)


def test_the_progress_bar_starts_no_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Children start with a preexec_fn (run.py), unsafe once a thread exists."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    before = threading.active_count()
    with cli._progress(enabled=True) as update:
        update("pi", 1, 10)
        update("pi", 10, 10)
        assert threading.active_count() == before


def test_setup_renders_a_dotted_remote_name_that_loads(tmp_path: Path) -> None:
    request = setup.SetupRequest(
        config_path=str(tmp_path / "c.toml"),
        user="root",
        remotes=(("pi.home", "ssh-ng://pi"), ("nas", "ssh://nas")),
    )
    cfg = config_mod.parse(setup.render_config(request), "c.toml", {})
    assert [(r.name, r.url) for r in cfg.remotes] == [
        ("pi.home", "ssh-ng://pi"),
        ("nas", "ssh://nas"),
    ]
