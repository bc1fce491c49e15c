"""Benchmark: the fixed cost of a flush with nothing due, against Python's start.

    python tests/lab/bench_idle.py [--runs 21]

A systemd timer starts `nixspool flush` every few minutes and NetworkManager at
every network change; most of those flushes find nothing due, so their cost is
the program's start: the interpreter, the imports, the config, the spool. This
runs the installed `nixspool flush` against a spool with one remote (file://,
nothing queued) and `python -c pass` of the same interpreter, interleaved, and
prints the medians and the fixed cost (flush - bare start). Target: < 150 ms.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # programs

from programs import installed_program


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, capture_output=True, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    nixspool = installed_program("nixspool")
    python = str(Path(nixspool).parent / "python3")
    with tempfile.TemporaryDirectory() as work:
        config = Path(work) / "config.toml"
        config.write_text(
            f'spool = "{work}/spool/spool.sqlite"\nrun_as_root = true\n'
            f'[remotes.cache]\nurl = "file://{work}/cache"\n'
        )
        flush = [nixspool, "--config", str(config), "flush"]
        subprocess.run(flush, capture_output=True, check=True)  # the spool, made once
        samples: dict[str, list[float]] = {"flush": [], "bare": []}
        for _ in range(args.runs):
            samples["flush"].append(timed(flush))
            samples["bare"].append(timed([python, "-c", "pass"]))
    flushed, bare = (statistics.median(samples[k]) for k in ("flush", "bare"))
    print(f"# Python {sys.version.split()[0]}; medians of {args.runs} runs, interleaved")
    print(f"python -c pass:               {bare * 1000:6.0f} ms")
    print(f"nixspool flush, nothing due:  {flushed * 1000:6.0f} ms")
    print(f"fixed cost of a flush: {(flushed - bare) * 1000:.0f} ms (target < 150)")


if __name__ == "__main__":
    main()
