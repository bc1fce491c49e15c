"""The triggers as installed: the dispatcher scripts run as NetworkManager runs them,
setup's files as systemd and NetworkManager read them, shellcheck, and the Nix files
parsed.
"""

from __future__ import annotations

import re
import shlex
import stat
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

import lab
from nixspool import setup
from nixspool.spool import Spool

REPO = Path(__file__).parents[2]
DATA = REPO / "hook" / "nixspool" / "data"


def nm_permissions_ok(path: Path) -> str | None:
    """NetworkManager's own checks before it runs a dispatcher script (nm-dispatcher.c:
    check_filename and check_permissions); None if it would run it."""
    name = path.name
    if name.startswith(".") or name.endswith(("~", ".rpmsave", ".rpmorig", ".rpmnew", ".swp")):
        return "ignored file name"
    st = path.stat()
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        return "not a non-empty regular file"
    if st.st_uid != 0:
        return "not owned by root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH | stat.S_ISUID):
        return "writable by group or other, or set-UID"
    if not st.st_mode & stat.S_IXUSR:
        return "not executable by owner"
    return None


def test_shell_scripts_pass_shellcheck() -> None:
    lab.require_lab("shellcheck")
    scripts = [
        DATA / "90-nixspool",
        DATA / "50-nixspool",
        REPO / "contrib" / "demo.sh",
        REPO / "tests" / "run",
        REPO / ".ci" / "run",
        *sorted((REPO / "tests" / "platform").iterdir()),
    ]
    result = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.fixture
def dispatcher(tmp_path: Path) -> Path:
    """The dispatcher as `nixspool setup` renders it, pointing at a stand-in nixspool."""
    lab.require_lab()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    standin = bin_dir / "nixspool"
    standin.write_text(f'#!/bin/sh\nsleep 2\necho "$*" >> {tmp_path}/nixspool-ran\n')
    standin.chmod(0o755)
    script = tmp_path / "90-nixspool"
    script.write_text(setup.render_dispatcher(str(standin), (), ()))
    script.chmod(0o755)
    return script


def standin_systemctl(tmp_path: Path, works: bool) -> Path:
    directory = tmp_path / ("systemd" if works else "no-systemd")
    directory.mkdir(exist_ok=True)
    systemctl = directory / "systemctl"
    systemctl.write_text(
        f'#!/bin/sh\necho "$*" >> {tmp_path}/systemctl-ran\nexit {0 if works else 1}\n'
    )
    systemctl.chmod(0o755)
    return directory


def nm_run(script: Path, iface: str, action: str, extra: dict[str, str]) -> float:
    """Run it exactly as NetworkManager does: argv, its variables only, cwd /."""
    env = {
        "CONNECTION_UUID": "2f5c0d8e-8c3a-4f55-9a5e-1b2c3d4e5f60",
        "CONNECTION_ID": "Home WiFi",
        "DEVICE_IFACE": iface,
        "DEVICE_IP_IFACE": iface,
        "NM_DISPATCHER_ACTION": action,
        **extra,
    }
    started = time.monotonic()
    result = subprocess.run(
        [str(script), iface, action], env=env, cwd="/", capture_output=True, text=True, timeout=10
    )
    took = time.monotonic() - started
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    return took


ACTIONS = [
    ("up", {}, True),
    ("vpn-up", {}, True),
    ("dhcp4-change", {}, True),
    ("dhcp6-change", {}, True),
    ("connectivity-change", {"CONNECTIVITY_STATE": "FULL"}, True),
    ("connectivity-change", {"CONNECTIVITY_STATE": "NONE"}, False),
    ("down", {}, False),
    ("pre-up", {}, False),
    ("vpn-down", {}, False),
    ("hostname", {}, False),
    ("reapply", {}, False),
]


@pytest.mark.parametrize(("action", "extra", "starts"), ACTIONS)
def test_dispatcher_with_systemd_starts_the_unit_without_blocking(
    dispatcher: Path, tmp_path: Path, action: str, extra: dict[str, str], starts: bool
) -> None:
    path = standin_systemctl(tmp_path, works=True)
    took = nm_run(dispatcher, "wlan0", action, {"PATH": str(path), **extra})
    ran = tmp_path / "systemctl-ran"
    assert ran.exists() == starts
    if starts:
        assert ran.read_text() == "start --no-block nixspool-flush.service\n"
    assert took < 1


