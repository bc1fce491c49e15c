"""sftp:// remotes: a static binary cache on a host with sshd and no Nix, written by
nixspool over SFTP, and read by another Nix that substitutes from it, signatures
required. Also skip_signed_by, for sftp:// and file:// caches."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

import lab

pytestmark = pytest.mark.integration


def nix_env(ssh_lab: lab.SshLab) -> dict[str, str]:
    env = {**os.environ, **ssh_lab.daemon.client_env()}
    env.pop("NIX_REMOTE")  # root opens the store itself
    return env


def narinfos(cache: Path) -> dict[str, dict[str, str]]:
    """{store path: its narinfo's fields} of a binary cache directory."""
    found = {}
    for file in cache.glob("*.narinfo"):
        fields = dict(line.split(": ", 1) for line in file.read_text().splitlines())
        found[fields["StorePath"]] = fields
    return found


def assert_whole(cache: Path) -> None:
    """Every narinfo's NAR is there, whole: what a reader must always find."""
    for path, fields in narinfos(cache).items():
        nar = cache / fields["URL"]
        assert nar.is_file(), f"{path}: narinfo without its NAR {fields['URL']}"
        assert nar.stat().st_size == int(fields["FileSize"]), f"{path}: a partial NAR"


def substitute(
    ssh_lab: lab.SshLab, paths: set[str], substituters: list[str], trusted: list[str]
) -> subprocess.CompletedProcess[str]:
    """Realise `paths` in a new, empty store, from `substituters` only, requiring
    signatures by `trusted`: a fresh machine that reads the cache."""
    store = ssh_lab.root / f"fresh-{lab.nonce()}"
    options = [
        *["--option", "substituters", " ".join(substituters)],
        *["--option", "trusted-public-keys", " ".join(trusted)],
        *["--option", "require-sigs", "true"],
    ]
    env = nix_env(ssh_lab)
    realised = subprocess.run(
        ["nix-store", "--store", f"local?root={store}", *options, "--realise", *sorted(paths)],
        env=env,
        text=True,
        capture_output=True,
        check=False,
    )
    if realised.returncode != 0:
        return realised
    # And Nix itself checks what it got: contents and a trusted signature each.
    verify = [
        *["nix", "--extra-experimental-features", "nix-command", "store", "verify"],
        *["--store", f"local?root={store}", *options, "--sigs-needed", "1", *sorted(paths)],
    ]
    return subprocess.run(verify, env=env, text=True, capture_output=True, check=False)


def test_a_build_reaches_a_fresh_store_through_a_static_cache_over_sftp(
    ssh_lab: lab.SshLab,
) -> None:
    host = ssh_lab.hosts[0]
    cache = host.serve_sftp(ssh_lab.alice.public_key)
    outputs = ssh_lab.build(8, bytes_each=100_000)
    body = (
        f'[remotes.pi]\nurl = "{host.sftp_url(cache)}"\nsign_key_file = "{ssh_lab.nixspool_key}"\n'
    )
    config = ssh_lab.config(ssh_lab.root / "sftp", body)
    ssh_lab.spool_in(config, outputs)
    result = ssh_lab.nixspool(config, "flush", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)["remotes"]["pi"]
    assert (report["delivered"], report["uploaded"], report["failed"]) == (
        len(outputs),
        len(outputs),
        0,
    )

    # A binary cache Nix can read, written whole, as alice's SFTP login.
    written = narinfos(cache)
    assert set(written) == outputs
    assert (cache / "nix-cache-info").read_text().startswith("StoreDir: /nix/store\n")
    assert_whole(cache)
    assert not list((cache / ".nixspool-partial").iterdir())
    assert {f["Compression"] for f in written.values()} == {"zstd"}  # the default
    assert all(f["URL"].endswith(".nar.zst") for f in written.values())
    owners = {p.stat().st_uid for p in [*cache.iterdir(), *(cache / "nar").iterdir()]}
    assert owners == {int(lab.sh("id", "-u", host.sftp_user).stdout)}
    assert host.logins() and all(host.sftp_user in line for line in host.logins()[-2:])

    # A fresh store takes every path from it, trusting nixspool's key alone.
    fresh = substitute(ssh_lab, outputs, [f"file://{cache}"], [ssh_lab.nixspool_public_key])
    assert fresh.returncode == 0, fresh.stderr

    # doctor reads the directory (and writes nothing); a missing one is named.
    checks = json.loads(ssh_lab.nixspool(config, "doctor", "--json").stdout)
    pi = [c for c in checks if c["name"] == "remote pi"]
    assert [c["ok"] for c in pi] == [True] * len(pi), pi
    assert f"cache directory {cache} is there ({len(outputs)} paths in it)" in [
        c["detail"] for c in pi
    ]
    missing = ssh_lab.config(
        ssh_lab.root / "sftp-missing",
        f'[remotes.pi]\nurl = "{host.sftp_url(cache / "nope")}"\n',
    )
    checks = json.loads(ssh_lab.nixspool(missing, "doctor", "--json").stdout)
    (bad,) = [c for c in checks if c["name"] == "remote pi" and not c["ok"]]
    assert bad["detail"].startswith(f"cache directory {cache / 'nope'}: listing")

    # Another spool with the same paths: the one listing finds them, nothing is written.
    again = ssh_lab.config(ssh_lab.root / "sftp-again", body)
    ssh_lab.spool_in(again, outputs)
    mtimes = {p: p.stat().st_mtime_ns for p in cache.glob("*.narinfo")}
    second = ssh_lab.nixspool(again, "flush", "--json")
    assert second.returncode == 0, second.stderr
    report = json.loads(second.stdout)["remotes"]["pi"]
    assert (report["delivered"], report["uploaded"]) == (len(outputs), 0)
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*.narinfo")} == mtimes


def test_paths_an_upstream_cache_signed_are_left_to_it(ssh_lab: lab.SshLab) -> None:
    """test-3 comes from "upstream" (signed by its key, in its cache); test-4, which
    depends on it, is ours. The caches get test-4 only, and a fresh store that
    substitutes from both gets everything."""
    env = nix_env(ssh_lab)
    upstream_secret, upstream_public = lab.signing_key(ssh_lab.root, "upstream-lab")
    upstream = ssh_lab.root / f"upstream-{lab.nonce()}"
    outputs = ssh_lab.build(5)
    by_name = {p.split("-", 1)[1]: p for p in outputs}
    theirs, ours = by_name["nixspool-test-3"], by_name["nixspool-test-4"]
    nix = ["nix", "--extra-experimental-features", "nix-command"]
    lab.sh(*nix, "store", "sign", "--key-file", str(upstream_secret), theirs, env=env)
    lab.sh(*nix, "copy", "--to", f"file://{upstream}", theirs, env=env)

    host = ssh_lab.hosts[0]
    cache = host.serve_sftp(ssh_lab.alice.public_key)
    local = ssh_lab.root / f"local-cache-{lab.nonce()}"
    local.mkdir()
    lab.sh("chown", lab.ALICE, str(local))  # nix copy writes it as alice
    body = (
        f'[remotes.pi]\nurl = "{host.sftp_url(cache)}"\n'
        f'sign_key_file = "{ssh_lab.nixspool_key}"\nskip_signed_by = ["upstream-lab"]\n'
        f'[remotes.dir]\nurl = "file://{local}"\n'
        f'sign_key_file = "{ssh_lab.nixspool_key}"\nskip_signed_by = ["upstream-lab"]\n'
    )
    config = ssh_lab.config(ssh_lab.root / "upstream", body)
    ssh_lab.spool_in(config, {theirs, ours})
    result = ssh_lab.nixspool(config, "flush", "--json")
    assert result.returncode == 0, result.stderr
    reports = json.loads(result.stdout)["remotes"]
    for name, directory in (("pi", cache), ("dir", local)):
        report = reports[name]
        assert (report["delivered"], report["skipped"], report["left_to_upstream"]) == (1, 1, 1)
        assert set(narinfos(directory)) == {ours}, name
        rows = ssh_lab.rows(config, name)
        assert rows[theirs]["state"] == "skipped"
        assert rows[theirs]["last_error"].startswith("left to upstream: signed by upstream-lab")
    status = json.loads(ssh_lab.nixspool(config, "status", "--json").stdout)["remotes"]
    assert status["pi"]["left_to_upstream"] == status["dir"]["left_to_upstream"] == 1
    text = ssh_lab.nixspool(config, "status").stdout
    assert "pi: its last flush left 1 dependencies to the upstream caches" in text

    trusted = [ssh_lab.nixspool_public_key, upstream_public]
    for directory in (cache, local):
        both = substitute(ssh_lab, {ours}, [f"file://{directory}", f"file://{upstream}"], trusted)
        assert both.returncode == 0, both.stderr
    alone = substitute(ssh_lab, {ours}, [f"file://{cache}"], trusted)
    assert alone.returncode != 0  # without upstream, test-3 is nowhere: truly left out


def test_a_link_that_goes_down_mid_upload_leaves_no_narinfo_without_its_nar(
    ssh_lab: lab.SshLab,
) -> None:
    host = ssh_lab.hosts[0]
    cache = host.serve_sftp(ssh_lab.alice.public_key)
    outputs = ssh_lab.build(3, bytes_each=12 << 20)  # 3 paths of 12 MiB, one with a dev output
    body = f'[remotes.pi]\nurl = "{host.sftp_url(cache)}"\ncompression = "none"\n'
    config = ssh_lab.config(ssh_lab.root / "sftp-cut", body)
    ssh_lab.spool_in(config, outputs)
    host.shape("40mbit")  # about 5 MB/s: the upload takes seconds
    try:
        flush = subprocess.Popen(
            [lab.installed_program("nixspool"), "--config", str(config), "flush", "--json"],
            env={"PATH": os.environ["PATH"]},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        partial = cache / ".nixspool-partial"
        deadline = time.monotonic() + 60
        while not any(f.stat().st_size > 4 << 20 for f in partial.glob("*") if f.is_file()):
            assert flush.poll() is None, flush.communicate()
            assert time.monotonic() < deadline, "the upload never got going"
            time.sleep(0.05)
        host.link_down()
        cut = time.monotonic()
        stdout, stderr = flush.communicate(timeout=120)
        took = time.monotonic() - cut
    finally:
        host.link_up()
        host.shape(None)
    assert flush.returncode == 75, stderr
    # The stall bound (5 s), then a probe that finds the host gone (3 s): not minutes.
    assert took < 30, f"the flush took {took:.0f} s to notice the link was gone"
    report = json.loads(stdout)["remotes"]["pi"]
    assert report["unreachable"] and report["queued"] == len(outputs) - report["delivered"]
    assert_whole(cache)
    rows = ssh_lab.rows(config, "pi")
    assert all(r["state"] == "queued" and r["attempts"] == 0 for r in rows.values())
    before = set(narinfos(cache))
    assert len(before) < len(outputs)

    result = ssh_lab.nixspool(config, "flush", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)["remotes"]["pi"]
    assert (report["delivered"], report["uploaded"]) == (len(outputs), len(outputs - before))
    assert set(narinfos(cache)) == outputs
    assert_whole(cache)


@pytest.mark.parametrize("compression", ["zstd", "xz", "none"])
def test_each_compression_is_read_by_nix(ssh_lab: lab.SshLab, compression: str) -> None:
    """zstd on every Python (the zstandard package), read by every Nix of the matrix,
    12 MB NARs so that zstd's threads cut each into several jobs of one frame; xz as
    Nix writes it; none."""
    host = ssh_lab.hosts[1]
    cache = host.serve_sftp(ssh_lab.alice.public_key, name=f"cache-{compression}")
    outputs = ssh_lab.build(2, bytes_each=12_000_000 if compression == "zstd" else 10_000)
    body = (
        f'[remotes.nas]\nurl = "{host.sftp_url(cache)}"\ncompression = "{compression}"\n'
        f'sign_key_file = "{ssh_lab.nixspool_key}"\n'
    )
    config = ssh_lab.config(ssh_lab.root / f"sftp-{compression}", body)
    ssh_lab.spool_in(config, outputs)
    result = ssh_lab.nixspool(config, "flush")
    assert result.returncode == 0, result.stderr
    written = narinfos(cache)
    assert {f["Compression"] for f in written.values()} == {compression}
    fresh = substitute(ssh_lab, outputs, [f"file://{cache}"], [ssh_lab.nixspool_public_key])
    assert fresh.returncode == 0, fresh.stderr


def test_a_cache_directory_that_is_not_there_needs_a_person(ssh_lab: lab.SshLab) -> None:
    host = ssh_lab.hosts[0]
    cache = host.serve_sftp(ssh_lab.alice.public_key, name="cache-gone")
    outputs = ssh_lab.build(2)
    body = f'[remotes.pi]\nurl = "{host.sftp_url(cache / "missing")}"\n'
    config = ssh_lab.config(ssh_lab.root / "sftp-gone", body)
    ssh_lab.spool_in(config, outputs)
    result = ssh_lab.nixspool(config, "flush", "--json")
    # The host answers: not "away" (75) but a person's job (1), the rows kept.
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)["remotes"]["pi"]
    assert not report["unreachable"]
    assert f"listing {cache / 'missing'}: No such file" in report["error"], report["error"]
    rows = ssh_lab.rows(config, "pi")
    assert {r["state"] for r in rows.values()} == {"queued"}
    assert all("does " in (r["last_error"] or "") for r in rows.values())


def test_the_writers_sessions_share_one_login_unless_the_host_allows_one_session(
    ssh_lab: lab.SshLab,
) -> None:
    host = ssh_lab.hosts[1]
    outputs = ssh_lab.build(12)  # 16 paths: every writer thread opens a session

    def flush(name: str) -> tuple[Path, int]:
        """A flush into a new cache: the cache, and how many logins sshd accepted."""
        cache = host.serve_sftp(ssh_lab.alice.public_key, name=name)
        config = ssh_lab.config(
            ssh_lab.root / name, f'[remotes.pi]\nurl = "{host.sftp_url(cache)}"\n'
        )
        ssh_lab.spool_in(config, outputs)
        before = len(host.logins())
        result = ssh_lab.nixspool(config, "flush", "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["remotes"]["pi"]["uploaded"] == len(outputs)
        assert set(narinfos(cache)) == outputs
        assert_whole(cache)
        return cache, len(host.logins()) - before

    # The probe's login and the writer's: its other sessions are channels of it.
    _, logins = flush("cache-one-login")
    assert logins == 2

    # sshd allowing one session per connection: each session logs in on its own.
    sshd_config = host.root / "sshd_config"
    saved = sshd_config.read_text()
    host.configure_sshd("MaxSessions 1")
    try:
        _, logins = flush("cache-max-sessions")
        assert logins > 2
    finally:
        sshd_config.write_text(saved)
        host.stop_sshd()
        host.start_sshd()
