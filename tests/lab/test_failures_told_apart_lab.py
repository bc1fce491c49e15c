"""A store this Nix cannot open, asked for real: one copy, needs a person at once."""

from __future__ import annotations

import json

import pytest

import lab


@pytest.mark.integration
def test_a_store_this_nix_cannot_open_needs_a_person_at_once(ssh_lab: lab.SshLab) -> None:
    """Found by an adversarial run: Debian's Nix 2.8 and 2.26 have no S3, and
    `s3://...` was retried three times per flush and reported as "try later" (75) for
    ever. It is this machine's Nix's limit: exit 1 on one copy, named so; config and
    doctor say it before any flush. Nix 2.33+ opens s3:// (public buckets, over
    HTTP): there the bucket's endpoint, loopback's discard port, is simply not
    there: away (75), as for any host that refuses the connection."""
    url = "s3://nixspool-test?region=eu-west-1&endpoint=127.0.0.1:9&scheme=http"
    config = ssh_lab.config(ssh_lab.root / "s3-here", f'\n[remotes.bucket]\nurl = "{url}"\n')
    outputs = ssh_lab.build(1)
    ssh_lab.spool_in(config, outputs)
    shown = ssh_lab.nixspool(config, "config")
    assert "# note: s3:// is opened by nix copy only where this Nix has it" in shown.stdout
    doctor = ssh_lab.nixspool(config, "doctor", "--json")
    checks = json.loads(doctor.stdout)
    (bad,) = [c for c in checks if c["name"] == "remote bucket" and not c["ok"]]
    flushed = ssh_lab.nixspool(config, "flush", "--json")
    report = json.loads(flushed.stdout)["remotes"]["bucket"]
    rows = ssh_lab.rows(config, "bucket")
    version = lab.nix_version()
    if (version.major, version.minor) >= (2, 33):
        assert "127.0.0.1:9" in bad["detail"]
        assert flushed.returncode == 75, flushed.stderr
        assert report["unreachable"] and "connect to server" in report["error"]
        assert {(r["state"], r["attempts"]) for r in rows.values()} == {("queued", 0)}
        return
    assert "this machine's Nix cannot open s3:// stores" in bad["detail"]
    assert flushed.returncode == 1, flushed.stderr
    assert not report["unreachable"]
    assert "this machine's Nix cannot open s3:// stores" in report["error"]
    assert "don't know how to open Nix store" in report["error"]
    # One copy, one attempt: not retried within the flush.
    assert {(r["state"], r["attempts"]) for r in rows.values()} == {("queued", 1)}
