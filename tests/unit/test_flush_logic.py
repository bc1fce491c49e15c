"""The flusher's pure logic, as tables: error classes, backoff, exit codes, ssh options."""

from __future__ import annotations

import os
import pwd

import pytest

from nixspool import privileges
from nixspool.config import Config, Remote
from nixspool.errors import PrivilegeError
from nixspool.flush import (
    EX_FAILED,
    EX_OK,
    EX_TEMPFAIL,
    FlushReport,
    RemoteReport,
    backoff,
    exit_code,
)
from nixspool.outcome import Outcome, classify
from nixspool.probe import SshTarget, ssh_options


@pytest.mark.parametrize(
    ("stderr", "outcome"),
    [
        ("ssh: connect to host 10.0.0.1 port 22: Connection refused", Outcome.UNREACHABLE),
        ("ssh: connect to host pi port 22: Connection timed out", Outcome.UNREACHABLE),
        ("ssh: connect to host pi port 22: No route to host", Outcome.UNREACHABLE),
        ("ssh: Could not resolve hostname pi: Name or service not known", Outcome.UNREACHABLE),
        ("Timeout, server pi not responding.", Outcome.UNREACHABLE),
        ("error: unexpected end-of-file", Outcome.UNREACHABLE),
        (
            "error: cannot add path '/nix/store/x' because it lacks a valid signature",
            Outcome.PERMANENT,
        ),
        (  # the same refusal, as Nix 2.20 and later word it
            "error: cannot add path '/nix/store/x' because it lacks a signature by a trusted key",
            Outcome.PERMANENT,
        ),
        ("error: path '/nix/store/x' is not valid", Outcome.PERMANENT),
        ("Host key verification failed.", Outcome.PERMANENT),
        (
            "error: path '/nix/store/x' is required, but there is no substituter that can build it",
            Outcome.PERMANENT,
        ),
        ("error: getting status of '/nix/store/x': No such file or directory", Outcome.PERMANENT),
        # A full remote disk frees up: transient, even though Nix also says "cannot add".
        ("error: writing to file: No space left on device", Outcome.TRANSIENT),
        (
            "error: cannot add path '/nix/store/x': writing to file: No space left on device",
            Outcome.TRANSIENT,
        ),
        ("error: writing to file: Disk quota exceeded", Outcome.TRANSIENT),
        ("error: some protocol hiccup", Outcome.TRANSIENT),
        # This machine's Nix has no such store (Debian's has no S3): 2.8-2.19, then 2.20+.
        ("error: don't know how to open Nix store 's3://cache?region=x'", Outcome.UNSUPPORTED),
        ("error: don't know how to open Nix store with scheme 's3'", Outcome.UNSUPPORTED),
        # curl's words, for an http(s):// or s3:// store whose server is not there
        (
            "error: unable to download 'http://127.0.0.1:9/c/nix-cache-info': Could not "
            "connect to server (7) Failed to connect to 127.0.0.1:9 after 0 ms",
            Outcome.UNREACHABLE,
        ),
        (
            "error: unable to download 'https://c/x': Couldn't resolve host name (6)",
            Outcome.UNREACHABLE,
        ),
        ("", Outcome.TRANSIENT),
    ],
)
def test_classify(stderr: str, outcome: Outcome) -> None:
    assert classify(stderr) is outcome


@pytest.mark.parametrize(
    ("attempts", "low", "high"),
    [(1, 24, 30), (2, 48, 60), (3, 96, 120), (10, 2880, 3600), (50, 2880, 3600)],
)
def test_backoff_is_exponential_capped_and_jittered(attempts: int, low: float, high: float) -> None:
    delays = {backoff(attempts, 30, 3600) for _ in range(50)}
    assert all(low <= d <= high for d in delays)
    assert len(delays) > 1


