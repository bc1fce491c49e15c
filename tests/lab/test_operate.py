"""Operating nixspool against the lab: filters, `add`, metrics, signing a path the
remote already had, and several builders flushing to one cache at once."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

import lab
from nixspool import nix

pytestmark = pytest.mark.integration


def nix_env(ssh_lab: lab.SshLab) -> dict[str, str]:
    return {**os.environ, **ssh_lab.daemon.client_env()}


def nar_sizes(ssh_lab: lab.SshLab, paths: set[str]) -> dict[str, int]:
    infos = nix.path_infos(sorted(paths), env=nix_env(ssh_lab))
    return {p: i.nar_size for p, i in infos.items()}


def test_filters_leave_paths_out_by_name_and_closure_size_and_say_why(
    ssh_lab: lab.SshLab,
) -> None:
    # test-4's output refers to test-3's: its closure is both, about 2 x 64 KiB.
    outputs = ssh_lab.build(5, bytes_each=64 * 1024)
    by_name = {p.split("-", 1)[1]: p for p in outputs}
    body = (
        f'[remotes.pi]\nurl = "ssh-ng://{ssh_lab.hosts[0].alias}"\n'
        'exclude = ["*-dev"]\nmax_size = "100K"\n'
        f'[remotes.nas]\nurl = "ssh://{ssh_lab.hosts[1].alias}"\n'
        'include = ["nixspool-test-1"]\n'
    )
    config = ssh_lab.config(ssh_lab.root / "filters", body)
    ssh_lab.spool_in(config, outputs)
    result = ssh_lab.nixspool(config, "flush")
    assert result.returncode == 0, result.stderr
    assert "pi: 4 delivered, 0 failed, 3 left out by filters, 0 still queued" in result.stderr, (
        result.stderr
    )

    pi = ssh_lab.rows(config, "pi")
    skipped = {p: r["last_error"] for p, r in pi.items() if r["state"] == "skipped"}
    dev = {by_name["nixspool-test-0-dev"], by_name["nixspool-test-3-dev"]}
    assert set(skipped) == dev | {by_name["nixspool-test-4"]}
    for path in dev:
        assert skipped[path] == "left out by pi's exclude pattern '*-dev'"
    assert skipped[by_name["nixspool-test-4"]].startswith("left out: its closure is 128.")
    assert skipped[by_name["nixspool-test-4"]].endswith("over pi's max_size of 100.0 KiB")
    assert all(r["attempts"] == 0 for r in pi.values() if r["state"] == "skipped")
    delivered = {p for p, r in pi.items() if r["state"] == "delivered"}
    assert ssh_lab.hosts[0].remote_valid(outputs) == delivered  # nothing skipped went
    nas = ssh_lab.rows(config, "nas")
    assert {p for p, r in nas.items() if r["state"] == "delivered"} == {by_name["nixspool-test-1"]}
    assert ssh_lab.hosts[1].remote_valid(outputs) == {by_name["nixspool-test-1"]}

    status = json.loads(ssh_lab.nixspool(config, "status", "--json").stdout)["remotes"]["pi"]
    assert (status["skipped"], status["delivered"], status["queued"]) == (3, 4, 0)
    assert status["delivered_bytes"] == sum(nar_sizes(ssh_lab, delivered).values())
    listed = ssh_lab.nixspool(config, "list", "--state", "skipped", "--remote", "pi").stdout
    assert listed.count("skipped") == 3

    # Raise the cap, retry what was skipped: the closure goes whole, dependency and all.
    config.write_text(config.read_text().replace('max_size = "100K"', 'max_size = "1M"'))
    retried = ssh_lab.nixspool(config, "retry", "--all-skipped", "--remote", "pi")
    assert retried.stdout.strip() == "requeued 3 rows", retried.stderr
    result = ssh_lab.nixspool(config, "flush", "--remote", "pi", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)["remotes"]["pi"]
    assert (report["delivered"], report["skipped"]) == (1, 2)
    assert ssh_lab.hosts[0].remote_valid(outputs) == delivered | {by_name["nixspool-test-4"]}


def test_add_queues_store_paths_result_links_and_closures(ssh_lab: lab.SshLab) -> None:
    outputs = ssh_lab.build(5)
    dependent = next(p for p in outputs if p.endswith("-test-4"))
    dependency = next(p for p in outputs if p.endswith("-test-3"))
    work = ssh_lab.root / "add"
    config = ssh_lab.config(work)
    (work / "result").symlink_to(dependent)

    inside = ssh_lab.nixspool(config, "add", f"{dependent}/bin")
    assert inside.returncode == 2
    assert f"is inside the store path {dependent}; name that instead" in inside.stderr
    missing = ssh_lab.nixspool(config, "add", "/nix/store/" + "0" * 32 + "-never-built")
    assert missing.returncode == 2 and "not valid in the local store" in missing.stderr
    assert ssh_lab.nixspool(config, "add", str(work)).returncode == 2  # not a store path
    assert json.loads(ssh_lab.nixspool(config, "status", "--json").stdout)["paths"] == 0

    added = ssh_lab.nixspool(config, "add", "--closure", "--json", str(work / "result"))
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout) == {
        "added": sorted([dependent, dependency]),
        "already_in_spool": [],
    }
    rest = sorted(outputs - {dependent, dependency})
    again = subprocess.run(
        [lab.installed_program("nixspool"), "--config", str(config), "add", "--stdin"],
        input="\n".join([dependent, *rest]) + "\n",
        env={**os.environ, **ssh_lab.daemon.client_env()},
        text=True,
        capture_output=True,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == (
        f"added {len(rest)} paths (1 were in the spool already); `nixspool flush` uploads them"
    )
    # Only who may write the spool may add: a request to sign and upload.
    other = lab.run_as(
        f"{lab.CACHE}0",
        [lab.installed_program("nixspool"), "--config", str(config), "add", dependent],
        ssh_lab.daemon.client_env(),
    )
    assert other.returncode == 1 and "permission denied" in other.stderr, other.stderr

    result = ssh_lab.nixspool(config, "flush", "--remote", "pi", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["remotes"]["pi"]["delivered"] == len(outputs)
    assert ssh_lab.hosts[0].remote_valid(outputs) == outputs


def parse_metrics(text: str) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_metrics_are_written_after_each_flush_and_on_demand(ssh_lab: lab.SshLab) -> None:
    work = ssh_lab.root / "metrics"
    textfiles = work / "textfiles"
    textfiles.mkdir(parents=True)
    prom = textfiles / "nixspool.prom"
    # A link planted at the name is replaced, never followed.
    victim = work / "victim"
    victim.write_text("untouched\n")
    prom.symlink_to(victim)
    config = ssh_lab.config(work, metrics_file=str(prom))
    outputs = ssh_lab.build(3)
    ssh_lab.spool_in(config, outputs)
    ssh_lab.hosts[1].link_down()
    try:
        result = ssh_lab.nixspool(config, "flush")
    finally:
        ssh_lab.hosts[1].link_up()
    assert result.returncode == 75, result.stderr
    assert victim.read_text() == "untouched\n"
    assert not prom.is_symlink() and oct(prom.stat().st_mode & 0o777) == "0o644"
    text = prom.read_text()
    assert "# TYPE nixspool_rows gauge" in text
    m = parse_metrics(text)
    n = len(outputs)
    assert m['nixspool_rows{remote="pi",state="delivered"}'] == n
    assert m['nixspool_rows{remote="nas",state="queued"}'] == n
    assert m['nixspool_last_flush_exit_code{remote="pi"}'] == 0
    assert m['nixspool_last_flush_exit_code{remote="nas"}'] == 75
    assert m['nixspool_oldest_queued_age_seconds{remote="nas"}'] > 0
    assert m['nixspool_oldest_queued_age_seconds{remote="pi"}'] == 0
    assert m['nixspool_delivered_bytes{remote="pi"}'] == sum(nar_sizes(ssh_lab, outputs).values())
    assert 'nixspool_last_delivery_timestamp_seconds{remote="nas"}' not in m
    assert m["nixspool_paths"] == n
    # On demand, the same figures, with no flush.
    printed = ssh_lab.nixspool(config, "metrics")
    assert printed.returncode == 0, printed.stderr
    assert parse_metrics(printed.stdout)['nixspool_rows{remote="nas",state="queued"}'] == n
    unwritable = ssh_lab.nixspool(config, "metrics", "--output", "/nonexistent/x.prom")
    assert unwritable.returncode == 1 and "error: /nonexistent" in unwritable.stderr


def test_a_path_the_remote_had_without_our_signature_is_signed_there(
    ssh_lab: lab.SshLab,
) -> None:
    """Nix adds no signature to a path the remote has (NixOS/nix#4981): uploaded
    earlier by another tool, it would fail `verify` for ever."""
    outputs = ssh_lab.build(3)  # signed by the daemon's key, which the hosts trust
    for host, scheme in zip(ssh_lab.hosts, ("ssh-ng", "ssh"), strict=True):
        copied = lab.run_as(
            lab.ALICE,
            [*nix.NIX, "copy", "--to", f"{scheme}://{host.alias}", *outputs],
            ssh_lab.daemon.client_env(),
        )
        assert copied.returncode == 0, copied.stderr
    key = ssh_lab.nixspool_key
    body = (
        f'[remotes.pi]\nurl = "ssh-ng://{ssh_lab.hosts[0].alias}"\nsign_key_file = "{key}"\n'
        f'[remotes.nas]\nurl = "ssh://{ssh_lab.hosts[1].alias}"\nsign_key_file = "{key}"\n'
    )
    config = ssh_lab.config(ssh_lab.root / "resign", body)
    ssh_lab.spool_in(config, outputs)
    result = ssh_lab.nixspool(config, "flush", "--json")
    report = json.loads(result.stdout)["remotes"]
    n = len(outputs)
    assert (report["pi"]["delivered"], report["pi"]["resigned"]) == (n, n), result.stderr
    assert report["pi"]["unverified"] == 0
    assert {r["verified"] for r in ssh_lab.rows(config, "pi").values()} == {True}
    # ssh:// (nix-store --serve) cannot add a signature: said, and counted.
    assert result.returncode == 1
    assert (report["nas"]["unverified"], report["nas"]["resigned"]) == (n, 0)
    assert "ssh:// cannot add signatures to a path the remote has; ssh-ng:// can" in result.stderr
    verified = ssh_lab.nixspool(config, "verify", "--remote", "pi")
    delivered = sum(r["state"] == "delivered" for r in ssh_lab.rows(config, "pi").values())
    assert verified.returncode == 0, verified.stdout
    assert verified.stdout.splitlines() == [
        f"pi: {delivered} of {delivered} delivered paths are there; 0 gone: queued again; "
        "0 gone here too: failed",
        f"pi: {n} verified, 0 not",
    ]


def test_two_builders_flush_overlapping_closures_to_one_cache_at_once(
    ssh_lab: lab.SshLab,
) -> None:
    """Two builders, each its own nix-daemon running the hook into its own spool
    (one machine: they share /nix/store), one signing with the daemon's key and one
    with nixspool's; the cache trusts both. B's new paths depend on A's, and B
    recorded A's too: both flushes copy the same paths to the cache at once."""
    hook = lab.installed_program("nixspool-hook")
    builders = {}
    for name, signing in (("a", ""), ("b", f'sign_key_file = "{ssh_lab.nixspool_key}"\n')):
        body = f'[remotes.cache]\nurl = "ssh-ng://{ssh_lab.hosts[0].alias}"\n{signing}'
        config = ssh_lab.config(ssh_lab.root / f"builder-{name}", body, batch_size=2)
        conf = f"secret-key-files = {ssh_lab.secret_key}\n" if name == "a" else ""
        daemon = lab.NixDaemon(
            ssh_lab.root / f"builder-{name}" / "nix",
            hook,
            env={"NIXSPOOL_CONFIG": str(config)},
            extra_conf=conf,
        )
        builders[name] = (config, daemon)
    try:
        nonce = lab.nonce()
        args = {"nonce": nonce, "count": "8", "bytes": str(256 * 1024)}
        builders["a"][1].build(ssh_lab.expr, args)
        a_outputs = lab.expected_outputs(builders["a"][1], ssh_lab.expr, args)
        builders["b"][1].build(ssh_lab.expr, {**args, "count": "10"})
        all_outputs = lab.expected_outputs(builders["b"][1], ssh_lab.expr, {**args, "count": "10"})
        ssh_lab.spool_in(builders["b"][0], a_outputs)  # B built those too, say
        flushes = [
            subprocess.Popen(
                [lab.installed_program("nixspool"), "--config", str(config), "flush", "--json"],
                env={k: v for k, v in nix_env(ssh_lab).items() if k != "NIX_REMOTE"},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for config, _ in builders.values()
        ]
        results = [(f.communicate(timeout=300), f.returncode) for f in flushes]
        for (out, err), code in results:
            assert code == 0, err
            report = json.loads(out)["remotes"]["cache"]
            assert (report["failed"], report["queued"], report["unverified"]) == (0, 0, 0), err
        for (config, _), outputs in zip(builders.values(), (a_outputs, all_outputs), strict=True):
            checked = ssh_lab.nixspool(config, "status", "--check")
            assert checked.returncode == 0, checked.stdout
            # Each hook recorded its builds (Nix 2.8: the .drv, resolved by the flush).
            rows = ssh_lab.rows(config, "cache")
            assert {r["state"] for r in rows.values()} == {"delivered"}
            assert set(rows) == outputs
        assert ssh_lab.hosts[0].remote_valid(all_outputs) == all_outputs
    finally:
        for _, daemon in builders.values():
            daemon.stop()
