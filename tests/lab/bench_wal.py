"""Benchmark: the hook's cost after many builds with no `nixspool` command between.

    python tests/lab/bench_wal.py [--levels 0,1000,10000] [--runs 40]

A laptop offline for a week builds thousands of times and never flushes. Each
hook is the spool's only connection and exits without closing it, so nothing
else ever restarts SQLite's WAL; before the hook bounded it, the WAL grew with
every build and so did every hook's time (3.3x after 3000 builds). This runs
the installed hook, as Nix would, until the spool holds each level's number of
builds, and at each level measures it interleaved with a bare interpreter
start. Prints the WAL's size and the hook's median time at each level, and the
ratios to level 0 (target: flat, <= 1.2 at 10,000). Run as root after
`bash tests/run`. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # programs
sys.path.insert(0, str(Path(__file__).parent))  # lab

import lab
from bench_hook import timed
from nixspool.hook.storepath import NIX_BASE32
from nixspool.spool import Spool


def store_path(i: int, name: str) -> str:
    digits = []
    for _ in range(8):
        i, r = divmod(i, 32)
        digits.append(NIX_BASE32[r])
    return f"/nix/store/{''.join(digits)}{NIX_BASE32[7] * 24}-{name}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="0,1000,10000")
    parser.add_argument("--runs", type=int, default=40, help="timed hook runs per level")
    args = parser.parse_args()
    levels = [int(n) for n in args.levels.split(",")]

    hook = lab.installed_program("nixspool-hook")
    python = str(Path(hook).parent / "python3")
    work = Path(tempfile.mkdtemp(prefix="nixspool-bench-wal-"))
    spool = work / "spool" / "spool.sqlite"
    Spool.open(str(spool)).close()
    (work / "config.toml").write_text(f'spool = "{spool}"\n')
    base = {"PATH": "/usr/bin:/bin", "NIXSPOOL_CONFIG": str(work / "config.toml")}

    def build(i: int) -> float:
        # A derivation with two outputs, as the suite's test derivations have.
        drv, out = store_path(i, "bench.drv"), store_path(i, "bench")
        env = {**base, "DRV_PATH": drv, "OUT_PATHS": f"{out} {out}-dev"}
        return timed([hook], env)

    def wal_bytes() -> int:
        wal = Path(str(spool) + "-wal")
        return wal.stat().st_size if wal.exists() else 0

    print(
        f"# {lab.sh('nix', '--version').stdout.strip()}, {sys.version.split()[0]}, "
        f"{os.cpu_count()} cores; medians of {args.runs} hook runs per level"
    )
    done = 0
    results: dict[int, float] = {}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for level in levels:
            list(pool.map(build, range(done, level)))  # builds between levels, untimed
            done = max(done, level)
            hook_times, bare_times = [], []
            for i in range(args.runs):
                bare_times.append(timed([python, "-I", "-S", "-c", "pass"], base))
                hook_times.append(build(10_000_000 + level * args.runs + i))
            results[level] = statistics.median(hook_times)
            bare = statistics.median(bare_times)
            print(
                f"after {level:>6} builds: WAL {wal_bytes() / 1024:8.0f} KiB, "
                f"hook {results[level] * 1000:6.2f} ms, bare start {bare * 1000:6.2f} ms, "
                f"hook/bare {results[level] / bare:.2f}, "
                f"hook / hook at {levels[0]}: {results[level] / results[levels[0]]:.2f}"
            )


if __name__ == "__main__":
    main()
