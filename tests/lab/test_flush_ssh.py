"""The flusher against real LAN hosts: sshd in network namespaces, chroot Nix stores."""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

import lab
from nixspool import flush

pytestmark = pytest.mark.integration


def requisites(*paths: str) -> set[str]:
    return set(lab.sh("nix-store", "--query", "--requisites", *paths).stdout.split())


def test_ssh_ng_and_ssh_deliver_every_path_and_its_closure(ssh_lab: lab.SshLab) -> None:
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


def queued_rows(config: Path, remote: str) -> list[dict[str, Any]]:
    rows = json.loads(
        lab.sh(
            lab.installed_program("nixspool"),
            "--config",
            str(config),
            "list",
            "--json",
            "--remote",
            remote,
        ).stdout
    )
    return [r for r in rows if r["state"] == "queued"]


def test_link_down_returns_promptly_keeps_rows_then_delivers(ssh_lab: lab.SshLab) -> None:
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
    assert report["unreachable"] and "Connection timed out" in report["error"]
    rows = queued_rows(config, "pi")
    assert len(rows) == len(outputs)
    assert all(r["attempts"] == 0 and r["last_error"] is None for r in rows)  # not an attempt
    assert host.remote_valid(outputs) == set()

    result = ssh_lab.nixspool(config, "flush", "--remote", "pi")
    assert result.returncode == 0, result.stderr
    assert host.remote_valid(outputs) == outputs


def test_sshd_stopped_is_unreachable_at_once(ssh_lab: lab.SshLab) -> None:
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


def test_each_lan_host_has_its_own_store(ssh_lab: lab.SshLab) -> None:
    # The remote-side checks below mean something only if the hosts are distinct.
    config = ssh_lab.config(ssh_lab.root / "distinct")
    outputs = ssh_lab.build(1)
    ssh_lab.spool_in(config, outputs)
    assert ssh_lab.nixspool(config, "flush", "--remote", "nas").returncode == 0
    assert ssh_lab.hosts[1].remote_valid(outputs) == outputs
    assert ssh_lab.hosts[0].remote_valid(outputs) == set()


def test_one_remote_down_does_not_hold_up_the_other(ssh_lab: lab.SshLab) -> None:
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


def test_started_as_root_ssh_runs_as_the_user(ssh_lab: lab.SshLab) -> None:
    config = ssh_lab.config(ssh_lab.root / "asuser")
    ssh_lab.spool_in(config, ssh_lab.build(2))
    ssh_lab.alice.uid_log.write_text("")
    logins_before = len(ssh_lab.hosts[0].logins())
    result = ssh_lab.nixspool(config, "flush", "--remote", "pi")
    assert result.returncode == 0, result.stderr
    # Locally: every ssh that connected ran as alice (her ~/.ssh/config's LocalCommand).
    alice_uid = int(lab.sh("id", "-u", lab.ALICE).stdout)
    assert ssh_lab.alice.ssh_uids() and set(ssh_lab.alice.ssh_uids()) == {alice_uid}
    # Remotely: the login was the host's cache account (from alice's ~/.ssh/config) with
    # alice's key (the probe's login and nix copy's).
    new = ssh_lab.hosts[0].logins()[logins_before:]
    assert len(new) >= 2
    assert all(
        f"for {ssh_lab.hosts[0].user} " in line and ssh_lab.alice.fingerprint in line
        for line in new
    )


def test_root_without_a_user_refuses_to_run_ssh(ssh_lab: lab.SshLab) -> None:
    config = ssh_lab.config(ssh_lab.root / "nouser")
    text = config.read_text().replace(f'user = "{lab.ALICE}"\n', "")
    config.write_text(text)
    ssh_lab.spool_in(config, ssh_lab.build(1))
    result = ssh_lab.nixspool(config, "flush")
    assert result.returncode == 1
    assert "the config names no 'user'" in result.stderr


