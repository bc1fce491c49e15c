"""Faults, with real parts: after each, every recorded path is on the remote or failed
with a reason `status` shows, no hook exited non-zero, and no flush outlived its
bounds.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import lab
from nixspool.hook import journal, rows

pytestmark = pytest.mark.integration


def flush_argv(config: Path, *args: str) -> list[str]:
    return [lab.installed_program("nixspool"), "--config", str(config), *args]


def journal_in(config: Path, outputs: list[str]) -> None:
    """Records as the hook writes them when the spool is busy: into the journal."""
    spool = config.parent / "spool" / "spool.sqlite"
    journal.append(str(spool) + ".fallback.jsonl", rows.Record("", outputs, [], time.time()))


# Where a kill lands: the moment a line of --debug output shows a step starting
# (plus 0-40 ms), or the journal being imported, or any instant.
AIMS = {
    "journal import": None,  # the .importing file appears
    "lease and copy": "copy --to",
    "signing": "path-info --json --json-format",
    "verification": "--store ssh-ng://",
    "GC-root sync": "GC roots",
    "anywhere": "",
}


def test_sigkill_at_30_instants_loses_nothing_and_delivers_once(ssh_lab: lab.SshLab) -> None:
    host = ssh_lab.hosts[0]
    host.wipe()
    body = (
        f'\n[remotes.pi]\nurl = "ssh-ng://{host.alias}"\n'
        f'sign_key_file = "{ssh_lab.nixspool_key}"\nverify = true\n'
    )
    config = ssh_lab.config(ssh_lab.root / "sigkill-30", body, batch_size=2)
    outputs = sorted(ssh_lab.build(40))
    ssh_lab.spool_in(config, set(outputs[:10]))
    spool = config.parent / "spool" / "spool.sqlite"
    rng = random.Random(int(os.environ.get("NIXSPOOL_FAULT_SEED", "0")) or None)
    landed: dict[str, int] = {}
    for run in range(30):
        aim = list(AIMS)[run % len(AIMS)]
        journal_in(config, outputs[10 + run : 11 + run])
        flusher = subprocess.Popen(
            flush_argv(config, "--debug", "flush"),
            env=ssh_lab.daemon.root_env(),
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        assert flusher.stderr is not None
        pattern = AIMS[aim]
        if pattern is None:
            deadline = time.monotonic() + 5
            while not Path(str(spool) + ".fallback.jsonl.importing").exists():
                if flusher.poll() is not None or time.monotonic() > deadline:
                    break
            else:
                landed[aim] = landed.get(aim, 0) + 1
        elif pattern == "":
            time.sleep(rng.uniform(0, 1.5))
            landed[aim] = landed.get(aim, 0) + 1
        else:
            for line in flusher.stderr:
                if pattern in line:
                    time.sleep(rng.uniform(0, 0.04))
                    landed[aim] = landed.get(aim, 0) + 1
                    break
        flusher.kill()
        flusher.wait()
    # Most kills landed where they were aimed (a step may have nothing to do in a run).
    assert sum(landed.values()) >= 20, landed

    # Rows a killed flush had deferred wait on their backoff: due now, by hand, as a
    # person would (not by sleeping past retry_max).
    assert ssh_lab.nixspool(config, "retry", "--all").returncode == 0
    final = ssh_lab.nixspool(config, "flush", "--json")
    assert final.returncode == 0, final.stderr
    recorded = set(outputs[:40])
    assert host.remote_valid(recorded) == recorded
    listed = ssh_lab.rows(config, "pi")
    assert set(listed) == recorded  # nothing lost, nothing doubled
    assert {r["state"] for r in listed.values()} == {"delivered"}
    infos = json.loads(ssh_lab.nixspool(config, "status", "--json").stdout)
    assert infos["paths"] == len(recorded)


def test_five_flushes_at_once_and_200_hooks_during_one(ssh_lab: lab.SshLab) -> None:
    """Nix 2.35 and Lix 2.94 run hooks concurrently, up to max-jobs."""
    config = ssh_lab.config(ssh_lab.root / "crowd")
    outputs = sorted(ssh_lab.build(30))
    ssh_lab.spool_in(config, set(outputs[:10]))
    hook_env = {
        "PATH": os.environ["PATH"],
        "NIXSPOOL_CONFIG": str(config),
    }

    def hook(path: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [lab.installed_program("nixspool-hook")],
            env={**hook_env, "DRV_PATH": "", "OUT_PATHS": path},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )

    # 200 hooks of the outputs not spooled yet, each several times.
    hooked_paths = (outputs[10:] * 10)[:200]
    random.shuffle(hooked_paths)
    flushes = [
        subprocess.Popen(
            flush_argv(config, "flush", "--json"),
            env=ssh_lab.daemon.root_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(5)
    ]
    with ThreadPoolExecutor(16) as pool:
        hooks = list(pool.map(hook, hooked_paths))
    results = [(*f.communicate(timeout=300), f.returncode) for f in flushes]
    assert [h.returncode for h in hooks] == [0] * 200
    assert [h.stderr for h in hooks if h.stderr] == []
    # One flush delivers; each of the others finds it running, says so, and exits
    # 75 (try later), as for a host that is away: nothing is wrong.
    assert sorted(code for _, _, code in results)[0] == 0, results
    for _, stderr, code in results:
        assert code == 0 or (code == 75 and "another nixspool flush is running" in stderr)
    final = ssh_lab.nixspool(config, "flush")
    assert final.returncode == 0, final.stderr
    for host, name in zip(ssh_lab.hosts, ("pi", "nas"), strict=True):
        assert host.remote_valid(outputs) == set(outputs)
        listed = ssh_lab.rows(config, name)
        assert set(listed) == set(outputs)
        assert {r["state"] for r in listed.values()} == {"delivered"}


def test_a_host_that_never_sends_a_banner_is_away_within_the_bound(ssh_lab: lab.SshLab) -> None:
    """A listener in the LAN host's namespace accepts TCP and never sends an SSH
    banner. connect_timeout is 3 s in the lab; the probe's bound is 4 of them + 5 s."""
    host = ssh_lab.hosts[1]
    script = (
        "import socket\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.bind(('0.0.0.0', 2222)); s.listen(8); held = []\n"
        "while True: held.append(s.accept())\n"
    )
    listener = subprocess.Popen(["ip", "netns", "exec", host.netns, "python3", "-c", script])
    try:
        time.sleep(0.5)
        url = f"ssh-ng://{host.user}@{host.address}:2222"
        config = ssh_lab.config(ssh_lab.root / "no-banner", f'\n[remotes.away]\nurl = "{url}"\n')
        ssh_lab.spool_in(config, ssh_lab.build(1))
        started = time.monotonic()
        result = ssh_lab.nixspool(config, "flush", "--json", timeout=120)
        took = time.monotonic() - started
    finally:
        listener.kill()
        listener.wait()
    assert took < 3 * 4 + 5 + 5, f"the flush took {took:.1f} s"
    # Away (75), as alice's ssh says: "Connection timed out during banner exchange"
    # is what a host that has gone silent, or a proxy to it, looks like.
    assert result.returncode == 75, result.stderr
    assert "banner exchange" in json.loads(result.stdout)["remotes"]["away"]["error"]
    assert "Traceback" not in result.stderr
    rows = ssh_lab.rows(config, "away")
    assert {r["state"] for r in rows.values()} == {"queued"}, rows


