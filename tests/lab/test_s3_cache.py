"""s3:// remotes: a binary cache in a bucket of a real S3 server (SeaweedFS, in a
LAN host's namespace), written by nixspool as alice with her own credentials, and
read by a fresh Nix store over plain HTTP, signatures required. Several builders
at once, and each fault told apart: away, wrong secret, no bucket, throttled, the
server killed mid-upload."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import lab
import s3lab
from test_sftp_cache import substitute

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3(ssh_lab: lab.SshLab) -> Iterator[s3lab.S3Server]:
    lab.require_lab("ip")
    # boto3's chain ends at the EC2 instance metadata address; no test may reach it.
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    with s3lab.serving(ssh_lab.hosts[0], ssh_lab.root / "s3", ssh_lab.alice.home) as server:
        yield server


def remote(url: str, key: Path | None = None, extra: str = "") -> str:
    body = f'[remotes.team]\nurl = "{url}"\n{extra}'
    return body + (f'sign_key_file = "{key}"\n' if key else "")


def flush(ssh_lab: lab.SshLab, config: Path, *args: str) -> tuple[int, dict[str, object]]:
    result = ssh_lab.nixspool(config, "flush", "--json", *args)
    assert result.stdout, result.stderr
    report = json.loads(result.stdout)["remotes"]["team"]
    return result.returncode, report | {"stderr": result.stderr}


def test_a_build_reaches_a_fresh_store_through_a_bucket(
    ssh_lab: lab.SshLab, s3: s3lab.S3Server
) -> None:
    bucket = s3.bucket(f"cache-{lab.nonce()}")
    outputs = ssh_lab.build(8, bytes_each=100_000)
    body = remote(s3.url(bucket), ssh_lab.nixspool_key)
    config = ssh_lab.config(ssh_lab.root / f"s3-{bucket}", body)
    ssh_lab.spool_in(config, outputs)
    code, report = flush(ssh_lab, config)
    assert code == 0, report["stderr"]
    assert (report["delivered"], report["uploaded"], report["failed"]) == (
        len(outputs),
        len(outputs),
        0,
    )

    # A binary cache Nix can read, whole, nothing of nixspool's own left in it.
    written = s3.narinfos(bucket)
    assert set(written) == outputs
    objects = s3.objects(bucket)
    assert objects["nix-cache-info"].startswith(b"StoreDir: /nix/store\n")
    assert not [k for k in objects if ".nixspool" in k]
    s3.assert_whole(bucket)
    assert {f["Compression"] for f in written.values()} == {"zstd"}
    assert all(ssh_lab.nixspool_public_key.split(":")[0] in str(f["Sig"]) for f in written.values())

    # A fresh store takes every path from it over plain HTTP, trusting nixspool's key.
    fresh = substitute(ssh_lab, outputs, [s3.http(bucket)], [ssh_lab.nixspool_public_key])
    assert fresh.returncode == 0, fresh.stderr

    # doctor: alice's credentials, the bucket writable (a probe object, gone again).
    checks = json.loads(ssh_lab.nixspool(config, "doctor", "--json").stdout)
    team = [c for c in checks if c["name"] == "remote team"]
    assert all(c["ok"] for c in team), team
    assert team[0]["detail"].startswith(
        f"bucket writable as {lab.ALICE} (credentials from shared-credentials-file; "
        f"{len(outputs)} paths in it)"
    ), team
    assert set(s3.objects(bucket)) == set(objects)

    # Another spool with the same paths: found there, nothing written again.
    again = ssh_lab.config(ssh_lab.root / f"s3-{bucket}-again", body)
    ssh_lab.spool_in(again, outputs)
    code, report = flush(ssh_lab, again)
    assert code == 0, report["stderr"]
    assert (report["delivered"], report["uploaded"]) == (len(outputs), 0)


def test_two_builders_flushing_one_bucket_at_once_keep_both_signatures(
    ssh_lab: lab.SshLab, s3: s3lab.S3Server
) -> None:
    from nixspool import sign

    bucket = s3.bucket(f"team-{lab.nonce()}")
    outputs = ssh_lab.build(12, bytes_each=20_000)
    secret, public = sign.generate("second-builder-1")
    second_key = ssh_lab.root / f"second-{bucket}.sec"
    second_key.write_text(secret + "\n")
    second_key.chmod(0o600)
    configs = []
    for name, key in (("one", ssh_lab.nixspool_key), ("two", second_key)):
        config = ssh_lab.config(ssh_lab.root / f"s3-{bucket}-{name}", remote(s3.url(bucket), key))
        ssh_lab.spool_in(config, outputs)
        configs.append(config)
    both = [
        subprocess.Popen(
            [lab.installed_program("nixspool"), "--config", str(c), "flush"],
            env=ssh_lab.daemon.root_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for c in configs
    ]
    for builder in both:
        _, stderr = builder.communicate(timeout=300)
        assert builder.returncode == 0, stderr

    names = {ssh_lab.nixspool_public_key.split(":")[0], "second-builder-1"}
    written = s3.narinfos(bucket)
    assert set(written) == outputs
    for path, fields in written.items():
        signers = {sig.split(":")[0] for sig in fields["Sig"]}
        assert names <= signers, (path, fields["Sig"])
    s3.assert_whole(bucket)
    # Either key alone is enough for a client that trusts only it.
    for trusted in (ssh_lab.nixspool_public_key, public):
        fresh = substitute(ssh_lab, outputs, [s3.http(bucket)], [trusted])
        assert fresh.returncode == 0, fresh.stderr


def test_a_bucket_that_is_not_there_and_a_wrong_secret_need_a_person(
    ssh_lab: lab.SshLab, s3: s3lab.S3Server
) -> None:
    outputs = ssh_lab.build(2)
    cases = {
        "no bucket": (s3.url(f"missing-{lab.nonce()}"), "the bucket does not exist"),
        "wrong secret": (
            s3.url(s3.bucket(f"wrong-{lab.nonce()}"), profile="wrong"),
            "the secret key is wrong for this access key",
        ),
        "no profile": (
            s3.url(s3.bucket(f"noprof-{lab.nonce()}"), profile="nobody"),
            "The config profile (nobody) could not be found",
        ),
    }
    for case, (url, said) in cases.items():
        config = ssh_lab.config(ssh_lab.root / f"s3-{lab.nonce()}", remote(url))
        ssh_lab.spool_in(config, outputs)
        code, report = flush(ssh_lab, config)
        assert code == 1, (case, report)
        assert said in str(report["error"]), (case, report)
        assert report["queued"] == len(outputs), (case, report)
        assert s3lab.SECRET_KEY not in str(report), case
        checks = json.loads(ssh_lab.nixspool(config, "doctor", "--json").stdout)
        (team,) = [c for c in checks if c["name"] == "remote team" and not c["ok"]]
        assert said in team["detail"], (case, team)


def test_a_store_whose_link_is_down_is_away_and_its_rows_wait(
    ssh_lab: lab.SshLab, s3: s3lab.S3Server
) -> None:
    bucket = s3.bucket(f"away-{lab.nonce()}")
    outputs = ssh_lab.build(3)
    config = ssh_lab.config(ssh_lab.root / f"s3-{bucket}", remote(s3.url(bucket)))
    ssh_lab.spool_in(config, outputs)
    s3.unplug()
    try:
        started = time.monotonic()
        code, report = flush(ssh_lab, config)
        took = time.monotonic() - started
    finally:
        s3.plug()
    assert code == 75, report
    assert report["unreachable"] and report["queued"] == len(outputs), report
    assert took < 30, f"an away store held the flush {took:.1f} s"
    lab.shift_clock(config, 60)  # past any backoff
    code, report = flush(ssh_lab, config)
    assert code == 0, report["stderr"]
    assert set(s3.narinfos(bucket)) == outputs


def test_a_store_that_throttles_is_waited_for(ssh_lab: lab.SshLab, s3: s3lab.S3Server) -> None:
    bucket = s3.bucket(f"busy-{lab.nonce()}")
    outputs = ssh_lab.build(6, bytes_each=10_000)
    proxy = s3lab.Throttler(s3.endpoint, every=3)
    try:
        url = s3.url(bucket, endpoint=proxy.endpoint)
        config = ssh_lab.config(ssh_lab.root / f"s3-{bucket}", remote(url, ssh_lab.nixspool_key))
        ssh_lab.spool_in(config, outputs)
        code, report = flush(ssh_lab, config)
    finally:
        proxy.close()
    assert code == 0, report["stderr"]
    assert proxy.throttled >= 3, proxy.throttled
    assert set(s3.narinfos(bucket)) == outputs
    s3.assert_whole(bucket)


def test_a_store_killed_mid_upload_leaves_no_narinfo_without_its_nar(
    ssh_lab: lab.SshLab, s3: s3lab.S3Server
) -> None:
    bucket = s3.bucket(f"crash-{lab.nonce()}")
    # Twice as many paths as the writer sends at once: when the first NARs are in
    # place, the next ones are on their way.
    outputs = ssh_lab.build(8, bytes_each=8_000_000)
    # Parts of 5 MiB from 5 MiB on: every big path goes up as a multipart upload.
    extra = 'compression = "none"\nmultipart_threshold = "5M"\npart_size = "5M"\n'
    config = ssh_lab.config(
        ssh_lab.root / f"s3-{bucket}", remote(s3.url(bucket), ssh_lab.nixspool_key, extra)
    )
    ssh_lab.spool_in(config, outputs)
    s3.host.shape("40mbit")  # slow enough to be cut mid-way
    flushing = subprocess.Popen(
        [lab.installed_program("nixspool"), "--config", str(config), "flush", "--json"],
        env=ssh_lab.daemon.root_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not any(k.startswith("nar/") for k in s3.keys(bucket)):
            assert time.monotonic() < deadline and flushing.poll() is None, flushing.stderr
            time.sleep(0.2)
        s3.stop()
        stdout, stderr = flushing.communicate(timeout=120)
    finally:
        s3.host.shape(None)
        if s3.process is None:
            s3.start()
    report = json.loads(stdout)["remotes"]["team"]
    assert flushing.returncode == 75, (report, stderr)
    assert report["queued"] >= 1 and report["unreachable"], report
    assert len(s3.narinfos(bucket)) < len(outputs)  # cut mid-way, really
    s3.assert_whole(bucket)  # what the cut left: no narinfo promises a missing NAR
    lab.shift_clock(config, 60)  # past any backoff
    code, report = flush(ssh_lab, config)
    assert code == 0, report["stderr"]
    assert set(s3.narinfos(bucket)) == outputs
    s3.assert_whole(bucket)
    fresh = substitute(ssh_lab, outputs, [s3.http(bucket)], [ssh_lab.nixspool_public_key])
    assert fresh.returncode == 0, fresh.stderr


def test_a_store_whose_disk_is_full_is_tried_again_later(
    ssh_lab: lab.SshLab, s3: s3lab.S3Server
) -> None:
    outputs = ssh_lab.build(3, bytes_each=10_000)
    # No room for one more volume: a new bucket (a collection of its own) cannot
    # store a byte, which the store answers as a full disk does: 500 InternalError.
    s3.restart(volumes=s3.volume_count())
    try:
        bucket = s3.bucket(f"full-{lab.nonce()}")
        config = ssh_lab.config(ssh_lab.root / f"s3-{bucket}", remote(s3.url(bucket)))
        ssh_lab.spool_in(config, outputs)
        code, report = flush(ssh_lab, config)
    finally:
        s3.restart(volumes=300)
    assert code == 75, report
    assert report["deferred"] == report["queued"] == len(outputs), report
    assert "the store failed (InternalError" in str(report["stderr"]), report
    assert not s3.narinfos(bucket)
    lab.shift_clock(config, 60)
    code, report = flush(ssh_lab, config)
    assert code == 0, report["stderr"]
    assert set(s3.narinfos(bucket)) == outputs
    s3.assert_whole(bucket)
