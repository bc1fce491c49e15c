"""The network triggers for real: a cable plugged into a booted machine, its
NetworkManager running nixspool's dispatcher script, systemd starting the flush
unit with its hardening, and the queued build arriving on the LAN host.

Runs where systemd is PID 1 and the machine's host0 is one end of a veth pair
whose other end the test plugs and unplugs from outside (tests/platform/systemd
boots it so: `bash tests/run --systemd`). The LAN host is one of the lab's,
reached whatever the cable does: what is tested is the chain from a carrier to a
delivery, and that nothing else starts a flush (a carrier lost, a metered
connection, an interface the config leaves out).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import lab
from lab import sh
from nixspool import setup
from test_systemd import build_with_this_machines_daemon, set_up_this_machine

pytestmark = pytest.mark.systemd

SHARE = Path("/var/lib/nixspool-share")
CONFIG = Path("/etc/nixspool/config.toml")
DISPATCHER = Path("/etc/NetworkManager/dispatcher.d/90-nixspool")
UNIT = "nixspool-flush.service"


def wait_for(what: str, done: object, seconds: float = 30) -> float:
    """Seconds until done() is true; fails after `seconds`."""
    started = time.monotonic()
    while not done():  # type: ignore[operator]
        assert time.monotonic() - started < seconds, f"{what}: not within {seconds:g} s"
        time.sleep(0.1)
    return time.monotonic() - started


class Cable:
    """host0's cable: plugged and unplugged outside, by tests/platform/systemd."""

    def __init__(self) -> None:
        self.seq = int(time.time() * 1000)

    def set(self, state: str) -> None:
        self.seq += 1
        (SHARE / "cable").write_text(f"{self.seq} {state}\n")
        done = SHARE / "cable.done"
        wait_for(
            f"cable {state}",
            lambda: done.exists() and done.read_text().strip() == str(self.seq),
            10,
        )

    def unplug(self) -> None:
        """Out, and NetworkManager has seen it go (it takes ~6 s to believe it)."""
        self.set("down")
        wait_for("host0 unavailable", lambda: device_state().startswith("20"), 30)

    def plug(self) -> None:
        self.set("up")


def device_state() -> str:
    """NetworkManager's state of host0: "20 (unavailable)", "100 (connected)", ..."""
    return sh("nmcli", "-g", "GENERAL.STATE", "device", "show", "host0", check=False).stdout.strip()


def invocation() -> str:
    """The flush unit's last start (a new id for every start)."""
    return sh("systemctl", "show", "-p", "InvocationID", "--value", UNIT).stdout.strip()


def timing(line: str) -> None:
    """Kept for the run's log (tests/platform/systemd prints it)."""
    with (SHARE / "timings").open("a") as f:
        f.write(line + "\n")


@pytest.fixture(scope="module")
def cable() -> Iterator[Cable]:
    if Path("/proc/1/comm").read_text().strip() != "systemd":
        pytest.fail("systemd is not PID 1 here: run `bash tests/run --systemd`", pytrace=False)
    if not SHARE.is_dir() or not Path("/sys/class/net/host0").exists():
        pytest.fail("no host0 and cable: boot with tests/platform/systemd", pytrace=False)
    wait_for(
        "NetworkManager",
        lambda: (
            sh("systemctl", "is-active", "NetworkManager", check=False).stdout.strip() == "active"
        ),
    )
    the_cable = Cable()
    the_cable.set("down")
    sh(
        "nmcli", "connection", "add", "type", "ethernet", "ifname", "host0", "con-name", "lan",
        "ipv4.method", "manual", "ipv4.addresses", "10.233.0.2/24", "ipv6.method", "disabled",
    )  # fmt: skip
    wait_for("host0 unavailable", lambda: device_state().startswith("20"), 30)
    yield the_cable
    sh("nmcli", "connection", "delete", "lan", check=False)


@pytest.fixture(scope="module")
def installed(cable: Cable, ssh_lab: lab.SshLab) -> lab.LanHost:
    """nixspool set up as README says, the hook in nix.conf, nothing else that flushes
    (no timer, no path unit): only the dispatcher starts the unit here."""
    host = ssh_lab.hosts[0]
    set_up_this_machine(ssh_lab, host)
    assert DISPATCHER.exists(), "setup installed no dispatcher script"
    sh("systemctl", "disable", "--now", "nixspool-flush.timer", "nixspool-flush.path", check=False)
    return host


def arrive(host: lab.LanHost, outputs: set[str], seconds: float) -> float:
    """Seconds until every output is valid on the LAN host."""
    try:
        return wait_for(
            "the build on the LAN host", lambda: host.remote_valid(outputs) == outputs, seconds
        )
    except AssertionError:
        journal = sh(
            "journalctl", "-u", UNIT, "-u", "NetworkManager-dispatcher", "-t", "nixspool",
            "--no-pager", "-n", "60", check=False,
        )  # fmt: skip
        raise AssertionError(f"not delivered; the journal says:\n{journal.stdout}") from None


