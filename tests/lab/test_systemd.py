"""The units `nixspool setup` installs, run by a real systemd as PID 1.

These run only where systemd is PID 1: `bash tests/run --systemd` boots a Debian
13 root with systemd-nspawn and runs them there (see tests/platform/systemd); the
other runs deselect them (`-m "not systemd"`). The machine's own nix-daemon
(socket-activated by systemd) runs nixspool-hook; the flush unit, with all its
hardening, delivers to a LAN host of the lab as the configured user, signs, and
records a host key it has never seen.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

import lab

pytestmark = pytest.mark.systemd

CONFIG = Path("/etc/nixspool/config.toml")
NIX_CONF = Path("/etc/nix/nix.conf")


def systemctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return lab.sh("systemctl", *args, check=check)


def unit_property(unit: str, name: str) -> str:
    return systemctl("show", "-p", name, "--value", unit).stdout.strip()


def set_up_this_machine(ssh_lab: lab.SshLab, host: lab.LanHost) -> subprocess.CompletedProcess[str]:
    """nixspool set up on this (the test's own) machine from nothing, as a new user
    does, for one signed remote on `host`; the hook in nix.conf, the daemon and
    systemd told. Setup's own output, for what it said."""
    nixspool = lab.installed_program("nixspool")
    for leftover in (Path("/var/lib/nixspool"), CONFIG.parent):
        shutil.rmtree(leftover, ignore_errors=True)
    setup = lab.sh(
        nixspool, "setup", "--user", lab.ALICE, "--remote", f"pi=ssh-ng://{host.alias}", "--force"
    )
    # The signing key where a unit with PrivateTmp can read it, as a user would keep
    # it (the LAN host requires signatures; the machine's own daemon signs nothing).
    key = Path("/etc/nixspool/cache.sec")
    key.write_text(ssh_lab.nixspool_key.read_text())
    key.chmod(0o600)
    spool = CONFIG.read_text().split("\n\n")[0]  # setup's header, user and spool lines
    CONFIG.write_text(
        f"{spool}\naccept_new_host_keys = true\nconnect_timeout = 5\n\n"
        f'[remotes.pi]\nurl = "ssh-ng://{host.alias}"\nsign_key_file = "{key}"\n'
    )
    # The line from the program's path, not from setup's prose: on a machine that has
    # it already, setup says so in a sentence (and a second run of this test is one).
    hook = lab.installed_program("nixspool-hook")
    NIX_CONF.write_text(
        f"post-build-hook = {hook}\nsubstituters =\nsandbox = false\nbuild-users-group = nixbld\n"
    )
    systemctl("restart", "nix-daemon.socket", "nix-daemon.service", check=False)
    systemctl("daemon-reload")
    return setup


def build_with_this_machines_daemon(nix_lab: Path, count: int) -> set[str]:
    """`count` fresh derivations built through the machine's own daemon, whose hook
    records them: their outputs."""
    expr = lab.write_expr(nix_lab)
    args = ["--argstr", "nonce", lab.nonce(), "--argstr", "count", str(count)]
    built = lab.run_as(
        lab.BUILDER, ["nix-build", "--no-out-link", str(expr), *args], {"NIX_REMOTE": "daemon"}
    )
    assert built.returncode == 0, built.stderr
    drvs = lab.sh("nix-instantiate", str(expr), *args).stdout.split()
    return set(lab.sh("nix-store", "--query", "--outputs", *drvs).stdout.split())


@pytest.fixture(scope="module", autouse=True)
def systemd_is_pid_1() -> None:
    if Path("/proc/1/comm").read_text().strip() != "systemd":
        pytest.fail("systemd is not PID 1 here: run `bash tests/run --systemd`", pytrace=False)


def test_the_flush_unit_delivers_signed_as_the_user_with_its_hardening(
    nix_lab: Path, ssh_lab
) -> None:
    host = ssh_lab.hosts[0]
    nixspool = lab.installed_program("nixspool")
    # This machine is the test's: start from no spool and no config, as a new user.
    setup = set_up_this_machine(ssh_lab, host)
    assert "systemctl daemon-reload" in setup.stdout  # it saw a running systemd
    hook = lab.installed_program("nixspool-hook")
    assert hook in setup.stdout, setup.stdout  # it names it, either way
    # ...and left it starting its Python directly, with no /bin/sh in front of every
    # build: the build below runs that file under the machine's own daemon.
    assert Path(hook).read_text().startswith(f"#!{Path(hook).parent / 'python3'} -IS\n")
    systemctl("enable", "--now", "nixspool-flush.timer")
    assert unit_property("nixspool-flush.timer", "ActiveState") == "active"

    # A host key the user's known_hosts does not have yet: the unit must write it.
    known_hosts = ssh_lab.alice.ssh_dir / "known_hosts"
    saved = known_hosts.read_text()
    others = [line for line in saved.splitlines(True) if host.address not in line]
    known_hosts.write_text("".join(others))

    # A build through the machine's own daemon; its hook records it.
    outputs = build_with_this_machines_daemon(nix_lab, 3)

    started = systemctl("start", "nixspool-flush.service", check=False)
    journal = lab.sh("journalctl", "-u", "nixspool-flush.service", "--no-pager", check=False)
    assert started.returncode == 0, started.stderr + journal.stdout
    assert unit_property("nixspool-flush.service", "Result") == "success", journal.stdout
    assert unit_property("nixspool-flush.service", "ExecMainStatus") == "0", journal.stdout

    assert host.remote_valid(outputs) == outputs
    status = json.loads(lab.sh(nixspool, "status", "--json").stdout)
    assert status["remotes"]["pi"]["delivered"] == len(outputs)
    assert status["remotes"]["pi"]["queued"] == status["remotes"]["pi"]["failed"] == 0
    # ssh ran as the user, inside the unit's sandbox, and recorded the new host key.
    # (Debian's ssh_config hashes host names: ask ssh-keygen, not the text.)
    found = lab.sh("ssh-keygen", "-F", host.address, "-f", str(known_hosts), check=False)
    assert found.returncode == 0, known_hosts.read_text()
    assert known_hosts.stat().st_uid == int(lab.sh("id", "-u", lab.ALICE).stdout)
    # ...with the hardening in force, not dropped to make it pass.
    assert unit_property("nixspool-flush.service", "ProtectSystem") == "strict"
    assert unit_property("nixspool-flush.service", "NoNewPrivileges") == "yes"
    assert unit_property("nixspool-flush.service", "PrivateTmp") == "yes"
    writable = unit_property("nixspool-flush.service", "ReadWritePaths").split()
    assert f"-{ssh_lab.alice.home}" in writable and "-/home" not in writable  # only her home