@pytest.mark.parametrize(("action", "extra", "starts"), ACTIONS[:6])
def test_dispatcher_without_systemd_starts_a_detached_flush(
    dispatcher: Path, tmp_path: Path, action: str, extra: dict[str, str], starts: bool
) -> None:
    path = standin_systemctl(tmp_path, works=False)  # "System has not been booted with systemd"
    took = nm_run(dispatcher, "eth0", action, {"PATH": str(path), **extra})
    assert took < 1, "NetworkManager waited for the flush"  # the stand-in sleeps 2 s
    marker = tmp_path / "nixspool-ran"
    if starts:
        deadline = time.monotonic() + 10
        while not marker.exists():
            assert time.monotonic() < deadline, "the detached flush never ran"
            time.sleep(0.05)
        assert marker.read_text() == "flush\n"
    else:
        time.sleep(2.5)
        assert not marker.exists()


def test_dispatcher_with_no_systemctl_and_no_path_at_all(dispatcher: Path, tmp_path: Path) -> None:
    # NetworkManager passes PATH only if it has one: the script brings its own.
    took = nm_run(dispatcher, "eth0", "up", {})
    assert took < 1


def test_dispatcher_limited_to_named_interfaces_and_connections(tmp_path: Path) -> None:
    lab.require_lab()
    script = tmp_path / "90-nixspool"
    script.write_text(
        setup.render_dispatcher("/nonexistent/nixspool", ("wlan0",), ("Home WiFi", "Office"))
    )
    script.chmod(0o755)
    path = standin_systemctl(tmp_path, works=True)
    nm_run(script, "eth0", "up", {"PATH": str(path)})  # other interface
    assert not (tmp_path / "systemctl-ran").exists()
    nm_run(script, "wlan0", "up", {"PATH": str(path), "CONNECTION_ID": "Cafe"})
    assert not (tmp_path / "systemctl-ran").exists()
    nm_run(script, "wlan0", "up", {"PATH": str(path), "CONNECTION_ID": "Home WiFi"})
    assert (tmp_path / "systemctl-ran").read_text().count("start") == 1
    # A connectivity change names no interface: it counts only while a connection
    # the filters name is active (nmcli escapes ':' in names).
    change = {"PATH": str(path), "CONNECTIVITY_STATE": "FULL"}
    standin_nmcli(path, {"eth0": "no"}, active=("eth0:Cafe", "wlan0:Cafe\\:2"))
    nm_run(script, "", "connectivity-change", change)
    assert (tmp_path / "systemctl-ran").read_text().count("start") == 1
    standin_nmcli(path, {"wlan0": "no"}, active=("eth0:Cafe", "wlan0:Office"))
    nm_run(script, "", "connectivity-change", change)
    assert (tmp_path / "systemctl-ran").read_text().count("start") == 2


def standin_nmcli(directory: Path, devices: dict[str, str], active: tuple[str, ...] = ()) -> None:
    """nmcli answering GENERAL.METERED of `devices` (name -> "yes (guessed)", "no"...)
    and the connected ones' list, as NetworkManager's own would; and a logger that
    writes where the test reads."""
    metered = "".join(f'    {name}) echo "{value}" ;;\n' for name, value in devices.items())
    connected = "\\n".join(f"{name}:connected" for name in devices)
    active_words = " ".join(shlex.quote(a) for a in active) or "''"
    (directory / "nmcli").write_text(
        "#!/bin/sh\n"
        f'[ "$1" = -g ] && [ "$2" = DEVICE,STATE ] && {{ printf "{connected}\\n"; exit 0; }}\n'
        f'[ "$1" = -t ] && [ "$3" = DEVICE,NAME ] && {{ printf "%s\\n" {active_words}; exit 0; }}\n'
        'case "$5" in\n' + metered + "    *) exit 10 ;;\nesac\n"
    )
    (directory / "logger").write_text(f'#!/bin/sh\necho "$*" >> {directory}/logged\n')
    for name in ("nmcli", "logger"):
        (directory / name).chmod(0o755)


def test_dispatcher_leaves_a_metered_connection_alone(tmp_path: Path) -> None:
    lab.require_lab()
    config = tmp_path / "config.toml"
    config.write_text('spool = "/x"\n')
    script = tmp_path / "90-nixspool"
    script.write_text(setup.render_dispatcher("/nonexistent/nixspool", (), (), str(config)))
    script.chmod(0o755)
    path = standin_systemctl(tmp_path, works=True)
    standin_nmcli(path, {"wwan0": "yes", "wlan0": "yes (guessed)", "eth0": "no (guessed)"})
    ran = tmp_path / "systemctl-ran"
    for metered in ("wwan0", "wlan0"):
        nm_run(script, metered, "up", {"PATH": str(path)})
    assert not ran.exists()
    assert (path / "logged").read_text().splitlines() == [
        f"-t nixspool not flushing: {name} is metered (flush_on_metered = true in {config} "
        "allows it)"
        for name in ("wwan0", "wlan0")
    ]
    nm_run(script, "eth0", "up", {"PATH": str(path)})
    assert ran.read_text().count("start") == 1
    # A connectivity change: eth0, connected and unmetered, will do.
    nm_run(script, "", "connectivity-change", {"PATH": str(path), "CONNECTIVITY_STATE": "FULL"})
    assert ran.read_text().count("start") == 2
    # Only metered links connected: no flush on a connectivity change either.
    only = tmp_path / "only-metered"
    only.mkdir()
    standin_nmcli(only, {"wwan0": "yes"})
    (only / "systemctl").symlink_to(path / "systemctl")
    nm_run(script, "", "connectivity-change", {"PATH": str(only), "CONNECTIVITY_STATE": "FULL"})
    assert ran.read_text().count("start") == 2
    # The config allows it: the metered link triggers a flush too.
    config.write_text('flush_on_metered = true\nspool = "/x"\n')
    nm_run(script, "wwan0", "up", {"PATH": str(path)})
    assert ran.read_text().count("start") == 3