def test_a_path_garbage_collected_before_the_flush_fails_with_that_reason(
    ssh_lab: lab.SshLab,
) -> None:
    config = ssh_lab.config(ssh_lab.root / "gcd", gc_roots=False)
    outputs = sorted(ssh_lab.build(2))  # three paths, none depends on another
    ssh_lab.spool_in(config, set(outputs))
    lab.sh("nix-store", "--delete", outputs[0])
    result = ssh_lab.nixspool(config, "flush", "--remote", "pi", "--json")
    assert result.returncode == 1
    (failure,) = json.loads(result.stdout)["remotes"]["pi"]["failures"]
    assert failure["path"] == outputs[0]
    assert "garbage-collected" in failure["error"]
    assert ssh_lab.hosts[0].remote_valid(outputs) == set(outputs[1:])
    status = json.loads(ssh_lab.nixspool(config, "status", "--json").stdout)
    assert "garbage-collected" in status["remotes"]["pi"]["last_error"]


def test_queued_paths_are_gc_roots_until_delivered(ssh_lab: lab.SshLab) -> None:
    config = ssh_lab.config(ssh_lab.root / "roots", connect_timeout=1)
    outputs = sorted(ssh_lab.build(1))
    ssh_lab.spool_in(config, set(outputs))
    ssh_lab.hosts[0].stop_sshd()
    try:
        assert ssh_lab.nixspool(config, "flush", "--remote", "pi").returncode == 75
    finally:
        ssh_lab.hosts[0].start_sshd()
    deleted = lab.sh("nix-store", "--delete", outputs[0], check=False)
    assert deleted.returncode != 0 and "still alive" in deleted.stderr
    assert ssh_lab.nixspool(config, "flush").returncode == 0  # both remotes now
    lab.sh("nix-store", "--delete", outputs[0])  # delivered everywhere: no longer a root


