"""Signatures against the real Nix: byte-identical to nix store sign, accepted by a
remote that requires them, and only on what the hook recorded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

import lab
from nixspool import nix, sign
from nixspool.hook.storepath import nix_base32

NIX = ["nix", "--extra-experimental-features", "nix-command"]


def nix_env(ssh_lab: lab.SshLab | None = None) -> dict[str, str]:
    env = {**os.environ}
    if ssh_lab is not None:
        env.update(ssh_lab.daemon.client_env())
        env.pop("NIX_REMOTE")
    return env


@pytest.mark.parametrize("data", [b"", b"nixspool", b"\x00" * 32, bytes(range(32))])
def test_nix_base32_matches_nix(data: bytes) -> None:
    lab.require_lab()
    digest = hashlib.sha256(data).hexdigest()
    theirs = subprocess.run(
        [*NIX, "hash", "to-base32", "--type", "sha256", digest],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert nix_base32(bytes.fromhex(digest)) == theirs
    sri = "sha256-" + base64.b64encode(bytes.fromhex(digest)).decode()
    assert nix.normalize_nar_hash(sri) == f"sha256:{theirs}"
    assert nix.normalize_nar_hash(f"sha256:{digest}") == f"sha256:{theirs}"


# -- against Nix 2.8 -----------------------------------------------------------


@pytest.fixture
def fresh_paths(ssh_lab: lab.SshLab) -> list[str]:
    """Two unsigned paths, one of which refers to the other."""
    outputs = ssh_lab.build(5, daemon=ssh_lab.unsigned)
    paths = sorted(p for p in outputs if p.endswith(("-test-3", "-test-4")))
    assert len(paths) == 2
    return paths


def test_keygen_keys_are_accepted_by_nix(ssh_lab: lab.SshLab, fresh_paths, tmp_path: Path) -> None:
    subprocess.run(
        [lab.installed_program("nixspool"), "keygen", "k2", "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    env = nix_env(ssh_lab)
    subprocess.run(
        [*NIX, "store", "sign", "--key-file", str(tmp_path / "k2.sec"), *fresh_paths],
        env=env,
        check=True,
        capture_output=True,
    )
    verified = subprocess.run(
        [
            *NIX,
            "store",
            "verify",
            "--sigs-needed",
            "1",
            "--trusted-public-keys",
            (tmp_path / "k2.pub").read_text().strip(),
            *fresh_paths,
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert verified.returncode == 0, verified.stderr


def test_signatures_are_byte_identical_to_nix_store_sign(
    ssh_lab, fresh_paths, tmp_path: Path
) -> None:
    secret, _ = sign.generate("k3")
    (tmp_path / "k3.sec").write_text(secret)
    (tmp_path / "k3.sec").chmod(0o600)
    key = sign.load_secret_key(str(tmp_path / "k3.sec"))
    infos = nix.path_infos(fresh_paths, env=nix_env(ssh_lab))
    assert sorted(len(i.references) for i in infos.values()) == [0, 1]  # with and without
    ours = {p: key.sign(infos[p]) for p in fresh_paths}
    subprocess.run(
        [*NIX, "store", "sign", "--key-file", str(tmp_path / "k3.sec"), *fresh_paths],
        env=nix_env(ssh_lab),
        check=True,
        capture_output=True,
    )
    theirs = nix.path_infos(fresh_paths, env=nix_env(ssh_lab))
    for path in fresh_paths:
        assert [s for s in theirs[path].signatures if s.startswith("k3:")] == [ours[path]]


def signing_config(ssh_lab: lab.SshLab, name: str, key: Path) -> Path:
    config = ssh_lab.config(ssh_lab.root / name)
    text = config.read_text().replace(
        'url = "ssh-ng://lanhost0"\n', f'url = "ssh-ng://lanhost0"\nsign_key_file = "{key}"\n'
    )
    config.write_text(text)
    return config


def test_a_flush_signs_so_an_untrusted_user_delivers(ssh_lab: lab.SshLab) -> None:
    outputs = ssh_lab.build(4, daemon=ssh_lab.unsigned)
    config = signing_config(ssh_lab, "signed", ssh_lab.nixspool_key)
    ssh_lab.spool_in(config, outputs)
    result = ssh_lab.nixspool(config, "flush", "--remote", "pi", "--json")
    assert result.returncode == 0, result.stderr
    assert ssh_lab.hosts[0].remote_valid(outputs) == outputs
    rows = json.loads(ssh_lab.nixspool(config, "list", "--json", "--remote", "pi").stdout)
    assert {(r["state"], r["verified"]) for r in rows} == {("delivered", True)}
    # A tampered signature on the remote is caught, and the path signed again: its
    # hash, size and references there are still those our key vouches for.
    db = ssh_lab.hosts[0].store / "nix" / "var" / "nix" / "db" / "db.sqlite"
    victim = sorted(outputs)[0]
    forged = "nixspool-cache-key:" + base64.b64encode(b"\x01" * 64).decode()

    def tamper(sql: str, *args: str) -> None:
        con = sqlite3.connect(db)
        con.execute(sql, args)
        con.commit()
        con.close()

    tamper("UPDATE ValidPaths SET sigs = ? WHERE path = ?", forged, victim)
    verify = ssh_lab.nixspool(config, "verify", "--remote", "pi", "--json")
    assert verify.returncode == 0, verify.stderr
    assert json.loads(verify.stdout)["pi"]["signed_on_remote"] == [victim]
    # With other content there (its NAR hash changed), nixspool's key vouches for
    # nothing: it is not signed, and it is reported.
    tamper(
        "UPDATE ValidPaths SET sigs = ?, hash = ? WHERE path = ?",
        forged,
        "sha256:" + "0" * 64,
        victim,
    )
    verify = ssh_lab.nixspool(config, "verify", "--remote", "pi", "--json")
    assert verify.returncode == 1
    assert json.loads(verify.stdout)["pi"]["not_verified"] == [victim]
    assert json.loads(verify.stdout)["pi"]["signed_on_remote"] == []
    rows = json.loads(ssh_lab.nixspool(config, "list", "--json", "--remote", "pi").stdout)
    assert [r["path"] for r in rows if r["verified"] is False] == [victim]
    status = json.loads(ssh_lab.nixspool(config, "status", "--json").stdout)["remotes"]["pi"]
    assert (status["verified"], status["not_verified"]) == (len(outputs) - 1, 1)
    assert "do NOT (see `nixspool verify`)" in ssh_lab.nixspool(config, "status").stdout


def test_a_key_the_remote_does_not_trust_is_its_refusal_and_fails_no_row(
    ssh_lab: lab.SshLab,
) -> None:
    """Every path signed with a key the remote does not trust is refused alike: that
    is the remote's setting (or ours), not any path's, so no row fails (they used
    to, for any batch not a power of two); exit 1 names it, the rows wait with the
    reason, and `status` shows what needs a person."""
    other = ssh_lab.root / "untrusted.sec"
    other.write_text(sign.generate("not-trusted")[0])
    other.chmod(0o600)
    outputs = ssh_lab.build(2, daemon=ssh_lab.unsigned)
    assert len(outputs) == 3
    config = signing_config(ssh_lab, "untrusted", other)
    ssh_lab.spool_in(config, outputs)
    result = ssh_lab.nixspool(config, "flush", "--remote", "pi", "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)["remotes"]["pi"]
    assert (report["failed"], report["delivered"]) == (0, 0)
    assert "refuses every path alike" in report["error"]
    assert lab.unsigned_refusal() in report["error"]
    rows = ssh_lab.rows(config, "pi").values()
    assert {r["state"] for r in rows} == {"queued"}
    assert all(lab.unsigned_refusal() in r["last_error"] for r in rows)
    status = json.loads(ssh_lab.nixspool(config, "status", "--json").stdout)
    assert lab.unsigned_refusal() in json.dumps(status["remotes"]["pi"])  # shown, not lost


def test_only_paths_the_hook_recorded_are_signed(ssh_lab: lab.SshLab) -> None:
    outputs = ssh_lab.build(5, daemon=ssh_lab.unsigned)
    dependent = next(p for p in outputs if p.endswith("-test-4"))
    dependency = next(p for p in outputs if p.endswith("-test-3"))
    config = signing_config(ssh_lab, "onlyspool", ssh_lab.nixspool_key)
    ssh_lab.spool_in(config, {dependent})  # its dependency never went through the hook
    result = ssh_lab.nixspool(config, "flush", "--remote", "pi", "--json")
    assert result.returncode == 1
    infos = nix.path_infos([dependent, dependency], env=nix_env(ssh_lab))
    assert any(s.startswith("nixspool-cache-key:") for s in infos[dependent].signatures)
    assert not any(s.startswith("nixspool-cache-key:") for s in infos[dependency].signatures)
    assert ssh_lab.hosts[0].remote_valid([dependent, dependency]) == set()


def test_signing_that_cannot_run_is_a_local_error_and_stops_only_its_remote(
    ssh_lab: lab.SshLab,
) -> None:
    """No `nix` on root's PATH: signing for pi cannot start. That is this machine's
    fault: pi's rows stay as they were (not failed, not counted, not bisected as
    the remote's refusal). nas, which does not sign, still delivers: its copy runs
    as the user, whose PATH has Nix. The JSON report is printed all the same."""
    config = signing_config(ssh_lab, "no-local-nix", ssh_lab.nixspool_key)
    outputs = ssh_lab.build(3)
    ssh_lab.spool_in(config, outputs)
    result = ssh_lab.nixspool(config, "flush", "--json", path="/nonexistent")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)["remotes"]
    assert report["pi"]["error"].startswith("signing for pi failed, nothing was copied")
    assert "cannot run nix" in report["pi"]["error"]
    assert (report["pi"]["failed"], report["pi"]["failures"]) == (0, [])
    rows = ssh_lab.rows(config, "pi").values()
    assert {(r["state"], r["attempts"], r["last_error"]) for r in rows} == {("queued", 0, None)}
    assert (report["nas"]["delivered"], report["nas"]["error"]) == (len(outputs), None)


def test_a_path_signed_by_a_replaced_key_of_the_same_name_is_signed_again(
    ssh_lab: lab.SshLab,
) -> None:
    """Found by the security suite: after a key is replaced by a new one of the same
    name, paths the old one signed carried a signature by that name, so nixspool
    signed them no more, and the remote refused them."""
    outputs = ssh_lab.build(1, daemon=ssh_lab.unsigned)
    path = next(iter(outputs))
    old_key = ssh_lab.root / "replaced.sec"
    old_key.write_text(sign.generate("nixspool-cache-key")[0] + "\n")
    old_key.chmod(0o600)
    before = nix.path_infos([path], env=nix_env(ssh_lab))
    assert sign.attach(sign.load_secret_key(str(old_key)), before.values()) == [path]

    config = signing_config(ssh_lab, "replaced-key", ssh_lab.nixspool_key)
    ssh_lab.spool_in(config, {path})
    result = ssh_lab.nixspool(config, "flush", "--remote", "pi", "--json")
    assert result.returncode == 0, result.stderr
    assert ssh_lab.hosts[0].remote_valid([path]) == {path}