def reachable_by_alice(tmp_path: Path) -> None:
    """Let others search (not read) pytest's root-only directories down to tmp_path:
    root works in alice's spool directory with her rights, so she must reach it."""
    for parent in [tmp_path, *tmp_path.parents][:3]:
        parent.chmod(parent.stat().st_mode | 0o011)


@pytest.fixture
def installed(tmp_path: Path) -> tuple[Path, Path]:
    """`nixspool setup` into a scratch root: (root, config file). Its spool belongs
    to alice, so she must be able to reach it: pytest's own directories are root's."""
    lab.require_lab()
    lab.ensure_user(lab.ALICE, groups=["nix-users"])
    reachable_by_alice(tmp_path)
    root = tmp_path / "root"
    (root / "etc" / "NetworkManager" / "dispatcher.d").mkdir(parents=True)
    config = tmp_path / "etc-nixspool" / "config.toml"
    argv = [
        lab.installed_program("nixspool"),
        "setup",
        "--user",
        lab.ALICE,
        "--remote",
        "pi=ssh-ng://lanhost0",
        "--spool",
        str(tmp_path / "spool/spool.sqlite"),
        "--config-file",
        str(config),
        "--root",
        str(root),
    ]
    first = subprocess.run(argv, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "wrote" in first.stdout and "post-build-hook = " in first.stdout
    again = subprocess.run(argv, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "nothing to change" in again.stdout  # idempotent
    assert "wrote" not in again.stdout
    return root, config


def test_setup_installs_what_networkmanager_and_systemd_accept(installed) -> None:
    root, config = installed
    script = root / setup.DISPATCHER
    assert nm_permissions_ok(script) is None
    units = [root / setup.UNIT_DIR / unit for unit in setup.UNITS]
    lab.require_lab("systemd-analyze")
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, units)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert lab.installed_program("nixspool") in units[0].read_text()
    spool = config.parent.parent / "spool"
    assert oct(spool.stat().st_mode & 0o777) == "0o700"
    assert spool.stat().st_uid == int(lab.sh("id", "-u", lab.ALICE).stdout)


# What `systemd-analyze security` says of the flush unit (docs/nixos.md), by the
# systemd that rates it (its weights change between releases): a hardening
# directive dropped raises it, and this fails.
EXPOSURE_BY_SYSTEMD = {252: 4.8}  # Debian 12; 257 (Debian 13) and later: 4.6
EXPOSURE_SINCE_257 = 4.6


def expected_exposure() -> float:
    version = lab.sh("systemd-analyze", "--version").stdout.split()[1]
    return EXPOSURE_BY_SYSTEMD.get(int(version), EXPOSURE_SINCE_257)


def exposure(unit: Path) -> float:
    """systemd's "overall exposure level" of a unit file, read offline."""
    lab.require_lab("systemd-analyze")
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
    )
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert found, result.stdout + result.stderr
    return float(found[1])


def test_the_installed_unit_is_as_hardened_as_the_docs_say(installed) -> None:
    root, _ = installed
    assert exposure(root / setup.UNIT_DIR / "nixspool-flush.service") <= expected_exposure()


