"""Failures told apart: our own bugs and local faults are errors a person sees,
never "the host is away" (exit 75, retried for ever in silence).

Real processes where a process is what fails (the probe, a child that crashes);
tables for the pure parts. The flusher's end-to-end cases are in
test_flush_ssh.py.
"""

from __future__ import annotations

import sqlite3
import sys
import threading
from pathlib import Path

import pytest

from nixspool import cli, setup
from nixspool import config as config_mod
from nixspool.cli import deliver
from nixspool.errors import ProbeError, RemoteConfigError, UnreachableError
from nixspool.flush import Flusher
from nixspool.privileges import current_account
from nixspool.probe import ProbeResult, Verdict, start_probe, verdict
from nixspool.run import command_name, spawn


def test_a_probe_killed_by_a_signal_is_an_error_not_away() -> None:
    result = verdict(spawn(["sh", "-c", "kill -9 $$"], timeout=30, check=False))
    assert result.verdict is Verdict.ERROR
    assert "signal 9" in result.message


def test_no_ssh_on_this_machine_is_an_error_not_away(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without OpenSSH's client nothing can be reached, but nothing says the host is
    away either: a local fault, told as one."""
    from nixspool import privileges

    remote = config_mod.Remote("pi", "ssh-ng://pi", connect_timeout=1)
    monkeypatch.setattr(privileges, "child_env", lambda account: {"PATH": str(tmp_path)})
    result = verdict(start_probe(remote, current_account(), accept_new_host_keys=False))
    assert result.verdict is Verdict.ERROR
    assert "cannot run ssh" in result.message


def test_a_probe_past_its_bound_is_a_host_that_stopped_answering() -> None:
    """ssh's ConnectTimeout bounds the connection and the handshake; a login that
    runs past the probe's whole bound is a host (or its proxy) gone silent."""
    result = verdict(spawn(["sleep", "5"], timeout=0.2, check=False))
    assert result.verdict is Verdict.UNREACHABLE
    assert result.stage == "login"


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
        (["/usr/bin/ssh", "-o", "BatchMode=yes", "pi", "true"], "ssh"),
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
    with deliver._progress(enabled=True) as update:
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
