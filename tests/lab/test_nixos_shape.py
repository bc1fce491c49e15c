"""nixspool as a NixOS machine runs it: installed by nixpkgs' own wrapper, started
with the flush unit's own environment as the module renders it, in a namespace
whose /usr/bin holds only env and sh (tests/lab/nixos_shape.py). Before, there,
the cache writer could not import nixspool and nothing found ssh.

Every remote kind delivers from that shape, and is read back: the LAN hosts'
stores hold the paths, a fresh store substitutes from the caches. Built where
the root's Nix evaluates nixpkgs (>= 2.18); `tests/run` deselects these
elsewhere and says so.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import lab
import s3lab
from nixos_shape import NixosShape
from test_sftp_cache import assert_whole, substitute
from test_triggers_installed import expected_exposure, exposure, standin_nmcli

pytestmark = [pytest.mark.integration, pytest.mark.nixos_shape]


@pytest.fixture(scope="module")
def shape() -> NixosShape:
    found = NixosShape.from_environment()
    if found is None:
        pytest.fail(
            "NIXSPOOL_NIXOS_SHAPE is not set: `bash tests/run --nix 2.26` builds the shape",
            pytrace=False,
        )
    return found


@pytest.fixture(scope="module")
def s3(ssh_lab: lab.SshLab) -> Iterator[s3lab.S3Server]:
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"  # boto3's chain ends at EC2's address
    with s3lab.serving(ssh_lab.hosts[0], ssh_lab.root / "s3-nixos", ssh_lab.alice.home) as server:
        yield server


def lab_env(ssh_lab: lab.SshLab) -> dict[str, str]:
    """What differs from a NixOS machine only in where: the lab daemon's nix.conf
    and socket (on NixOS, /etc/nix and /nix/var/nix/daemon-socket)."""
    return {**ssh_lab.daemon.env, "AWS_EC2_METADATA_DISABLED": "true"}


def test_the_imitation_has_what_nixos_has_and_nothing_more(shape: NixosShape) -> None:
    """The test below can fail: ssh, nix and Python are only where the unit's PATH
    says, /usr/bin has env and sh alone, and the interpreter imports nothing."""
    env = shape.unit_environment()
    store = Path(shape.built["store"][next(iter(shape.built["store"]))]).parent
    assert all(d.startswith(f"{store}/") for d in env["PATH"].split(":")), env["PATH"]
    seen = shape.run(
        ["/bin/sh", "-c", "ls -A /usr/bin /usr/sbin; command -v ssh; command -v nix; /usr/bin/ssh"],
        env,
    )
    assert seen.stdout.splitlines() == [
        "/usr/bin:",
        "env",
        "sh",
        "",
        "/usr/sbin:",
        str(shape.directory("openssh") / "bin" / "ssh"),
        str(shape.directory("nix-2") / "bin" / "nix"),
    ]
    assert "/usr/bin/ssh: not found" in seen.stderr
    bare = shape.run([shape.built["python"], "-c", "import nixspool"], env)
    assert "No module named 'nixspool'" in bare.stderr


def test_the_unit_the_module_renders_is_as_hardened_as_the_shipped_one(
    shape: NixosShape, ssh_lab: lab.SshLab
) -> None:
    unit = ssh_lab.root / f"nixos-unit-{lab.nonce()}" / "nixspool-flush.service"
    unit.parent.mkdir()
    unit.write_text(shape.built["service"])
    assert exposure(unit) <= expected_exposure()


def test_the_hook_nix_conf_names_records_builds(shape: NixosShape, ssh_lab: lab.SshLab) -> None:
    """`nix.settings.post-build-hook`, as the module sets it, run by a nix-daemon:
    its builds are queued, and the flush unit delivers them to ssh-ng://."""
    work = ssh_lab.root / f"nixos-hook-{lab.nonce()}"
    config = ssh_lab.config(work, f'[remotes.pi]\nurl = "ssh-ng://{ssh_lab.hosts[0].alias}"\n')
    daemon = lab.NixDaemon(
        work / "nix",
        shape.hook,
        env={"NIXSPOOL_CONFIG": str(config)},
        extra_conf=f"secret-key-files = {ssh_lab.secret_key}\n",
    )
    try:
        outputs = ssh_lab.build(3, daemon=daemon)
    finally:
        daemon.stop()
    listed = shape.flush_unit(config, "list", "--json", env=lab_env(ssh_lab))
    assert listed.returncode == 0, listed.stderr
    assert {r["path"] for r in json.loads(listed.stdout)} == outputs
    flushed = shape.flush_unit(config, env=lab_env(ssh_lab))
    assert flushed.returncode == 0, flushed.stderr
    assert ssh_lab.hosts[0].remote_valid(outputs) == outputs


def remote_of(kind: str, ssh_lab: lab.SshLab, s3: s3lab.S3Server, where: Path) -> tuple[str, str]:
    """(the remote's config body, what a fresh store substitutes from: "" for a
    Nix store, whose own database is checked instead)."""
    key = f'sign_key_file = "{ssh_lab.nixspool_key}"\n'
    if kind in ("ssh-ng", "ssh"):
        host = ssh_lab.hosts[0 if kind == "ssh-ng" else 1]
        return f'[remotes.it]\nurl = "{kind}://{host.alias}"\n', ""
    if kind == "sftp":
        cache = ssh_lab.hosts[0].serve_sftp(ssh_lab.alice.public_key, name=f"nixos-{lab.nonce()}")
        return f'[remotes.it]\nurl = "{ssh_lab.hosts[0].sftp_url(cache)}"\n{key}', f"file://{cache}"
    if kind == "file":  # nixspool writes it (skip_signed_by), in alice's directory
        cache = where / "cache"
        cache.mkdir(parents=True)
        lab.sh("chown", lab.ALICE, str(cache))
        body = f'[remotes.it]\nurl = "file://{cache}"\n{key}skip_signed_by = ["upstream-lab"]\n'
        return body, f"file://{cache}"
    bucket = s3.bucket(f"nixos-{lab.nonce()}")
    return f'[remotes.it]\nurl = "{s3.url(bucket)}"\n{key}', s3.http(bucket)


