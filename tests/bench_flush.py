"""Benchmark: nixspool flush against a hand-written nix copy, as ratios from one run.

    python tests/bench_flush.py [--derivations 375] [--big-mb 1.4] [--naive 50]
                                [--rows 100000] [--rounds 3]

Run as root after `bash tests/run` (which installs the lab). It builds the
lab (a signing nix-daemon, a LAN host in a network namespace with sshd and a
chroot store, the key owner alice) and prints:
1. BIG paths (random bytes, shared closures) to ssh-ng over the bare veth
   pair (or a link shaped with --lan-rate, e.g. 1gbit, like a real LAN): `nixspool flush` wall
   time / one raw `nix copy --to` of the same paths, run as alice; target <= 1.10;
2. TINY paths: the same ratio (target <= 1.5) and nixspool's fixed cost in s;
3. NAIVE: one `nix copy` per path, as a naive post-build-hook does, / one raw copy;
4. SCALE: `nixspool status` and claiming a batch at ROWS rows / at 100 rows,
   and the flusher's peak memory over ROWS rows.
The LAN host's store is emptied between variants, and the order of the
variants alternates round by round, so both meet the same machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lab
from nixspool.hook import rows
from nixspool.spool import Spool

H = "0123456789abcdfghijklmnpqrsvwxyz"


def raw_copy(the_lab: lab.SshLab, paths: list[str]) -> float:
    env = the_lab.daemon.client_env()
    env.pop("NIX_REMOTE")
    argv = [
        "nix",
        "--extra-experimental-features",
        "nix-command",
        "copy",
        "--to",
        f"ssh-ng://{the_lab.hosts[0].alias}",
        *paths,
    ]
    started = time.perf_counter()
    result = lab.run_as(lab.ALICE, argv, env)
    took = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    return took


def naive_copies(the_lab: lab.SshLab, paths: list[str]) -> float:
    return sum(raw_copy(the_lab, [p]) for p in paths)


def flush(the_lab: lab.SshLab, work: Path, paths: list[str]) -> float:
    shutil.rmtree(work, ignore_errors=True)
    config = the_lab.config(work, f'\n[remotes.pi]\nurl = "ssh-ng://{the_lab.hosts[0].alias}"\n')
    the_lab.spool_in(config, set(paths))
    started = time.perf_counter()
    result = the_lab.nixspool(config, "flush")
    took = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    return took


def side_by_side(
    the_lab: lab.SshLab, work: Path, paths: list[str], rounds: int
) -> tuple[float, float]:
    """Median seconds of (nixspool flush, raw nix copy), alternating which goes first."""
    host = the_lab.hosts[0]
    host.wipe()
    raw_copy(the_lab, paths)  # warm-up, not counted: the first copy reads cold NARs
    flushes, raws = [], []
    for i in range(rounds):
        for variant in ("flush", "raw") if i % 2 == 0 else ("raw", "flush"):
            host.wipe()
            if variant == "flush":
                flushes.append(flush(the_lab, work, paths))
            else:
                raws.append(raw_copy(the_lab, paths))
        assert host.remote_valid(paths) == set(paths)
    return statistics.median(flushes), statistics.median(raws)


def fake_store_path(i: int) -> str:
    """A well-formed store path that is not in the store."""
    digest = "".join(H[(i >> (5 * k)) & 31] for k in range(8)) + H[8:]
    return f"/nix/store/{digest}-bench-{i}"


def synthetic_spool(path: Path, count: int) -> None:
    shutil.rmtree(path.parent, ignore_errors=True)
    with Spool.open(str(path)) as s, s.transaction():
        outs = [fake_store_path(i) for i in range(count)]
        rows.store(s.conn, [rows.Record("", outs, [], time.time())])


def scale(the_lab: lab.SshLab, work: Path, rows: int) -> dict[str, float]:
    results: dict[str, float] = {}
    for n in (100, rows):
        spool_path = work / f"scale-{n}" / "spool" / "spool.sqlite"
        synthetic_spool(spool_path, n)
        config = work / f"scale-{n}" / "config.toml"
        config.write_text(
            f'spool = "{spool_path}"\nrun_as_root = true\ngc_roots = false\n'
            f'[remotes.cache]\nurl = "file://{work}/scale-cache"\n'
        )
        the_lab.nixspool(config, "status")  # fan out once, as the first command would
        status = [timed_status(the_lab, config) for _ in range(5)]
        results[f"status_{n}"] = statistics.median(status)
        with Spool.open(str(spool_path)) as s:
            claims = []
            for _ in range(5):
                started = time.perf_counter()
                batch = s.queue.claim("cache", "bench", 500, 60)
                claims.append(time.perf_counter() - started)
                s.queue.released("cache", "bench", [i for i, _ in batch])
        results[f"claim_{n}"] = statistics.median(claims)
        # The whole flush over n rows (their paths are not in the store: each is
        # marked failed), for its peak memory.
        env = {"PATH": os.environ["PATH"], **the_lab.daemon.client_env()}
        env.pop("NIX_REMOTE")
        proc = subprocess.Popen(
            [lab.installed_program("nixspool"), "--config", str(config), "flush"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started = time.perf_counter()
        _, _, usage = os.wait4(proc.pid, 0)
        results[f"flush_{n}"] = time.perf_counter() - started
        results[f"flush_rss_mb_{n}"] = usage.ru_maxrss / 1024
    return results


def timed_status(the_lab: lab.SshLab, config: Path) -> float:
    started = time.perf_counter()
    assert the_lab.nixspool(config, "status").returncode == 0
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 375 derivations of the lab's expression have exactly 500 outputs (every
    # third has two); at 1.4 MiB each that is over 500 MB.
    parser.add_argument("--derivations", type=int, default=375)
    parser.add_argument("--big-mb", type=float, default=1.4)
    parser.add_argument("--naive", type=int, default=50)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--lan-rate", default="none", help="shape the link to the LAN host (tc tbf), or 'none'"
    )
    args = parser.parse_args()
    lab.ensure_user(lab.BUILDER, groups=["nix-users"])
    root = Path(tempfile.mkdtemp(prefix="nixspool-bench-"))
    root.chmod(0o755)
    the_lab = lab.SshLab(root / "lab")
    try:
        rate = None if args.lan_rate == "none" else args.lan_rate
        the_lab.hosts[0].shape(rate)
        nix_version = lab.sh("nix", "--version").stdout.strip()
        print(
            f"# {nix_version}, Python {sys.version.split()[0]}, {os.cpu_count()} cores; "
            f"ssh-ng to a LAN host in a network namespace, link "
            f"{rate or 'unshaped (veth)'}; medians of {args.rounds} rounds"
        )
        big = sorted(the_lab.build(args.derivations, bytes_each=int(args.big_mb * (1 << 20))))
        size = sum(int(lab.sh("du", "-sb", p).stdout.split()[0]) for p in big)
        f, r = side_by_side(the_lab, root / "big", big, args.rounds)
        print(
            f"big:   {len(big)} paths, {size / 1e6:.0f} MB: nixspool flush {f:6.2f} s, "
            f"raw nix copy {r:6.2f} s, ratio {f / r:.3f} (target <= 1.10)"
        )
        tiny = sorted(the_lab.build(args.derivations))
        f, r = side_by_side(the_lab, root / "tiny", tiny, max(3, args.rounds))
        print(
            f"tiny:  {len(tiny)} paths: nixspool flush {f:6.2f} s, raw nix copy {r:6.2f} s, "
            f"ratio {f / r:.3f} (target <= 1.5), nixspool's fixed cost {f - r:.2f} s"
        )
        some = tiny[: args.naive]
        the_lab.hosts[0].wipe()
        naive = naive_copies(the_lab, some)
        the_lab.hosts[0].wipe()
        one = raw_copy(the_lab, some)
        print(
            f"naive: one nix copy per path for {len(some)} paths {naive:6.2f} s "
            f"({naive / len(some):.3f} s per path), one nix copy of them {one:.2f} s, "
            f"ratio {naive / one:.1f}"
        )
        sc = scale(the_lab, root / "scale", args.rows)
        print(
            f"scale: nixspool status {sc['status_100'] * 1000:.0f} ms at 100 rows, "
            f"{sc[f'status_{args.rows}'] * 1000:.0f} ms at {args.rows}: ratio "
            f"{sc[f'status_{args.rows}'] / sc['status_100']:.2f}"
        )
        print(
            f"scale: claiming a batch of 500 {sc['claim_100'] * 1000:.1f} ms at 100 rows, "
            f"{sc[f'claim_{args.rows}'] * 1000:.1f} ms at {args.rows}: ratio "
            f"{sc[f'claim_{args.rows}'] / sc['claim_100']:.2f}"
        )
        print(
            f"scale: a flush over {args.rows} rows took {sc[f'flush_{args.rows}']:.1f} s, "
            f"peak memory {sc[f'flush_rss_mb_{args.rows}']:.0f} MB "
            f"({sc['flush_rss_mb_100']:.0f} MB at 100 rows)"
        )
    finally:
        the_lab.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
