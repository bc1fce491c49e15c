"""A builder and its cache on different Nix versions: a Nix 2.8 laptop delivering
to a 2.34 cache, and the reverse.

`bash tests/run --cross` runs this file in one Debian root of the matrix with
another root mounted read-only and named by NIXSPOOL_LAN_NIX_ROOT; the lab's LAN
hosts run that root's Nix (see lab.LanHost). Other runs deselect it
(`-m "not cross"`). What crosses versions is the wire (the serve and daemon
protocols), the remote's words for a refusal, and what `verify` reads back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import lab

pytestmark = [pytest.mark.integration, pytest.mark.cross]


@pytest.fixture(scope="module")
def cross_lab(nix_lab: Path) -> Iterator[lab.SshLab]:
    other = os.environ.get("NIXSPOOL_LAN_NIX_ROOT")
    if not other:
        pytest.fail("NIXSPOOL_LAN_NIX_ROOT is not set: run `bash tests/run --cross`", pytrace=False)
    lab.require_lab("sshd", "ip", "ssh-keygen", "nsenter")
    # Hosts 4 and 5: their own addresses, should the plain lab run in this process too.
    the_lab = lab.SshLab(nix_lab / "cross", lan_nix=Path(other), first_host=4)
    try:
        yield the_lab
    finally:
        the_lab.close()


def test_the_lan_hosts_run_another_nix_than_the_builder(cross_lab: lab.SshLab) -> None:
    """Without this, every other test here could pass on one version."""
    ours = lab.nix_version()
    for host in cross_lab.hosts:
        theirs = host.nix_version()
        assert (theirs.major, theirs.minor) != (ours.major, ours.minor), (theirs, ours)
        # And through SSH, as the flusher reaches it.
        session = lab.run_as(lab.ALICE, ["ssh", host.alias, "nix-store", "--version"], {})
        assert session.returncode == 0, session.stderr
        assert theirs.text in session.stdout


def signed_config(cross_lab: lab.SshLab, name: str) -> Path:
    """Both protocols (pi: ssh-ng, nas: ssh), each signing with nixspool's key."""
    work = cross_lab.root / name
    pi, nas = cross_lab.hosts
    key = cross_lab.nixspool_key
    return cross_lab.config(
        work,
        f'\n[remotes.pi]\nurl = "ssh-ng://{pi.alias}"\nsign_key_file = "{key}"\n'
        f'\n[remotes.nas]\nurl = "ssh://{nas.alias}"\nsign_key_file = "{key}"\n',
    )


def test_signed_closures_delivered_and_verified_over_both_protocols(cross_lab: lab.SshLab) -> None:
    # Built without the daemon's key: only nixspool's signature can make them trusted.
    outputs = cross_lab.build(6, daemon=cross_lab.unsigned)
    config = signed_config(cross_lab, "signed")
    cross_lab.spool_in(config, outputs)
    result = cross_lab.nixspool(config, "flush", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)["remotes"]
    assert report["pi"]["delivered"] == report["nas"]["delivered"] == len(outputs)
    closure = set(lab.sh("nix-store", "--query", "--requisites", *outputs).stdout.split())
    for host in cross_lab.hosts:
        assert host.remote_valid(closure) == closure
    # What verify reads back (path-info from the other Nix) is understood.
    verify = cross_lab.nixspool(config, "verify", "--json")
    assert verify.returncode == 0, verify.stderr
    checked = json.loads(verify.stdout)
    for remote in ("pi", "nas"):
        assert checked[remote]["not_verified"] == []
    rows = json.loads(cross_lab.nixspool(config, "list", "--json").stdout)
    assert {(r["state"], r["verified"]) for r in rows} == {("delivered", True)}


def test_a_refusal_in_the_other_nix_words_fails_only_those_rows(cross_lab: lab.SshLab) -> None:
    """The remote's Nix words the refusal; the builder's nixspool must still read
    it as a refusal of those paths (failed, with the reason), not as the host away."""
    config = cross_lab.config(cross_lab.root / "refused")
    signed = cross_lab.build(3)
    unsigned = cross_lab.build(1, daemon=cross_lab.unsigned)
    cross_lab.spool_in(config, signed | unsigned)
    result = cross_lab.nixspool(config, "flush", "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)["remotes"]
    pi, nas = cross_lab.hosts
    assert (report["pi"]["delivered"], report["pi"]["failed"]) == (len(signed), len(unsigned))
    refusal = lab.unsigned_refusal(pi.nix_version())
    assert all(refusal in f["error"] for f in report["pi"]["failures"]), report["pi"]
    assert pi.remote_valid(signed | unsigned) == signed
    # Over ssh:// no Nix checks signatures: `nix-store --serve --write` imports
    # with NoCheckSigs, on 2.8 and 2.34 alike. README says so; this keeps it true.
    assert (report["nas"]["delivered"], report["nas"]["failed"]) == (len(signed | unsigned), 0)
    assert nas.remote_valid(signed | unsigned) == signed | unsigned