def queued() -> int:
    status = json.loads(sh(lab.installed_program("nixspool"), "status", "--json").stdout)
    return int(status["remotes"]["pi"]["queued"])


def nothing_starts(cable: Cable, before: str, seconds: float = 6) -> None:
    """The cable is in, NetworkManager connected host0, and still no flush began."""
    wait_for("host0 connected", lambda: device_state().startswith("100"), 30)
    time.sleep(seconds)  # the dispatcher runs within a second of "connected"
    assert invocation() == before, sh("journalctl", "-u", UNIT, "--no-pager").stdout


def test_a_cable_plugged_in_delivers_the_queued_build(
    cable: Cable, installed: lab.LanHost, nix_lab: Path
) -> None:
    outputs = build_with_this_machines_daemon(nix_lab, 3)
    assert queued() == len(outputs)
    before = invocation()
    started = time.monotonic()
    cable.plug()
    arrive(installed, outputs, 60)
    took = time.monotonic() - started
    timing(f"NetworkManager: carrier up -> {len(outputs)} paths on the LAN host in {took:.2f} s")
    assert invocation() != before
    wait_for("the unit done", lambda: invocation_result() == ("inactive", "success"), 60)
    assert queued() == 0
    # The dispatcher started it through systemd, with the unit's hardening.
    assert unit_property("ProtectSystem") == "strict"
    # Unplugged: NetworkManager says host0 went down, and nothing starts.
    after = invocation()
    cable.unplug()
    time.sleep(3)
    assert invocation() == after


def unit_property(name: str) -> str:
    return sh("systemctl", "show", "-p", name, "--value", UNIT).stdout.strip()


def invocation_result() -> tuple[str, str]:
    return unit_property("ActiveState"), unit_property("Result")


def test_a_metered_connection_starts_no_flush_until_an_unmetered_one_comes(
    cable: Cable, installed: lab.LanHost, nix_lab: Path
) -> None:
    since = sh("date", "+%Y-%m-%d %H:%M:%S").stdout.strip()
    sh("nmcli", "connection", "modify", "lan", "connection.metered", "yes")
    try:
        outputs = build_with_this_machines_daemon(nix_lab, 2)
        before = invocation()
        cable.plug()
        nothing_starts(cable, before)
        metered = sh("nmcli", "-g", "GENERAL.METERED", "device", "show", "host0").stdout
        assert metered.startswith("yes"), metered
        said = sh("journalctl", "-t", "nixspool", "--since", since, "--no-pager").stdout
        assert "not flushing: host0 is metered" in said, said
        assert installed.remote_valid(outputs) == set()
        cable.unplug()
    finally:
        sh("nmcli", "connection", "modify", "lan", "connection.metered", "no")
    started = time.monotonic()
    cable.plug()
    arrive(installed, outputs, 60)
    timing(f"NetworkManager: unmetered again -> delivered in {time.monotonic() - started:.2f} s")
    wait_for("the unit done", lambda: invocation_result()[0] == "inactive", 60)
    cable.unplug()


def test_an_interface_the_config_leaves_out_starts_no_flush(
    cable: Cable, installed: lab.LanHost, nix_lab: Path
) -> None:
    saved = DISPATCHER.read_text()
    nixspool = lab.installed_program("nixspool")
    DISPATCHER.write_text(setup.render_dispatcher(nixspool, ("wlan0",), ()))
    try:
        outputs = build_with_this_machines_daemon(nix_lab, 1)
        before = invocation()
        cable.plug()
        nothing_starts(cable, before)
        assert installed.remote_valid(outputs) == set()
        cable.unplug()
    finally:
        DISPATCHER.write_text(saved)
    cable.plug()  # the filter gone: host0 counts again
    arrive(installed, outputs, 60)
    wait_for("the unit done", lambda: invocation_result()[0] == "inactive", 60)
    cable.unplug()


def test_a_flapping_cable_gives_one_flush_at_a_time_and_none_left_waiting(
    cable: Cable, installed: lab.LanHost, nix_lab: Path
) -> None:
    outputs = build_with_this_machines_daemon(nix_lab, 2)
    for _ in range(5):  # five times in ten seconds
        cable.set("up")
        time.sleep(1)
        cable.set("down")
        time.sleep(1)
    cable.plug()
    arrive(installed, outputs, 90)
    # A oneshot unit runs once at a time; a start asked for while it runs joins
    # that run. Nothing is left queued behind it.
    wait_for(
        "no flush running or waiting",
        lambda: (
            invocation_result()[0] == "inactive"
            and UNIT not in sh("systemctl", "list-jobs", "--no-legend").stdout
        ),
        60,
    )
    journal = sh("journalctl", "-u", "NetworkManager-dispatcher", "-u", "NetworkManager").stdout
    for line in journal.splitlines():
        assert not ("90-nixspool" in line and ("timed out" in line or "failed" in line)), line
    cable.unplug()


