"""Benchmark: nixspool flush against hand-written nix copies, as ratios from one run.

    python tests/lab/bench_flush.py [--derivations 375] [--big-mb 1.4] [--naive 500]
                                [--schemes ssh-ng,ssh] [--rounds 3] [--lan-rate none]

Run as root after `bash tests/run` (which installs the lab). It builds the
lab (a signing nix-daemon, a LAN host in a network namespace with sshd and a
chroot store, the key owner alice) and prints, for each URL scheme:
1. BIG paths (random bytes, shared closures, 500 paths over 500 MB): `nixspool
   flush` wall time / one raw `nix copy --to` of the same paths, run as alice;
   target <= 1.10;
2. TINY paths (500): the same ratio (target <= 1.5) and nixspool's fixed cost;
3. for both, one `nix copy` per path, as a naive post-build-hook does, / one
   raw copy, and / nixspool flush (--naive paths of each set; 0 skips it).
The LAN host's store is emptied between variants, and the order of flush and
raw copy alternates round by round, so both meet the same machine. The link
is the bare veth pair, or shaped with --lan-rate (e.g. 1gbit, like a real LAN).
Scale (0 to 1M rows) is bench_scale.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # programs
sys.path.insert(0, str(Path(__file__).parent))  # lab

import lab

H = "0123456789abcdfghijklmnpqrsvwxyz"


def raw_copy(the_lab: lab.SshLab, paths: list[str], scheme: str) -> float:
    env = the_lab.daemon.client_env()
    env.pop("NIX_REMOTE")
    argv = ["nix", "--extra-experimental-features", "nix-command", "copy"]
    argv += ["--to", f"{scheme}://{the_lab.hosts[0].alias}", *paths]
    started = time.perf_counter()
    result = lab.run_as(lab.ALICE, argv, env)
    took = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    return took


def naive_copies(the_lab: lab.SshLab, paths: list[str], scheme: str) -> float:
    return sum(raw_copy(the_lab, [p], scheme) for p in paths)


def flush(the_lab: lab.SshLab, work: Path, paths: list[str], scheme: str) -> float:
    shutil.rmtree(work, ignore_errors=True)
    url = f"{scheme}://{the_lab.hosts[0].alias}"
    config = the_lab.config(work, f'\n[remotes.pi]\nurl = "{url}"\n')
    the_lab.spool_in(config, set(paths))
    started = time.perf_counter()
    result = the_lab.nixspool(config, "flush")
    took = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    return took


def side_by_side(
    the_lab: lab.SshLab, work: Path, paths: list[str], scheme: str, rounds: int
) -> tuple[float, float]:
    """Median seconds of (nixspool flush, raw nix copy), alternating which goes first."""
    host = the_lab.hosts[0]
    host.wipe()
    raw_copy(the_lab, paths, scheme)  # warm-up, not counted: the first copy reads cold NARs
    flushes, raws = [], []
    for i in range(rounds):
        for variant in ("flush", "raw") if i % 2 == 0 else ("raw", "flush"):
            host.wipe()
            if variant == "flush":
                flushes.append(flush(the_lab, work, paths, scheme))
            else:
                raws.append(raw_copy(the_lab, paths, scheme))
        assert host.remote_valid(paths) == set(paths)
    return statistics.median(flushes), statistics.median(raws)


def compare(
    the_lab: lab.SshLab,
    work: Path,
    name: str,
    paths: list[str],
    scheme: str,
    args: argparse.Namespace,
) -> None:
    f, r = side_by_side(the_lab, work / f"{name}-{scheme}", paths, scheme, args.rounds)
    target = {"big": 1.05, "tiny": 1.15}[name]
    print(
        f"{scheme:<6} {name:<4} {len(paths)} paths: nixspool flush {f:6.2f} s, raw nix copy "
        f"{r:6.2f} s, ratio {f / r:.3f} (target <= {target}), fixed cost {f - r:.2f} s"
    )
    if not args.naive:
        return
    some = paths[: args.naive]
    the_lab.hosts[0].wipe()
    naive = naive_copies(the_lab, some, scheme)
    the_lab.hosts[0].wipe()
    one = raw_copy(the_lab, some, scheme)
    scaled = f * len(some) / len(paths)  # nixspool's time for this many, pro rata
    print(
        f"{scheme:<6} {name:<4} one nix copy per path ({len(some)} paths): {naive:6.2f} s "
        f"({naive / len(some):.3f} s per path): / one nix copy {naive / one:.1f}, "
        f"/ nixspool flush {naive / scaled:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 375 derivations of the lab's expression have exactly 500 outputs (every
    # third has two); at 1.4 MiB each that is over 500 MB.
    parser.add_argument("--derivations", type=int, default=375)
    parser.add_argument("--big-mb", type=float, default=1.4)
    parser.add_argument("--naive", type=int, default=500)
    parser.add_argument("--schemes", default="ssh-ng,ssh")
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
        big = sorted(the_lab.build(args.derivations, bytes_each=int(args.big_mb * (1 << 20))))
        tiny = sorted(the_lab.build(args.derivations))
        size = sum(int(lab.sh("du", "-sb", p).stdout.split()[0]) for p in big)
        print(
            f"# {nix_version}, Python {sys.version.split()[0]}, {os.cpu_count()} cores; "
            f"a LAN host in a network namespace, link {rate or 'unshaped (veth)'}; "
            f"big: {size / 1e6:.0f} MB in all; medians of {args.rounds} rounds"
        )
        for scheme in args.schemes.split(","):
            compare(the_lab, root, "big", big, scheme, args)
            compare(the_lab, root, "tiny", tiny, scheme, args)
    finally:
        the_lab.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