def test_hooks_never_fail_while_the_flusher_is_killed_again_and_again(
    ssh_lab: lab.SshLab,
) -> None:
    """Hooks and killed flushers side by side: every hook exits 0 and every path a
    hook recorded is delivered in the end."""
    config = ssh_lab.config(ssh_lab.root / "hooks-and-kills")
    outputs = sorted(ssh_lab.build(12))
    env = {"PATH": os.environ["PATH"], "NIXSPOOL_CONFIG": str(config)}
    assert ssh_lab.nixspool(config, "status").returncode == 0  # the spool exists
    for i, path in enumerate(outputs):
        flusher = subprocess.Popen(
            flush_argv(config, "flush"), env=ssh_lab.daemon.root_env(), stderr=subprocess.DEVNULL
        )
        hooked = subprocess.run(
            [lab.installed_program("nixspool-hook")],
            env={**env, "DRV_PATH": "", "OUT_PATHS": path},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
        )
        assert (hooked.returncode, hooked.stderr) == (0, b"")
        time.sleep(0.05 * (i % 5))
        flusher.send_signal(signal.SIGKILL)
        flusher.wait()
    assert ssh_lab.nixspool(config, "retry", "--all").returncode == 0  # deferred: due now
    final = ssh_lab.nixspool(config, "flush")
    assert final.returncode == 0, final.stderr
    assert ssh_lab.hosts[0].remote_valid(outputs) == set(outputs)
