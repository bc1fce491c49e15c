"""Benchmark: the compressions a cache nixspool writes may use, side by side on the
same NAR, in one run; which one a flush waits for least.

    python tests/lab/bench_compress.py [TREE ...] [--rates 20,100,1000] [--threads N]

For each TREE (default: /usr/bin and /usr/lib/python3/dist-packages, trees any
Debian has), its NAR is made once (nar.py), then compressed by each compression
nixspool offers (narinfo.compressor, the writer's own), interleaved, the median of
three runs each. Printed: time, size, throughput, and, for each link rate in
Mbit/s, the time a flush of that NAR takes when compressing and sending overlap:
the longer of the two. With --threads N, also N copies of the NAR compressed at
once, as the writer compresses several paths at once: the throughput in all.
A pure CPU benchmark: no network, no root needed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from nixspool import nar, narinfo

COMPRESSIONS = ("zstd", "xz", "none")


def compress(data: bytes, compression: str) -> tuple[float, int]:
    started = time.perf_counter()
    put, flush = narinfo.compressor(compression)
    size = sum(len(put(data[i : i + nar.CHUNK])) for i in range(0, len(data), nar.CHUNK))
    size += len(flush())
    return time.perf_counter() - started, size


def at_once(data: bytes, compression: str, threads: int) -> float:
    """Seconds to compress `threads` copies of `data`, each on a thread of its own."""
    with ThreadPoolExecutor(threads) as pool:
        started = time.perf_counter()
        list(pool.map(lambda _: compress(data, compression), range(threads)))
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="*", default=["/usr/bin", "/usr/lib/python3/dist-packages"])
    parser.add_argument("--rates", default="20,100,1000", help="link rates, Mbit/s")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="also N NARs at once")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    print(
        f"# Python {sys.version.split()[0]}, {len(os.sched_getaffinity(0))} cores; "
        f"medians of {args.runs} runs, compressions interleaved"
    )
    for tree in args.trees:
        data = b"".join(nar.dump(tree))
        times: dict[str, list[float]] = {c: [] for c in COMPRESSIONS}
        together: dict[str, list[float]] = {c: [] for c in COMPRESSIONS}
        sizes: dict[str, int] = {}
        for _ in range(args.runs):
            for compression in COMPRESSIONS:
                took, sizes[compression] = compress(data, compression)
                times[compression].append(took)
                if args.threads > 1:
                    together[compression].append(at_once(data, compression, args.threads))
        print(f"{tree}: NAR {len(data) / 1e6:.1f} MB")
        for compression in COMPRESSIONS:
            took = statistics.median(times[compression])
            size = sizes[compression]
            flushes = ", ".join(
                f"{rate:g} Mbit/s {max(took, size * 8 / (rate * 1e6)):.1f} s" for rate in rates
            )
            print(
                f"  {compression:<5} {took:7.2f} s  {size / 1e6:7.1f} MB ({size / len(data):.2f})"
                f"  {len(data) / 1e6 / took:7.0f} MB/s;  a flush at {flushes}"
            )
            if together[compression]:
                rate = args.threads * len(data) / 1e6 / statistics.median(together[compression])
                print(
                    f"  {compression:<5} {args.threads} NARs at once: {rate:7.1f} MB/s in all "
                    f"({rate * took / (len(data) / 1e6):.2f} x one at a time)"
                )


if __name__ == "__main__":
    main()
