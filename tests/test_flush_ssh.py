"""The flusher against real LAN hosts: sshd in network namespaces, chroot Nix stores."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import lab

pytestmark = pytest.mark.integration


def requisites(*paths: str) -> set[str]:
    return set(lab.sh("nix-store", "--query", "--requisites", *paths).stdout.split())


def test_ssh_ng_and_ssh_deliver_every_path_and_its_closure(ssh_lab) -> None:
    config = ssh_lab.config(ssh_lab.root / "basic")
    outputs = ssh_lab.build(9)
    # Spool only the paths that refer to another one: the closure must follow.
    dependents = {p for p in outputs if len(requisites(p)) > 1}
    assert len(dependents) == 2
    ssh_lab.spool_in(config, dependents)
    result = ssh_lab.nixspool(config, "flush", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["remotes"]["pi"]["delivered"] == 2
    assert report["remotes"]["nas"]["delivered"] == 2
    closure = requisites(*dependents)
    assert len(closure) == 4
    for host in ssh_lab.hosts:  # asked on the LAN hosts themselves
        assert host.remote_valid(closure) == closure


def queued_rows(config: Path, remote: str) -> list[dict]:
    rows = json.loads(lab.sh(lab.installed_program("nixspool"), "--config", str(config), "list",
                             "--json", "--remote", remote).stdout)
    return [r for r in rows if r["state"] == "queued"]


def test_link_down_returns_promptly_keeps_rows_then_delivers(ssh_lab) -> None:
    config = ssh_lab.config(ssh_lab.root / "link", connect_timeout=2)
    outputs = ssh_lab.build(4)
    ssh_lab.spool_in(config, outputs)
    host = ssh_lab.hosts[0]
    host.link_down()
    try:
        started = time.monotonic()
        result = ssh_lab.nixspool(config, "flush", "--remote", "pi", "--json")
        took = time.monotonic() - started
    finally:
        host.link_up()
    assert result.returncode == 75, result.stderr
    assert took < 2 + 5, f"flush took {took:.1f} s with the link down"
    report = json.loads(result.stdout)["remotes"]["pi"]
    assert report["unreachable"] and "no answer from" in report["error"]
    rows = queued_rows(config, "pi")
    assert len(rows) == len(outputs)
    assert all(r["attempts"] == 0 and r["last_error"] is None for r in rows)  # not an attempt
    assert host.remote_valid(outputs) == set()

    result = ssh_lab.nixspool(config, "flush", "--remote", "pi")
    assert result.returncode == 0, result.stderr
    assert host.remote_valid(outputs) == outputs


def test_sshd_stopped_is_unreachable_at_once(ssh_lab) -> None:
    config = ssh_lab.config(ssh_lab.root / "refused", connect_timeout=10)
    ssh_lab.spool_in(config, ssh_lab.build(2))
    host = ssh_lab.hosts[1]
    host.stop_sshd()
    try:
        started = time.monotonic()
        result = ssh_lab.nixspool(config, "flush", "--remote", "nas", "--json")
        took = time.monotonic() - started
    finally:
        host.start_sshd()
    assert result.returncode == 75
    assert took < 5  # refused, not timed out
    assert "Connection refused" in json.loads(result.stdout)["remotes"]["nas"]["error"]


def test_one_remote_down_does_not_hold_up_the_other(ssh_lab) -> None:
    config = ssh_lab.config(ssh_lab.root / "onedown", connect_timeout=2)
    outputs = ssh_lab.build(3)
    ssh_lab.spool_in(config, outputs)
    ssh_lab.hosts[1].link_down()
    try:
        result = ssh_lab.nixspool(config, "flush", "--json")
    finally:
        ssh_lab.hosts[1].link_up()
    assert result.returncode == 75
    report = json.loads(result.stdout)["remotes"]
    assert (report["pi"]["delivered"], report["pi"]["queued"]) == (len(outputs), 0)
    assert (report["nas"]["delivered"], report["nas"]["queued"]) == (0, len(outputs))
    assert ssh_lab.hosts[0].remote_valid(outputs) == outputs


def test_started_as_root_ssh_runs_as_the_user(ssh_lab) -> None:
    config = ssh_lab.config(ssh_lab.root / "asuser")
    ssh_lab.spool_in(config, ssh_lab.build(2))
    ssh_lab.alice.uid_log.write_text("")
    logins_before = len(ssh_lab.hosts[0].logins())
    result = ssh_lab.nixspool(config, "flush", "--remote", "pi")
    assert result.returncode == 0, result.stderr
    # Locally: every ssh that connected ran as alice (her ~/.ssh/config's LocalCommand).
    alice_uid = int(lab.sh("id", "-u", lab.ALICE).stdout)
    assert ssh_lab.alice.ssh_uids() and set(ssh_lab.alice.ssh_uids()) == {alice_uid}
    # Remotely: the login was the cache account (from alice's ~/.ssh/config) with
    # alice's key (the probe's login and nix copy's).
    new = ssh_lab.hosts[0].logins()[logins_before:]
    assert len(new) >= 2
    assert all(f"for {lab.CACHE} " in line and ssh_lab.alice.fingerprint in line for line in new)


def test_root_without_a_user_refuses_to_run_ssh(ssh_lab) -> None:
    config = ssh_lab.config(ssh_lab.root / "nouser")
    text = config.read_text().replace(f'user = "{lab.ALICE}"\n', "")
    config.write_text(text)
    ssh_lab.spool_in(config, ssh_lab.build(1))
    result = ssh_lab.nixspool(config, "flush")
    assert result.returncode == 1
    assert "the config names no 'user'" in result.stderr