def test_the_path_unit_flushes_soon_after_a_build(
    cable: Cable, installed: lab.LanHost, nix_lab: Path
) -> None:
    sh("systemctl", "start", "nixspool-flush.path")
    try:
        started = time.monotonic()
        outputs = build_with_this_machines_daemon(nix_lab, 1)  # its hook writes the spool's WAL
        arrive(installed, outputs, 60)
        timing(f".path unit: build done -> delivered in {time.monotonic() - started:.2f} s")
        wait_for("the unit done", lambda: invocation_result()[0] == "inactive", 60)
    finally:
        sh("systemctl", "stop", "nixspool-flush.path")


def test_the_timer_fires_the_unit_again_while_rows_wait(
    cable: Cable, installed: lab.LanHost, nix_lab: Path
) -> None:
    # Its periods shortened (a drop-in, as an admin would): 2 s after it starts,
    # then 3 s after each flush ends.
    dropin = Path("/run/systemd/system/nixspool-flush.timer.d/short.conf")
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text(
        "[Timer]\nOnBootSec=\nOnActiveSec=2s\nOnUnitInactiveSec=3s\nRandomizedDelaySec=0\n"
        "AccuracySec=100ms\n"
    )
    sh("systemctl", "daemon-reload")
    outputs = build_with_this_machines_daemon(nix_lab, 1)
    first = invocation()
    try:
        sh("systemctl", "start", "nixspool-flush.timer")
        arrive(installed, outputs, 60)
        second = invocation()
        assert second != first
        wait_for("another run of the timer", lambda: invocation() not in (first, second), 30)
    finally:
        sh("systemctl", "stop", "nixspool-flush.timer")
        dropin.unlink()
        sh("systemctl", "daemon-reload")
    wait_for("the unit done", lambda: invocation_result()[0] == "inactive", 60)


NETWORKD_UNIT = Path("/run/systemd/network/50-host0.network")


def test_a_cable_plugged_in_under_systemd_networkd_delivers_too(
    cable: Cable, installed: lab.LanHost, nix_lab: Path
) -> None:
    """networkd manages host0 instead of NetworkManager (stopped for good: last test),
    and Debian's networkd-dispatcher runs setup's routable.d script."""
    script = Path("/etc/networkd-dispatcher/routable.d/50-nixspool")
    assert script.exists(), "setup installed no networkd-dispatcher script"
    sh("systemctl", "stop", "NetworkManager", "NetworkManager-dispatcher", check=False)
    NETWORKD_UNIT.parent.mkdir(parents=True, exist_ok=True)
    NETWORKD_UNIT.write_text(
        "[Match]\nName=host0\n[Link]\nRequiredForOnline=no\n"
        "[Network]\nAddress=10.233.0.2/24\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n"
    )
    # Verbose, so the journal shows which scripts it ran; no startup triggers, so
    # that only a state change runs them.
    Path("/etc/default/networkd-dispatcher").write_text('networkd_dispatcher_args="-v"\n')
    sh("systemctl", "daemon-reload")
    sh("systemctl", "start", "systemd-networkd")
    # udev runs here (the lab's /sys is writable), but host0 came before it did:
    # replay its "add", as a boot's coldplug does, or networkd waits for it.
    sh("udevadm", "trigger", "--action=add", "--settle", "/sys/class/net/host0")
    sh("systemctl", "restart", "networkd-dispatcher")
    wait_for(
        "networkd-dispatcher",
        lambda: (
            sh("systemctl", "is-active", "networkd-dispatcher", check=False).stdout.strip()
            == "active"
        ),
    )
    # networkd-dispatcher may run routable.d for what is up when it starts (lo):
    # whatever that started is over before the build, so only the cable is left.
    wait_for("the unit idle", lambda: invocation_result()[0] == "inactive", 60)
    outputs = build_with_this_machines_daemon(nix_lab, 2)
    time.sleep(2)
    assert installed.remote_valid(outputs) == set()
    before = invocation()
    started = time.monotonic()
    cable.set("up")
    arrive(installed, outputs, 60)
    timing(
        f"networkd: carrier up -> {len(outputs)} paths on the LAN host in "
        f"{time.monotonic() - started:.2f} s"
    )
    assert invocation() != before
    assert "routable" in sh("networkctl", "status", "host0", "--no-pager").stdout
    said = sh("journalctl", "-u", "networkd-dispatcher", "--no-pager").stdout
    assert "50-nixspool" in said, said
    wait_for("the unit done", lambda: invocation_result()[0] == "inactive", 60)
    # Down is no trigger: networkd-dispatcher runs routable.d only on routable.
    after = invocation()
    cable.set("down")
    time.sleep(3)
    assert invocation() == after