def test_sigkill_mid_upload_then_a_second_flush_delivers_everything_once(
    ssh_lab: lab.SshLab,
) -> None:
    config = ssh_lab.config(ssh_lab.root / "kill", batch_size=4)
    outputs = ssh_lab.build(12, bytes_each=4 << 20)
    ssh_lab.spool_in(config, outputs)
    env = ssh_lab.daemon.root_env()
    ssh_lab.hosts[0].shape("100mbit")  # 48 MB take seconds: the kill lands mid-upload
    try:
        flusher = subprocess.Popen(
            [lab.installed_program("nixspool"), "--config", str(config), "flush", "--remote", "pi"],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while not ssh_lab.hosts[0].remote_valid(outputs):  # kill it once uploads have begun
            assert flusher.poll() is None, "the flush finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        flusher.kill()
        flusher.wait()
    finally:
        ssh_lab.hosts[0].shape(None)
    # The kernel kills them with their parent (a parent-death signal): none may be
    # left half a second later (the bound the test always had; now it stops early).
    deadline = time.monotonic() + 0.5
    while orphans := lab.sh(
        "pgrep", "-f", f"nix.*copy --to ssh-ng://{ssh_lab.hosts[0].alias}", check=False
    ).stdout.split():
        assert time.monotonic() < deadline, f"nix copy outlived the flusher: {orphans}"
        time.sleep(0.05)
    partly = ssh_lab.hosts[0].remote_valid(outputs)
    assert 0 < len(partly) < len(outputs)
    result = ssh_lab.nixspool(config, "flush", "--remote", "pi")
    assert result.returncode == 0, result.stderr
    assert ssh_lab.hosts[0].remote_valid(outputs) == outputs
    rows = json.loads(ssh_lab.nixspool(config, "list", "--json", "--remote", "pi").stdout)
    assert {r["state"] for r in rows} == {"delivered"}
    assert {r["attempts"] for r in rows} == {1}  # marked once, by the flush that copied it


def test_two_flushers_started_together_deliver_everything_once(ssh_lab: lab.SshLab) -> None:
    config = ssh_lab.config(ssh_lab.root / "two")
    outputs = ssh_lab.build(6)
    ssh_lab.spool_in(config, outputs)
    env = ssh_lab.daemon.root_env()
    argv = [lab.installed_program("nixspool"), "--config", str(config), "flush"]
    procs = [subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    codes = sorted(p.wait(timeout=120) for p in procs)
    assert codes in ([0, 0], [0, 75]), [p.communicate()[1] for p in procs]
    for host in ssh_lab.hosts:
        assert host.remote_valid(outputs) == outputs
    rows = json.loads(ssh_lab.nixspool(config, "list", "--json").stdout)
    assert len(rows) == 2 * len(outputs)
    assert {(r["state"], r["attempts"]) for r in rows} == {("delivered", 1)}


def test_a_remote_that_rejects_one_path_fails_only_that_row(ssh_lab: lab.SshLab) -> None:
    config = ssh_lab.config(ssh_lab.root / "reject")
    signed = ssh_lab.build(5)
    # A daemon without the signing key builds one path the LAN host will refuse.
    # The lab's own: a second daemon in its directory raced it for the socket.
    unsigned = ssh_lab.build(1, daemon=ssh_lab.unsigned)
    ssh_lab.spool_in(config, signed | unsigned)
    result = ssh_lab.nixspool(config, "flush", "--remote", "pi", "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)["remotes"]["pi"]
    assert len(unsigned) == 2  # one derivation, two outputs
    assert (report["delivered"], report["failed"]) == (len(signed), len(unsigned))
    assert {f["path"] for f in report["failures"]} == unsigned
    assert all(lab.unsigned_refusal() in f["error"] for f in report["failures"])
    assert ssh_lab.hosts[0].remote_valid(signed | unsigned) == signed


@pytest.mark.parametrize("count", [1, 3, 16])
def test_a_remote_that_refuses_every_path_is_one_error_not_2n_copies(
    ssh_lab: lab.SshLab, count: int
) -> None:
    """The host trusts none of our keys: every path is refused alike. Bisection
    follows the first halves while both halves are refused in their parent's
    words, down to one path: the remote's error (exit 1), every row still queued
    with the reason and one attempt, none failed, in 1 + 2·floor(log2 N) copies
    instead of 2N-1. A batch of one path (the flush after one build) is the same:
    nothing says the refusal is the path's own."""
    host = ssh_lab.hosts[0]
    nix_conf = Path(os.path.expanduser(f"~{host.user}")) / ".config" / "nix" / "nix.conf"
    trusting = nix_conf.read_text()
    config = ssh_lab.config(ssh_lab.root / f"refuses-all-{count}", batch_size=16)
    outputs = set(sorted(ssh_lab.build(12))[:count])
    assert len(outputs) == count
    ssh_lab.spool_in(config, outputs)
    logins = len(host.logins())
    nix_conf.write_text(
        "\n".join(
            line for line in trusting.splitlines() if not line.startswith("trusted-public-keys")
        )
        + "\n"
    )
    try:
        result = ssh_lab.nixspool(config, "flush", "--remote", "pi", "--json")
    finally:
        nix_conf.write_text(trusting)
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)["remotes"]["pi"]
    assert (report["delivered"], report["failed"], report["unreachable"]) == (0, 0, False)
    alike = "refuses the one path offered" if count == 1 else "refuses every path alike"
    assert alike in report["error"]
    assert lab.unsigned_refusal() in report["error"]
    rows = ssh_lab.rows(config, "pi")
    assert {(r["state"], r["attempts"]) for r in rows.values()} == {("queued", 1)}
    assert all(lab.unsigned_refusal() in r["last_error"] for r in rows.values())
    # One login for the probe, one per nix copy.
    copies = len(host.logins()) - logins - 1
    assert copies == 1 + 2 * int(math.log2(count)), copies  # 2N-1 before; N=3 failed all


def test_a_remote_whose_nix_is_missing_is_an_error_with_its_message(ssh_lab: lab.SshLab) -> None:
    """The host answers SSH but its Nix does not start: not "away" (75, retried for
    ever, nothing in status), but an error a person sees, with what Nix said."""
    host = ssh_lab.hosts[0]
    config = ssh_lab.config(
        ssh_lab.root / "no-remote-nix",
        f'\n[remotes.pi]\nurl = "ssh-ng://{host.alias}?remote-program=/nonexistent/nix-daemon"\n',
        retry_min=600,  # the second flush below must find the rows still on backoff
        retry_max=1200,
    )
    outputs = ssh_lab.build(1)
    ssh_lab.spool_in(config, outputs)
    result = ssh_lab.nixspool(config, "flush", "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)["remotes"]["pi"]
    assert not report["unreachable"]
    assert "the host answers SSH, but Nix there did not" in report["error"], report
    rows = queued_rows(config, "pi")
    assert len(rows) == len(outputs)  # kept, and told why
    assert all(r["attempts"] == 1 and "Nix there did not" in r["last_error"] for r in rows)
    # The rows now wait on backoff. The next flush tries nothing, and still says the
    # remote needs a person (it used to exit 0, "none due", until the backoff ended);
    # monitoring fails at once.
    again = ssh_lab.nixspool(config, "flush", "--json")
    assert again.returncode == 1, again.stderr
    assert json.loads(again.stdout)["remotes"]["pi"]["error"] == report["error"]
    assert {r["attempts"] for r in queued_rows(config, "pi")} == {1}  # nothing tried
    check = ssh_lab.nixspool(config, "status", "--check", "--json")
    assert check.returncode == 1, check.stdout
    assert json.loads(check.stdout)["problems"] == [f"pi: needs a person: {report['error']}"]
    # Fixed by a person, retried: delivered, and no longer flagged.
    config.write_text(config.read_text().replace("?remote-program=/nonexistent/nix-daemon", ""))
    assert ssh_lab.nixspool(config, "retry", "--remote", "pi", *outputs).returncode == 0
    fixed = ssh_lab.nixspool(config, "flush")
    assert fixed.returncode == 0, fixed.stderr
    assert ssh_lab.nixspool(config, "status", "--check").returncode == 0


def test_a_remote_with_a_full_disk_keeps_rows_queued_with_the_reason(ssh_lab: lab.SshLab) -> None:
    host = ssh_lab.hosts[0]
    config = ssh_lab.config(ssh_lab.root / "disk-full")
    outputs = ssh_lab.build(1, bytes_each=16 << 20)
    ssh_lab.spool_in(config, outputs)
    with host.full_store_disk():
        result = ssh_lab.nixspool(config, "flush", "--remote", "pi", "--json")
    assert result.returncode == 75, result.stderr  # transient: retried later
    report = json.loads(result.stdout)["remotes"]["pi"]
    assert (report["deferred"], report["failed"]) == (len(outputs), 0), report
    rows = queued_rows(config, "pi")
    assert len(rows) == len(outputs)
    errors = [(r["last_error"] or "").lower() for r in rows]
    # Nix says it one way or the other, depending on what filled the disk first.
    full = ("no space left on device", "database or disk is full")
    assert all(any(f in e for f in full) for e in errors), (errors, result.stderr)


def test_an_unknown_host_key_is_refused_loudly_and_rows_stay(ssh_lab: lab.SshLab) -> None:
    config = ssh_lab.config(ssh_lab.root / "hostkey")
    outputs = ssh_lab.build(1)
    ssh_lab.spool_in(config, outputs)
    known_hosts = ssh_lab.alice.ssh_dir / "known_hosts"
    saved = known_hosts.read_text()
    known_hosts.write_text("")
    try:
        result = ssh_lab.nixspool(config, "flush", "--remote", "pi", "--json")
        assert result.returncode == 1
        error = json.loads(result.stdout)["remotes"]["pi"]["error"]
        assert "Host key verification failed" in error  # alice's ssh says so too
        assert ssh_lab.alice.ssh(ssh_lab.hosts[0].alias).returncode == 255
        assert len(queued_rows(config, "pi")) == len(outputs)
        # Told to, it records the key and goes on.
        config.write_text(
            config.read_text().replace("retry_min", "accept_new_host_keys = true\nretry_min")
        )
        result = ssh_lab.nixspool(config, "flush", "--remote", "pi")
        assert result.returncode == 0, result.stderr
        found = lab.sh("ssh-keygen", "-F", ssh_lab.hosts[0].address, "-f", str(known_hosts))
        assert ssh_lab.hosts[0].host_key[1] in found.stdout
    finally:
        known_hosts.write_text(saved)


def test_a_key_the_host_does_not_accept_is_refused_loudly(ssh_lab: lab.SshLab) -> None:
    config = ssh_lab.config(ssh_lab.root / "badkey")
    ssh_lab.spool_in(config, ssh_lab.build(1))
    ssh_lab.hosts[1].authorize(
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJv8ZrSSxcuMqYT9KBIvlMlr0CtLl"
        "Jq9oXqYkVp+nWmc someone-else"
    )
    try:
        result = ssh_lab.nixspool(config, "flush", "--remote", "nas", "--json")
    finally:
        ssh_lab.hosts[1].authorize(ssh_lab.alice.public_key)
    assert result.returncode == 1
    assert "Permission denied (publickey)" in json.loads(result.stdout)["remotes"]["nas"]["error"]


def test_started_as_the_user_it_runs_directly(ssh_lab: lab.SshLab) -> None:
    config = ssh_lab.config(ssh_lab.root / "byalice")
    outputs = ssh_lab.build(2)
    ssh_lab.spool_in(config, outputs)
    env = ssh_lab.daemon.client_env()
    env.pop("NIX_REMOTE")
    result = lab.run_as(
        lab.ALICE,
        [lab.installed_program("nixspool"), "--config", str(config), "flush", "--remote", "pi"],
        env,
    )
    assert result.returncode == 0, result.stderr
    assert ssh_lab.hosts[0].remote_valid(outputs) == outputs


def test_started_as_another_user_it_refuses(ssh_lab: lab.SshLab) -> None:
    config = ssh_lab.config(ssh_lab.root / "byother")
    ssh_lab.spool_in(config, ssh_lab.build(1))
    result = lab.run_as(
        lab.BUILDER,
        [lab.installed_program("nixspool"), "--config", str(config), "flush"],
        ssh_lab.daemon.client_env(),
    )
    assert result.returncode == 1
    assert result.stderr == (
        f"error: nixspool flush runs as root or as {lab.ALICE} (the "
        f"config's 'user'), not as {lab.BUILDER}\n"
    )


def test_a_copy_past_copy_timeout_counts_backs_off_goes_alone_then_fails(
    ssh_lab: lab.SshLab,
) -> None:
    """Our own bound is not "the host is away": each time counts an attempt, the
    rows then go one by one (the small ones arrive), and the path that cannot make
    it within copy_timeout alone fails, with the fix, where status shows it."""
    host = ssh_lab.hosts[0]
    config = ssh_lab.config(
        ssh_lab.root / "slow",
        f'\n[remotes.pi]\nurl = "ssh-ng://{host.alias}"\n',
        copy_timeout=3,
        retry_min=1,
        retry_max=1,
        connect_timeout=10,  # the probe shares the busy link with the first copy
    )
    small = ssh_lab.build(3)
    big = ssh_lab.build(1, bytes_each=48 << 20)  # its `out`: 20 s at 20 Mbit/s
    huge = next(p for p in big if not p.endswith("-dev"))
    ssh_lab.spool_in(config, small | big)
    host.shape("20mbit")
    try:
        first = ssh_lab.nixspool(config, "flush", "--json")
        assert first.returncode == 75, first.stderr
        report = json.loads(first.stdout)["remotes"]["pi"]
        assert not report["unreachable"] and report["deferred"] == len(small | big), report
        rows = ssh_lab.rows(config, "pi")
        assert {r["attempts"] for r in rows.values()} == {1}
        assert all(r["last_error"].startswith(flush.TIMED_OUT) for r in rows.values())
        assert flush.TIMEOUTS_ALONE == 3  # the steps below
        lab.shift_clock(config, -2)  # past retry_max (1 s): due again, attempts kept
        second = ssh_lab.nixspool(config, "flush")
        assert second.returncode == 75, second.stderr
        rows = ssh_lab.rows(config, "pi")
        assert rows[huge]["state"] == "queued" and rows[huge]["attempts"] == 2
        assert {p for p, r in rows.items() if r["state"] == "delivered"} == (small | big) - {huge}
        lab.shift_clock(config, -2)
        last = ssh_lab.nixspool(config, "flush", "--json")
    finally:
        host.shape(None)
    assert last.returncode == 1, last.stderr
    rows = ssh_lab.rows(config, "pi")
    assert rows[huge]["state"] == "failed"
    assert rows[huge]["attempts"] == flush.TIMEOUTS_ALONE
    assert "raise copy_timeout for pi" in rows[huge]["last_error"]
    assert {p for p, r in rows.items() if r["state"] == "delivered"} == (small | big) - {huge}
    assert host.remote_valid(small | big) == (small | big) - {huge}
    status = json.loads(ssh_lab.nixspool(config, "status", "--json").stdout)["remotes"]["pi"]
    assert status["failed"] == 1


def test_a_flush_says_one_line_per_remote(ssh_lab: lab.SshLab) -> None:
    """Not "3 of 3 paths delivered" and then the summary: one line each, on stderr,
    as journald keeps it."""
    config = ssh_lab.config(ssh_lab.root / "oneline")
    outputs = ssh_lab.build(3)
    ssh_lab.spool_in(config, outputs)
    result = ssh_lab.nixspool(config, "flush")
    assert result.returncode == 0, result.stderr
    for remote in ("pi", "nas"):
        lines = [line for line in result.stderr.splitlines() if line.startswith(f"{remote}:")]
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(
            f"{remote}: {len(outputs)} delivered, 0 failed, 0 still queued ("
        )


def test_a_known_hosts_line_ssh_skips_does_not_stop_a_flush(ssh_lab: lab.SshLab) -> None:
    """OpenSSH skips a known_hosts line it cannot parse. nixspool's verdict is
    OpenSSH's: alice's ssh logs in, so the flush delivers and doctor is content
    (an earlier paramiko probe called this host away, then needs-a-person, while
    nix copy itself would have worked)."""
    config = ssh_lab.config(ssh_lab.root / "bad-known-hosts")
    outputs = ssh_lab.build(1)
    ssh_lab.spool_in(config, outputs)
    known_hosts = ssh_lab.alice.ssh_dir / "known_hosts"
    saved = known_hosts.read_text()
    known_hosts.write_text(saved + "oldhost ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIO\n")
    try:
        by_hand = ssh_lab.alice.ssh(ssh_lab.hosts[0].alias)
        flushed = ssh_lab.nixspool(config, "flush", "--remote", "pi", "--json")
        doctor = ssh_lab.nixspool(config, "doctor", "--json")
    finally:
        known_hosts.write_text(saved)
    assert by_hand.returncode == 0, by_hand.stderr
    assert flushed.returncode == 0, flushed.stderr
    assert json.loads(flushed.stdout)["remotes"]["pi"]["delivered"] == len(outputs)
    assert [c for c in json.loads(doctor.stdout) if c["name"] == "remote pi" and not c["ok"]] == []


def test_a_copy_that_moves_nothing_is_stopped_by_the_stall_bound(ssh_lab: lab.SshLab) -> None:
    """The host answers SSH (and ssh's keep-alives), but what should be its Nix hangs
    without a word, as a Nix holding its store lock does: the flush stops it after
    stall_timeout, not after copy_timeout (an hour), and the rows wait with backoff."""
    host = ssh_lab.hosts[0]
    hanging = ssh_lab.root / "hanging-nix-daemon"
    hanging.write_text("#!/bin/sh\nexec sleep 600\n")
    hanging.chmod(0o755)
    body = f'\n[remotes.pi]\nurl = "ssh-ng://{host.alias}?remote-program={hanging}"\n'
    config = ssh_lab.config(ssh_lab.root / "stalled", body, stall_timeout=4)
    outputs = ssh_lab.build(1)
    ssh_lab.spool_in(config, outputs)
    started = time.monotonic()
    result = ssh_lab.nixspool(config, "flush", "--json", timeout=300)
    took = time.monotonic() - started
    assert result.returncode == 75, result.stderr  # the host is there: try later
    assert took < 4 + 15, f"the flush took {took:.1f} s"
    report = json.loads(result.stdout)["remotes"]["pi"]
    assert (report["deferred"], report["delivered"], report["unreachable"]) == (
        len(outputs),
        0,
        False,
    )
    rows = queued_rows(config, "pi")
    assert all(r["attempts"] == 1 for r in rows)
    assert all(
        r["last_error"].startswith("nix copy moved nothing for 4 s (stall_timeout)") for r in rows
    ), rows
