"""What nixspool says of a host is what alice's own OpenSSH says: the ssh_config
features people reach their caches with, each against a real sshd.

A hidden host sits behind lanhost0 (a second network namespace linked only to
lanhost0's: this machine has no route to it), reached with ProxyJump or a
ProxyCommand, from an Include'd file or a Match block, with hashed known_hosts
entries, a HostKeyAlias, @revoked and @cert-authority lines, and a user
certificate. For each case, an ssh-ng://, an ssh:// and an sftp:// remote go
through a real flush and doctor, and both must agree with
`ssh -o BatchMode=yes ALIAS true` run as alice.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import lab

pytestmark = pytest.mark.integration


@dataclass
class Hidden:
    host: lab.LanHost
    cache: Path  # its sftp cache directory
    host_key: str  # "ssh-ed25519 AAAA..."
    host_ca: str  # the CA that signed its host certificate (public key)
    work: Path


@pytest.fixture(scope="module")
def hidden(ssh_lab: lab.SshLab) -> Iterator[Hidden]:
    root = ssh_lab.root / "hidden"
    trusted = f"{ssh_lab.public_key} {ssh_lab.nixspool_public_key}"
    host = lab.LanHost(root, 8, trusted, behind=ssh_lab.hosts[0])
    try:
        host.authorize(ssh_lab.alice.public_key)
        cache = host.serve_sftp(ssh_lab.alice.public_key)
        # A host certificate (for @cert-authority) and a user CA (for alice's
        # certificate), both in force for every case: a client that asks for
        # neither gets the plain key, as from any sshd.
        host_ca, user_ca = root / "host_ca", root / "user_ca"
        for ca in (host_ca, user_ca):
            lab.sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ca))
        key = root / "ssh_host_ed25519_key"
        lab.sh(
            "ssh-keygen", "-q", "-s", str(host_ca), "-h", "-I", "hidden",
            "-n", f"{host.address},hidden-ca", f"{key}.pub",
        )  # fmt: skip
        host.configure_sshd(f"HostCertificate {key}-cert.pub\nTrustedUserCAKeys {user_ca}.pub\n")
        # alice's second key: in no authorized_keys, good only with its certificate.
        cert_key = ssh_lab.alice.ssh_dir / "id_cert"
        lab.sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(cert_key))
        lab.sh(
            "ssh-keygen", "-q", "-s", str(user_ca), "-I", "alice",
            "-n", f"{host.user},{host.sftp_user}", f"{cert_key}.pub",
        )  # fmt: skip
        lab.sh("chown", "-R", lab.ALICE, str(ssh_lab.alice.ssh_dir))
        yield Hidden(
            host,
            cache,
            " ".join(host.host_key),
            " ".join(Path(f"{host_ca}.pub").read_text().split()[:2]),
            root,
        )
    finally:
        host.close()
        ssh_lab.alice.know()


def jump(alias: str, hidden: Hidden, how: str = "ProxyJump lanhost0") -> str:
    return f"Host {alias}\n  HostName {hidden.host.address}\n  User {hidden.host.user}\n  {how}\n"


# case: (alice's extra ~/.ssh/config, or it and an Include'd file; her extra
# known_hosts lines; whether her ssh logs in)
Case = tuple[Callable[[Hidden], str | tuple[str, str]], Callable[[Hidden], str], bool]
CASES: dict[str, Case] = {
    "proxyjump": (
        lambda h: jump("hidden", h),
        lambda h: f"{h.host.address} {h.host_key}\n",
        True,
    ),
    "proxycommand": (
        lambda h: jump("hidden", h, "ProxyCommand ssh -o BatchMode=yes -W %h:%p lanhost0"),
        lambda h: f"{h.host.address} {h.host_key}\n",
        True,
    ),
    "include and match": (
        # The alias only in an Include'd file; where it goes only in a Match block.
        lambda h: (
            "Include ~/.ssh/config.d/*.conf\n",
            f"Host hidden\n  User {h.host.user}\n"
            f"Match host hidden\n  HostName {h.host.address}\n  ProxyJump lanhost0\n",
        ),
        lambda h: f"{h.host.address} {h.host_key}\n",
        True,
    ),
    "hashed entry under a HostKeyAlias": (
        lambda h: jump("hidden", h, "ProxyJump lanhost0\n  HostKeyAlias hidden-key"),
        lambda h: f"hidden-key {h.host_key}\n",  # hashed by the test
        True,
    ),
    "host certificate": (
        lambda h: jump("hidden", h, "ProxyJump lanhost0\n  HostKeyAlias hidden-ca"),
        lambda h: f"@cert-authority hidden-ca {h.host_ca}\n",
        True,
    ),
    "user certificate": (
        lambda h: jump(
            "hidden",
            h,
            "ProxyJump lanhost0\n  IdentityFile ~/.ssh/id_cert\n"
            "  CertificateFile ~/.ssh/id_cert-cert.pub\n  IdentitiesOnly yes",
        ),
        lambda h: f"{h.host.address} {h.host_key}\n",
        True,
    ),
    "revoked host key": (
        lambda h: jump("hidden", h),
        lambda h: f"{h.host.address} {h.host_key}\n@revoked * {h.host_key}\n",
        False,
    ),
    "unknown host key": (
        lambda h: jump("hidden", h),
        lambda h: "",
        False,
    ),
}


@pytest.fixture
def alice_config(ssh_lab: lab.SshLab) -> Iterator[None]:
    yield
    ssh_lab.alice.know()  # her config and known_hosts as the lab made them
    config_d = ssh_lab.alice.ssh_dir / "config.d"
    for f in config_d.glob("*") if config_d.exists() else []:
        f.unlink()


def configure_alice(ssh_lab: lab.SshLab, hidden: Hidden, case: str) -> None:
    config, known, _ = CASES[case]
    ssh_dir = ssh_lab.alice.ssh_dir
    text = config(hidden)
    if isinstance(text, tuple):  # (the main config's lines, an Include'd file)
        (ssh_dir / "config.d").mkdir(exist_ok=True)
        (ssh_dir / "config.d" / "hidden.conf").write_text(text[1])
        text = text[0]
    # Prepended: an Include or Host block after the lab's own would be inside them.
    (ssh_dir / "config").write_text(text + "\n" + (ssh_dir / "config").read_text())
    known_hosts = ssh_dir / "known_hosts"
    known_hosts.write_text(known_hosts.read_text() + known(hidden))
    if case.startswith("hashed"):
        lab.sh("ssh-keygen", "-q", "-H", "-f", str(known_hosts))
        assert "hidden-key" not in known_hosts.read_text()
    lab.sh("chown", "-R", lab.ALICE, str(ssh_dir))


def remotes(hidden: Hidden) -> str:
    return (
        '\n[remotes.ng]\nurl = "ssh-ng://hidden"\n'
        '\n[remotes.legacy]\nurl = "ssh://hidden"\n'
        f'\n[remotes.static]\nurl = "sftp://{hidden.host.sftp_user}@hidden{hidden.cache}"\n'
    )


@pytest.mark.parametrize("case", list(CASES))
def test_nixspool_says_what_alices_ssh_says(
    ssh_lab: lab.SshLab, hidden: Hidden, alice_config: None, case: str
) -> None:
    configure_alice(ssh_lab, hidden, case)
    logs_in = CASES[case][2]
    by_hand = ssh_lab.alice.ssh("hidden")
    assert (by_hand.returncode == 0) is logs_in, (case, by_hand.stderr)

    config = ssh_lab.config(hidden.work / case.replace(" ", "-"), remotes(hidden))
    outputs = ssh_lab.build(2)
    ssh_lab.spool_in(config, outputs)
    flushed = ssh_lab.nixspool(config, "flush", "--json")
    report = json.loads(flushed.stdout)["remotes"]
    doctor = ssh_lab.nixspool(config, "doctor", "--json")
    failing = [
        c for c in json.loads(doctor.stdout) if c["name"].startswith("remote ") and not c["ok"]
    ]
    if logs_in:
        assert flushed.returncode == 0, (case, flushed.stderr)
        assert {name: r["delivered"] for name, r in report.items()} == {
            "ng": len(outputs),
            "legacy": len(outputs),
            "static": len(outputs),
        }
        assert hidden.host.remote_valid(outputs) == outputs
        names = {p.name for p in hidden.cache.iterdir()}
        assert all(f"{Path(o).name[:32]}.narinfo" in names for o in outputs)
        assert failing == [], failing
        checks = json.loads(doctor.stdout)
        resolved = next(c["detail"] for c in checks if c["name"] == "remote ng")
        assert f"@{hidden.host.address}:22 via " in resolved, resolved
    else:  # refused: a person's job, not "away"; nothing counted against the rows
        assert flushed.returncode == 1, (case, flushed.stderr)
        for name, r in report.items():
            assert not r["unreachable"] and "Host key verification failed" in r["error"], name
            assert r["delivered"] == 0
        for name in ("ng", "legacy", "static"):
            assert {r["attempts"] for r in ssh_lab.rows(config, name).values()} == {0}
        assert {c["name"] for c in failing} == {"remote ng", "remote legacy", "remote static"}
        assert all("misconfigured" in c["detail"] for c in failing), failing


def test_a_jump_host_that_is_away_is_away(
    ssh_lab: lab.SshLab, hidden: Hidden, alice_config: None
) -> None:
    """The bastion's link down: alice's ssh cannot connect; nixspool says "away"
    (exit 75) for every remote behind it, and keeps their rows."""
    configure_alice(ssh_lab, hidden, "proxyjump")
    config = ssh_lab.config(hidden.work / "jump-away", remotes(hidden), connect_timeout=2)
    ssh_lab.spool_in(config, ssh_lab.build(1))
    ssh_lab.hosts[0].link_down()
    try:
        by_hand = ssh_lab.alice.ssh("hidden")
        flushed = ssh_lab.nixspool(config, "flush", "--json")
    finally:
        ssh_lab.hosts[0].link_up()
    # The jump's connect or the outer banner exchange, whichever times out first.
    assert by_hand.returncode == 255 and "timed out" in by_hand.stderr, by_hand.stderr
    assert flushed.returncode == 75, flushed.stderr
    report = json.loads(flushed.stdout)["remotes"]
    assert all(r["unreachable"] for r in report.values()), report
