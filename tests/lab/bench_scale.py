"""Benchmark: the hook, `status` and a flush as the spool grows, as ratios from one run.

    python tests/lab/bench_scale.py [--levels 0,10000,100000,1000000] [--runs 20]

A laptop away from its cache for months, or a builder whose cache host died,
queues without bound. At each level (rows queued for one remote) this prints:
the hook's median time and its ratio to a bare interpreter start measured
beside it (target: flat); `nixspool status`'s median time / at level 0; and one
flush over all the rows, its time and peak memory (the paths are well formed
but not in the store, so each is looked up and set aside as failed: the whole
claim, check and mark cycle, without the network). Run as root after
`bash tests/run`. A benchmark, not a test: it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # programs
sys.path.insert(0, str(Path(__file__).parent))  # lab

import lab
from bench_hook import timed
from nixspool.hook import rows
from nixspool.hook.storepath import NIX_BASE32
from nixspool.spool import Spool


def fake_store_path(i: int) -> str:
    """A well-formed store path that is not in the store."""
    digest = "".join(NIX_BASE32[(i >> (5 * k)) & 31] for k in range(8)) + NIX_BASE32[8:32]
    return f"/nix/store/{digest}-bench-{i}"


def nixspool(daemon: lab.NixDaemon, config: Path, *args: str) -> tuple[list[str], dict[str, str]]:
    """The installed command and the environment root runs it with."""
    env = daemon.root_env()
    return [lab.installed_program("nixspool"), "--config", str(config), *args], env


def level(daemon: lab.NixDaemon, work: Path, count: int, runs: int) -> dict[str, float]:
    spool = work / "spool" / "spool.sqlite"
    with Spool.open(str(spool)) as s, s.transaction():
        outs = [fake_store_path(i) for i in range(count)]
        rows.store(s.conn, [rows.Record("", outs, [], time.time())])
    config = work / "config.toml"
    config.write_text(
        f'spool = "{spool}"\nrun_as_root = true\ngc_roots = false\n'
        f'[remotes.cache]\nurl = "file://{work}/cache"\n'
    )
    status, env = nixspool(daemon, config, "status")
    subprocess.run(status, env=env, check=True, capture_output=True)  # the first fan-out
    python = str(Path(lab.installed_program("nixspool-hook")).parent / "python3")
    hook_env = {
        "PATH": "/usr/bin:/bin",
        "NIXSPOOL_CONFIG": str(config),
        "DRV_PATH": f"/nix/store/{NIX_BASE32}-bench.drv",
    }
    samples: dict[str, list[float]] = {"hook": [], "bare": [], "status": []}
    for i in range(runs):
        hook_env["OUT_PATHS"] = fake_store_path(count + i)
        samples["bare"].append(timed([python, "-I", "-S", "-c", "pass"], hook_env))
        samples["hook"].append(timed([lab.installed_program("nixspool-hook")], hook_env))
        if i % 4 == 0:
            started = time.perf_counter()
            subprocess.run(status, env=env, check=True, capture_output=True)
            samples["status"].append(time.perf_counter() - started)
    result = {k: statistics.median(v) for k, v in samples.items()}
    flush, env = nixspool(daemon, config, "flush")
    proc = subprocess.Popen(flush, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.perf_counter()
    own = 0  # the flusher's own high-water mark (VmHWM), read until it exits
    while True:
        waited, _, usage = os.wait4(proc.pid, os.WNOHANG)
        if waited:
            break
        with contextlib.suppress(OSError):
            proc_status = Path(f"/proc/{proc.pid}/status").read_text()
            if "VmHWM:" in proc_status:  # not once it has exited (a zombie has none)
                own = max(own, int(proc_status.split("VmHWM:")[1].split()[0]))
        time.sleep(0.05)
    result["flush"] = time.perf_counter() - started
    result["flush_rss_mb"] = own / 1024
    # wait4's maximum also counts the children it reaped: the largest Nix it ran.
    result["flush_children_rss_mb"] = usage.ru_maxrss / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="0,10000,100000,1000000")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nixspool-bench-"))
    work.chmod(0o755)
    daemon = lab.NixDaemon(work / "nix", None)
    try:
        print(
            f"# {lab.sh('nix', '--version').stdout.strip()}, Python {sys.version.split()[0]}, "
            f"{os.cpu_count()} cores; medians of {args.runs} hook runs, "
            f"{(args.runs + 3) // 4} status runs per level"
        )
        first: dict[str, float] = {}
        for count in (int(n) for n in args.levels.split(",")):
            r = level(daemon, work / f"level-{count}", count, args.runs)
            first = first or r
            print(
                f"{count:>8} rows: hook {r['hook'] * 1000:6.2f} ms ({r['hook'] / r['bare']:.2f} x "
                f"bare start, {r['hook'] / first['hook']:.2f} x at {args.levels.split(',')[0]}), "
                f"status {r['status'] * 1000:7.0f} ms ({r['status'] / first['status']:.2f} x), "
                f"flush over all {r['flush']:6.1f} s, peak memory {r['flush_rss_mb']:4.0f} MB"
                f" (with the Nix it ran {r['flush_children_rss_mb']:4.0f} MB)"
            )
            shutil.rmtree(work / f"level-{count}", ignore_errors=True)
    finally:
        daemon.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