@pytest.mark.parametrize(
    ("reports", "errors", "code"),
    [
        ([], [], EX_OK),
        ([RemoteReport("a", delivered=3)], [], EX_OK),
        ([RemoteReport("a", unreachable=True, error="x")], [], EX_TEMPFAIL),
        ([RemoteReport("a", deferred=1)], [], EX_TEMPFAIL),
        ([RemoteReport("a", failed=1)], [], EX_FAILED),
        ([RemoteReport("a", error="host key unknown")], [], EX_FAILED),
        ([RemoteReport("a", failed=1), RemoteReport("b", unreachable=True, error="x")], [], 1),
        # A local failure for all remotes (resolving derivations) outranks "try later".
        ([RemoteReport("a", unreachable=True, error="x")], ["resolving: nix broke"], EX_FAILED),
    ],
)
def test_exit_code(reports: list[RemoteReport], errors: list[str], code: int) -> None:
    assert exit_code(FlushReport(reports, errors)) == code


def test_ssh_options_bound_every_step_and_never_prompt() -> None:
    remote = Remote("pi", "ssh-ng://pi", ssh_key="/k/id", connect_timeout=7)
    assert ssh_options(remote, False) == (
        "-o ConnectTimeout=7 -o BatchMode=yes -o ServerAliveInterval=3 "
        "-o ServerAliveCountMax=3 -o StrictHostKeyChecking=yes -i /k/id -o IdentitiesOnly=yes"
    )
    assert "StrictHostKeyChecking=accept-new" in ssh_options(Remote("n", "ssh://n"), True)


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("ssh-ng://pi", SshTarget("pi")),
        ("ssh://cache@nas.lan", SshTarget("nas.lan", user="cache")),
        ("ssh://cache@nas:2222", SshTarget("nas", user="cache", port=2222)),
        ("ssh-ng://pi?ssh-key=/root/k&compress=true", SshTarget("pi", ssh_key="/root/k")),
    ],
)
def test_ssh_target_from_url(url: str, target: SshTarget) -> None:
    assert SshTarget.from_url(url) == target


def test_ssh_target_refuses_other_urls() -> None:
    with pytest.raises(ValueError):
        SshTarget.from_url("file:///cache")


def me() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def test_the_configured_user_or_root_may_flush() -> None:
    assert privileges.remote_account(Config(spool="/s", user=me())).uid == os.geteuid()


def test_a_missing_user_is_named() -> None:
    with pytest.raises(PrivilegeError, match="user 'no-such-user-here'"):
        privileges.remote_account(Config(spool="/s", user="no-such-user-here"))


def test_child_env_is_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NIX_CONFIG", "substituters = http://evil")
    monkeypatch.setenv("NIX_REMOTE", "ssh://elsewhere")
    monkeypatch.setenv("NIX_DAEMON_SOCKET_PATH", "/run/x")
    monkeypatch.setenv("SSH_AUTH_SOCK", "/nonexistent/agent")
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    monkeypatch.setenv("NIX_PATH", "nixpkgs=/root/evil")  # root's, not the user's
    monkeypatch.setenv("NIX_USER_CONF_FILES", "/root/.config/nix/nix.conf")
    monkeypatch.setenv("NIX_SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")
    account = privileges.account_of("root")
    env = privileges.child_env(account, {"NIX_SSHOPTS": "-o X=1"})
    assert env["HOME"] == "/root" and env["USER"] == env["LOGNAME"] == "root"
    assert "NIX_CONFIG" not in env and "NIX_REMOTE" not in env
    assert "SSH_AUTH_SOCK" not in env  # not an existing socket of that user
    assert "SECRET_TOKEN" not in env
    assert env["NIX_DAEMON_SOCKET_PATH"] == "/run/x"
    assert "NIX_PATH" not in env and "NIX_USER_CONF_FILES" not in env  # an allow-list
    assert env["NIX_SSL_CERT_FILE"] == "/etc/ssl/certs/ca-certificates.crt"
    assert env["NIX_SSHOPTS"] == "-o X=1"


def test_a_report_lists_the_first_failures_and_counts_the_rest() -> None:
    from nixspool.flush import FAILURES_LISTED, RemoteReport

    report = RemoteReport("pi")
    for i in range(FAILURES_LISTED + 50):
        report.fail(f"/nix/store/{i}", "gone")
    assert len(report.failures) == FAILURES_LISTED
    assert report.failures[0] == {"path": "/nix/store/0", "error": "gone"}
    assert report.failures_not_listed == 50
