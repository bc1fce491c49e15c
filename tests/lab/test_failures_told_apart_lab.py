"""A store this Nix cannot open, asked for real: one copy, needs a person at once."""

from __future__ import annotations

import json

import pytest

import lab


@pytest.mark.integration
def test_a_store_this_nix_cannot_open_needs_a_person_at_once(ssh_lab: lab.SshLab) -> None:
    """Found by an adversarial run: Debian's Nix 2.8 and 2.26 have no S3, and
    `s3://...` was retried three times per flush and reported as "try later" (75) for
    ever. A store URL this machine's Nix cannot open is its limit: exit 1 on one copy,
    named so; config and doctor say it before any flush. (s3:// itself nixspool now
    writes on every Nix: below. gs:// no Nix opens.)"""
    url = "gs://nixspool-test"
    config = ssh_lab.config(ssh_lab.root / "gs-here", f'\n[remotes.bucket]\nurl = "{url}"\n')
    outputs = ssh_lab.build(1)
    ssh_lab.spool_in(config, outputs)
    shown = ssh_lab.nixspool(config, "config")
    assert "# note: gs:// is opened by nix copy only where this Nix was built with it" in (
        shown.stdout
    )
    doctor = ssh_lab.nixspool(config, "doctor", "--json")
    checks = json.loads(doctor.stdout)
    (bad,) = [c for c in checks if c["name"] == "remote bucket" and not c["ok"]]
    flushed = ssh_lab.nixspool(config, "flush", "--json")
    report = json.loads(flushed.stdout)["remotes"]["bucket"]
    rows = ssh_lab.rows(config, "bucket")
    assert "this machine's Nix cannot open gs:// stores" in bad["detail"]
    assert flushed.returncode == 1, flushed.stderr
    assert not report["unreachable"]
    assert "this machine's Nix cannot open gs:// stores" in report["error"]
    assert "don't know how to open Nix store" in report["error"]
    # One copy, one attempt: not retried within the flush.
    assert {(r["state"], r["attempts"]) for r in rows.values()} == {("queued", 1)}


def test_an_s3_endpoint_that_refuses_is_away_on_every_nix(ssh_lab: lab.SshLab) -> None:
    """The same s3:// URL on every Nix of the matrix, written by nixspool itself: its
    endpoint, loopback's discard port, is simply not there: away (75), as any host
    that refuses the connection, rows untouched; doctor names the endpoint."""
    url = "s3://nixspool-test?region=eu-west-1&endpoint=127.0.0.1:9&scheme=http&profile=lab"
    config = ssh_lab.config(ssh_lab.root / "s3-refused", f'\n[remotes.bucket]\nurl = "{url}"\n')
    (ssh_lab.alice.home / ".aws").mkdir(exist_ok=True)
    credentials = ssh_lab.alice.home / ".aws" / "credentials"
    if not credentials.exists():  # test_s3_cache's, or these
        credentials.write_text("[lab]\naws_access_key_id = k\naws_secret_access_key = s\n")
        lab.sh("chown", "-R", lab.ALICE, str(credentials.parent))
    outputs = ssh_lab.build(1)
    ssh_lab.spool_in(config, outputs)
    assert "note" not in ssh_lab.nixspool(config, "config").stdout.replace("# credentials", "")
    checks = json.loads(ssh_lab.nixspool(config, "doctor", "--json").stdout)
    (bad,) = [c for c in checks if c["name"] == "remote bucket" and not c["ok"]]
    assert "127.0.0.1:9" in bad["detail"], bad
    flushed = ssh_lab.nixspool(config, "flush", "--json")
    report = json.loads(flushed.stdout)["remotes"]["bucket"]
    assert flushed.returncode == 75, flushed.stderr
    assert report["unreachable"] and "Could not connect" in report["error"], report
    rows = ssh_lab.rows(config, "bucket")
    assert {(r["state"], r["attempts"]) for r in rows.values()} == {("queued", 0)}