@pytest.mark.parametrize("kind", ["ssh-ng", "ssh", "sftp", "file", "s3"])
def test_every_remote_kind_delivers_from_the_flush_unit(
    shape: NixosShape, ssh_lab: lab.SshLab, s3: s3lab.S3Server, kind: str
) -> None:
    work = ssh_lab.root / f"nixos-{kind}-{lab.nonce()}"
    body, substituter = remote_of(kind, ssh_lab, s3, work)
    config = ssh_lab.config(work, body)
    outputs = ssh_lab.build(4, bytes_each=20_000)
    ssh_lab.spool_in(config, outputs)

    flushed = shape.flush_unit(config, "flush", "--json", env=lab_env(ssh_lab))
    assert flushed.returncode == 0, flushed.stderr
    report = json.loads(flushed.stdout)["remotes"]["it"]
    assert (report["delivered"], report["failed"], report["error"]) == (len(outputs), 0, None)
    if substituter:
        fresh = substitute(ssh_lab, outputs, [substituter], [ssh_lab.nixspool_public_key])
        assert fresh.returncode == 0, fresh.stderr
        if substituter.startswith("file://"):
            assert_whole(Path(substituter.removeprefix("file://")))
    else:
        host = ssh_lab.hosts[0 if kind == "ssh-ng" else 1]
        assert host.remote_valid(outputs) == outputs

    # doctor reaches it the same way, and says so; verify asks it what it holds.
    doctor = shape.flush_unit(config, "doctor", "--json", env=lab_env(ssh_lab))
    checks = [c for c in json.loads(doctor.stdout) if c["name"] == "remote it"]
    assert checks and all(c["ok"] for c in checks), checks
    verified = shape.flush_unit(config, "verify", env=lab_env(ssh_lab))
    assert verified.returncode == 0, verified.stdout + verified.stderr


def dispatch(shape: NixosShape, work: Path, nmcli_says: str) -> list[str]:
    """The dispatcher script as the module renders it, run as NetworkManager runs it
    (`90-nixspool eth0 up`) in the environment NixOS's NetworkManager-dispatcher
    unit gives it; nmcli, which the module names, answering METERED `nmcli_says`.
    What it asked systemctl (systemd's place on that PATH taken by a stand-in that
    records, as no systemd runs here)."""
    env = dict(shape.built["dispatcher"]["environment"])
    recorder = work / "systemd" / "bin"
    recorder.mkdir(parents=True, exist_ok=True)
    asked = work / "systemctl-asked"
    (recorder / "systemctl").write_text(f'#!/bin/sh\necho "$*" >> {asked}\n')
    (recorder / "systemctl").chmod(0o755)
    systemd = str(shape.directory("systemd") / "bin")
    assert systemd in env["PATH"].split(":")
    env["PATH"] = env["PATH"].replace(systemd, str(recorder))
    script = Path(shape.built["dispatcher"]["script"]).read_text()
    nmcli = Path(re.search(r"^NIXSPOOL_NMCLI='(.*)'$", script, re.M)[1])  # type: ignore[index]
    assert not nmcli.exists()  # NetworkManager is not installed here: a stand-in
    standin_nmcli(nmcli.parent, {"eth0": nmcli_says})
    try:
        started = shape.run(
            [shape.built["dispatcher"]["script"], "eth0", "up"],
            {**env, "CONNECTION_ID": "Home", "DEVICE_IFACE": "eth0"},
            timeout=30,
        )
    finally:
        for standin in ("nmcli", "logger"):
            (nmcli.parent / standin).unlink()
    assert (started.returncode, started.stdout, started.stderr) == (0, "", "")
    return asked.read_text().splitlines() if asked.exists() else []


def test_networkmanagers_dispatcher_starts_the_unit_unless_metered(
    shape: NixosShape, ssh_lab: lab.SshLab
) -> None:
    work = ssh_lab.root / f"nixos-dispatcher-{lab.nonce()}"
    assert dispatch(shape, work, "no") == ["start --no-block nixspool-flush.service"]
    assert dispatch(shape, work / "metered", "yes (guessed)") == []


def test_setup_on_nixos_points_to_the_module_and_changes_nothing(
    shape: NixosShape, tmp_path: Path
) -> None:
    root = tmp_path / "machine"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "NIXOS").write_text("")
    config = tmp_path / "config.toml"
    said = shape.run(
        [shape.exec_start()[0], "setup", "--user", lab.ALICE, "--remote", "pi=ssh-ng://pi",
         "--root", str(root), "--config-file", str(config)],
        shape.unit_environment(),
    )  # fmt: skip
    assert said.returncode == 2  # a usage error: the command is not for this machine
    assert "this is NixOS" in said.stderr and "services.nixspool" in said.stderr
    assert not config.exists() and sorted(p.name for p in root.rglob("*")) == ["NIXOS", "etc"]
