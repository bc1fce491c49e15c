"""The probe's verdict from what OpenSSH said: a table of ssh's own words (OpenSSH
9.2 on Debian 12, 10.0 on 13 and sid), exit 255 unless said otherwise. The lab
tests (test_ssh_config.py) check the same verdicts against alice's real ssh."""

from __future__ import annotations

import pytest

from nixspool.config import Remote
from nixspool.probe import SshCommand, SshTarget, Verdict, classify_ssh

AWAY, PERSON = Verdict.UNREACHABLE, Verdict.MISCONFIGURED


@pytest.mark.parametrize(
    ("stderr", "verdict", "stage"),
    [
        ("ssh: Could not resolve hostname pi.invalid: Name or service not known", AWAY, "resolve"),
        (
            "ssh: Could not resolve hostname pi: Temporary failure in name resolution",
            AWAY,
            "resolve",
        ),
        ("ssh: connect to host 10.231.77.2 port 22: Connection refused", AWAY, "tcp"),
        ("ssh: connect to host 10.231.77.2 port 22: Connection timed out", AWAY, "tcp"),
        ("ssh: connect to host 10.231.77.2 port 22: No route to host", AWAY, "tcp"),
        ("ssh: connect to host 10.231.77.2 port 22: Network is unreachable", AWAY, "tcp"),
        (
            "Connection timed out during banner exchange\r\n"
            "Connection to 10.0.0.2 port 22 timed out",
            AWAY,
            "banner",
        ),
        ("kex_exchange_identification: read: Connection reset by peer", AWAY, "banner"),
        ("Timeout, server 10.231.77.2 not responding.", AWAY, "login"),
        (  # ProxyJump, the jump host away: its words come first
            "ssh: connect to host 10.231.77.2 port 22: No route to host\r\n"
            "Connection closed by UNKNOWN port 65535",
            AWAY,
            "tcp",
        ),
        (  # ProxyJump, the jump host up, the target behind it away
            "channel 0: open failed: connect failed: Connection timed out\r\n"
            "stdio forwarding failed\r\nkex_exchange_identification: Connection closed by "
            "remote host\r\nConnection closed by UNKNOWN port 65535",
            AWAY,
            "banner",
        ),
        (
            "No ED25519 host key is known for 10.231.77.2 and you have requested strict "
            "checking.\r\nHost key verification failed.",
            PERSON,
            "hostkey",
        ),
        (
            "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\r\n"
            "@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\r\n"
            "Host key verification failed.",
            PERSON,
            "hostkey",
        ),
        (
            "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\r\n"
            "@       WARNING: REVOKED HOST KEY DETECTED!               @\r\n"
            "Host key for 10.231.77.2 has been revoked.\r\nHost key verification failed.",
            PERSON,
            "hostkey",
        ),
        ("nixspool-cache0@10.231.77.2: Permission denied (publickey).", PERSON, "auth"),
        (  # the target refuses the key behind a working jump: not "away"
            "nixspool-cache1@10.231.90.2: Permission denied (publickey).\r\n"
            "Connection closed by UNKNOWN port 65535",
            PERSON,
            "auth",
        ),
        (
            "Received disconnect from 10.0.0.2 port 22:2: Too many authentication failures",
            PERSON,
            "auth",
        ),
        ("subsystem request failed on channel 0", PERSON, "sftp"),
        (
            "channel 0: open failed: administratively prohibited: open failed\r\n"
            "stdio forwarding failed\r\nkex_exchange_identification: Connection closed by "
            "remote host\r\nConnection closed by UNKNOWN port 65535",
            PERSON,
            "proxy",
        ),
        (
            "/home/alice/.ssh/config: line 3: Bad configuration option: proxyjumpp\r\n"
            "/home/alice/.ssh/config: terminating, 1 bad configuration options",
            PERSON,
            "config",
        ),
        ("Bad owner or permissions on /home/alice/.ssh/config", PERSON, "config"),
        (
            "/bin/bash: line 1: tailscale: command not found\r\n"
            "Connection closed by UNKNOWN port 65535",
            PERSON,
            "proxy",
        ),
        ("Connection closed by UNKNOWN port 65535", PERSON, "proxy"),
        ("something OpenSSH has never said", PERSON, "ssh"),
        ("", PERSON, "ssh"),
    ],
)
def test_ssh_failures_are_told_apart(stderr: str, verdict: Verdict, stage: str) -> None:
    result = classify_ssh(255, stderr)
    assert (result.verdict, result.stage) == (verdict, stage), result
    assert "\r" not in result.message and "@@@" not in result.message


@pytest.mark.parametrize("code", [0, 1, 127])
def test_any_exit_but_255_is_a_login(code: int) -> None:
    """The remote command's status: the host let us in, whatever `true` (or a forced
    command in its place) then did."""
    assert classify_ssh(code, "This service allows sftp connections only.").verdict is Verdict.OK


def test_a_signal_is_our_own_fault() -> None:
    assert classify_ssh(-9, "").verdict is Verdict.ERROR


@pytest.mark.parametrize(
    ("url", "destination"),
    [
        ("ssh-ng://pi", "ssh://pi"),
        ("ssh://cache@nas.lan", "ssh://cache@nas.lan"),
        ("ssh://cache@nas:2222", "ssh://cache@nas:2222"),
        ("ssh-ng://[fd00::2]", "ssh://[fd00::2]"),
        ("sftp://u@pi:2200/srv/cache", "ssh://u@pi:2200"),
    ],
)
def test_the_destination_is_ssh_s_own_uri_form(url: str, destination: str) -> None:
    assert SshTarget.from_url(url).destination == destination


def test_the_probe_runs_ssh_as_nix_copy_does() -> None:
    """The options nix copy gets through NIX_SSHOPTS, and ?ssh-key= as Nix passes it."""
    ssh = SshCommand.of(Remote("pi", "ssh-ng://pi?ssh-key=/k", connect_timeout=3), False)
    assert ssh.running("true") == [
        "ssh",
        *["-o", "ConnectTimeout=3", "-o", "BatchMode=yes", "-o", "ServerAliveInterval=1"],
        *["-o", "ServerAliveCountMax=3", "-o", "StrictHostKeyChecking=yes", "-i", "/k"],
        "ssh://pi",
        "true",
    ]
    assert ssh.subsystem("sftp")[-3:] == ["-s", "ssh://pi", "sftp"]
    assert ssh.resolving()[:2] == ["ssh", "-G"]