def test_setup_refuses_to_clobber_a_different_config(installed) -> None:
    _, config = installed
    result = subprocess.run(
        [
            lab.installed_program("nixspool"),
            "setup",
            "--user",
            lab.ALICE,
            "--remote",
            "nas=ssh://nas",
            "--config-file",
            str(config),
            "--root",
            str(config.parent),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "exists with other content" in result.stderr


def test_nix_files_parse() -> None:
    lab.require_lab("nix-instantiate")
    for path in (REPO / "contrib" / "nixos").glob("*.nix"):
        result = subprocess.run(
            ["nix-instantiate", "--parse", str(path)], capture_output=True, text=True
        )
        assert result.returncode == 0, f"{path}: {result.stderr}"


def test_setup_skips_what_is_not_there_and_says_only_what_is_true(tmp_path: Path) -> None:
    """No NetworkManager: no dispatcher, and a note saying so. nix.conf already has
    the hook: no "add to nix.conf". The spool is named in the config (its default
    depends on who runs nixspool). Handing the spool to the user is a change."""
    lab.require_lab()
    lab.ensure_user(lab.ALICE, groups=["nix-users"])
    root = tmp_path / "root"
    nix_conf = root / "etc" / "nix" / "nix.conf"
    nix_conf.parent.mkdir(parents=True)
    nix_conf.write_text(f"post-build-hook =  {lab.installed_program('nixspool-hook')}\n")
    config = tmp_path / "etc-nixspool" / "config.toml"
    reachable_by_alice(tmp_path)
    spool = tmp_path / "spool" / "spool.sqlite"
    spool.parent.mkdir(mode=0o700)
    Spool.open(str(spool)).close()  # root's, as a first `nixspool status` would leave it
    argv = [lab.installed_program("nixspool"), "setup", "--user", lab.ALICE, "--remote",
            "pi=ssh-ng://lanhost0", "--spool", str(spool), "--config-file", str(config),
            "--root", str(root)]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert not (root / setup.DISPATCHER).exists()
    assert "NetworkManager is not installed: no dispatcher script" in result.stdout
    assert "add to /etc/nix/nix.conf" not in result.stdout
    assert "/etc/nix/nix.conf has `post-build-hook = " in result.stdout
    assert f"wrote     {spool}" in result.stdout  # given to alice: a change
    assert f'spool = "{spool}"' in config.read_text()
    again = subprocess.run(argv, capture_output=True, text=True)
    assert f"unchanged {spool}" in again.stdout


def venv_of_alice(where: Path) -> Path:
    """An installation alice can change, as a venv in her home would be: its own
    bin/ with nixspool, nixspool-hook and python3, its pyvenv.cfg, and the test
    venv's packages through a .pth (no network, no pip). Its bin/nixspool."""
    real = Path(sys.prefix)
    site = Path(sysconfig.get_path("purelib")).relative_to(real)
    (where / "bin").mkdir(parents=True)
    (where / site).mkdir(parents=True)
    (where / "pyvenv.cfg").write_text((real / "pyvenv.cfg").read_text())
    (where / site / "test-venv.pth").write_text(f"{real / site}\n")
    (where / "bin" / "python3").symlink_to(real / "bin" / "python3")
    for name in ("nixspool", "nixspool-hook"):
        text = (real / "bin" / name).read_text()
        if name == "nixspool":  # pip's console script: its #! names the test venv's python
            text = f"#!{where / 'bin' / 'python3'}\n" + text.split("\n", 1)[1]
        (where / "bin" / name).write_text(text)
        (where / "bin" / name).chmod(0o755)
    lab.sh("chown", "-R", lab.ALICE, str(where))
    return where / "bin" / "nixspool"


def test_setup_as_root_refuses_an_installation_its_user_can_change(tmp_path: Path) -> None:
    """Its units and dispatcher would run alice's nixspool as root on every network
    event, its hook on every build: refused, nothing written, one message with the
    fix; accepted with --allow-unsafe-install, with one warning, not one per file."""
    lab.require_lab()
    lab.ensure_user(lab.ALICE, groups=["nix-users"])
    reachable_by_alice(tmp_path)
    nixspool = venv_of_alice(tmp_path / "home" / "venv")
    root = tmp_path / "root"
    (root / "etc" / "NetworkManager" / "dispatcher.d").mkdir(parents=True)
    config = tmp_path / "etc-nixspool" / "config.toml"
    argv = [
        str(nixspool), "setup", "--user", lab.ALICE, "--remote", "pi=ssh-ng://lanhost0",
        "--spool", str(tmp_path / "spool/spool.sqlite"), "--config-file", str(config),
        "--root", str(root),
    ]  # fmt: skip
    refused = subprocess.run(argv, capture_output=True, text=True)
    assert refused.returncode == 2, refused.stderr
    assert "this installation is not root's alone" in refused.stderr
    assert f"{nixspool.parent}" in refused.stderr and "--allow-unsafe-install" in refused.stderr
    assert not config.exists() and not (root / setup.UNIT_DIR).exists()
    accepted = subprocess.run([*argv, "--allow-unsafe-install"], capture_output=True, text=True)
    assert accepted.returncode == 0, accepted.stderr
    assert (accepted.stdout + accepted.stderr).count("WARNING") == 1
    assert str(nixspool) in (root / setup.UNIT_DIR / "nixspool-flush.service").read_text()
