"""Delivered means there: paths a remote lost after delivery come back without a
person (a Nix store over ssh-ng:// and ssh://, a static cache over sftp://), and a
path lost on both sides fails with that reason. Real hosts, real deletes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import lab
from test_operate import parse_metrics

pytestmark = pytest.mark.integration


def delete_on_host(host: lab.LanHost, paths: list[str]) -> None:
    """`nix-store --delete` on the LAN host, in its own store, as its user."""
    result = lab.run_as(host.user, ["nix-store", "--delete", *paths], {}, prefix=host.sshd_mounts())
    assert result.returncode == 0, result.stderr
    assert host.remote_valid(paths) == set()


def leaves(ssh_lab: lab.SshLab, outputs: set[str]) -> list[str]:
    """Outputs nothing else in the set refers to (so the host lets them be deleted)."""
    referred = set(
        lab.sh("nix-store", "--query", "--referrers", *outputs, env=lab_env(ssh_lab)).stdout.split()
    )
    return sorted(o for o in outputs if not (referred - {o}) & outputs)


def lab_env(ssh_lab: lab.SshLab) -> dict[str, str]:
    return {**os.environ, **ssh_lab.daemon.client_env()}


def test_paths_a_remote_lost_are_queued_again_and_delivered(ssh_lab: lab.SshLab) -> None:
    pi, nas = ssh_lab.hosts
    cache = pi.serve_sftp(ssh_lab.alice.public_key, name="reconcile-cache")
    body = (
        f'\n[remotes.pi]\nurl = "ssh-ng://{pi.alias}"\n'
        f'\n[remotes.nas]\nurl = "ssh://{nas.alias}"\n'
        f'\n[remotes.static]\nurl = "{pi.sftp_url(cache)}"\n'
    )
    work = ssh_lab.root / "reconcile"
    # Delivered with reconciling off: nothing has been asked yet.
    config = ssh_lab.config(work, body, reconcile_interval=0)
    outputs = ssh_lab.build(6)
    ssh_lab.spool_in(config, outputs)
    assert ssh_lab.nixspool(config, "flush").returncode == 0
    lost = leaves(ssh_lab, outputs)[:3]
    delete_on_host(pi, lost)
    delete_on_host(nas, lost)
    for path in lost:
        (cache / f"{Path(path).name[:32]}.narinfo").unlink()

    # Past the interval (never asked before): asked, queued again, delivered again.
    config = ssh_lab.config(work, body)  # reconcile_interval: the default, a day
    flushed = ssh_lab.nixspool(config, "flush", "--json")
    assert flushed.returncode == 0, flushed.stderr
    report = json.loads(flushed.stdout)["remotes"]
    assert {name: (r["requeued"], r["delivered"]) for name, r in report.items()} == {
        name: (len(lost), len(lost)) for name in ("pi", "nas", "static")
    }
    assert pi.remote_valid(outputs) == nas.remote_valid(outputs) == outputs
    assert all((cache / f"{Path(p).name[:32]}.narinfo").exists() for p in lost)
    status = json.loads(ssh_lab.nixspool(config, "status", "--json").stdout)["remotes"]
    assert status["pi"]["reconcile_requeued"] == len(lost)
    metrics = parse_metrics(ssh_lab.nixspool(config, "metrics").stdout)
    assert metrics['nixspool_reconcile_requeued{remote="static"}'] == len(lost)
    # Within the interval nothing is asked again: nothing requeued, nothing copied.
    delete_on_host(pi, lost[:1])
    again = json.loads(ssh_lab.nixspool(config, "flush", "--json").stdout)["remotes"]
    assert again["pi"]["requeued"] == 0 and pi.remote_valid(lost[:1]) == set()

    # `verify` asks at once, whatever the interval; the next flush delivers.
    verified = ssh_lab.nixspool(config, "verify", "--json")
    assert verified.returncode == 0, verified.stdout
    checked = json.loads(verified.stdout)
    assert (checked["pi"]["requeued"], checked["nas"]["requeued"]) == (1, 0)
    assert ssh_lab.rows(config, "pi")[lost[0]]["state"] == "queued"
    assert (
        "gone from pi since it was delivered" in ssh_lab.rows(config, "pi")[lost[0]]["last_error"]
    )
    assert ssh_lab.nixspool(config, "flush").returncode == 0
    assert pi.remote_valid(lost[:1]) == set(lost[:1])


def test_a_path_lost_on_both_sides_fails_with_that_reason(ssh_lab: lab.SshLab) -> None:
    pi = ssh_lab.hosts[0]
    body = f'\n[remotes.pi]\nurl = "ssh-ng://{pi.alias}"\n'
    config = ssh_lab.config(ssh_lab.root / "reconcile-both", body)
    outputs = ssh_lab.build(2)
    ssh_lab.spool_in(config, outputs)
    assert ssh_lab.nixspool(config, "flush").returncode == 0
    victim = leaves(ssh_lab, outputs)[0]
    delete_on_host(pi, [victim])
    lab.sh("nix-store", "--delete", victim, env=lab_env(ssh_lab))  # and here
    verified = ssh_lab.nixspool(config, "verify")
    assert verified.returncode == 1, verified.stdout
    assert f"gone from the remote and from this machine: {victim}" in verified.stdout
    row = ssh_lab.rows(config, "pi")[victim]
    assert row["state"] == "failed" and "no longer in the local store" in row["last_error"]
    check = ssh_lab.nixspool(config, "status", "--check")
    assert check.returncode == 1 and "1 rows failed" in check.stdout
