"""Benchmark: a flush to a static cache over SFTP against what people do without
nixspool, as ratios from one run.

    python tests/lab/bench_static.py [--tiny 200] [--big 20] [--big-mb 2] [--rounds 3]
                                 [--lan-rate 1gbit] [--compression xz|zstd|none]

Run as root after `bash tests/run` (which installs the lab). The LAN host serves
an empty directory to an SFTP-only account (no Nix there), and each variant
fills it from nothing, as alice, compressed alike (xz unless --compression):
- nixspool: `nixspool flush` to sftp://... (NARs made, compressed and uploaded
  by nixspool, signed);
- staged: `nix copy --to file:///staging` of the same paths, then `scp -r` of
  the staging directory to the host: Nix's own writer, then one bulk transfer
  (sshfs, the other usual way, needs FUSE, which this lab does not assume).
The directory is emptied between variants, and the order alternates round by
round, so both meet the same machine. Printed: medians, and nixspool/staged; with
--lan-rate, also the link's own floor (the NAR bytes nixspool sent, at that rate)
and the flush's ratio to it, and to the floor plus one SSH login to the host
(measured in the same rounds), which any upload there pays first; and to an
`scp` of one file of those bytes, login included: what the link really carries,
its headers and SSH's framing counted, with nothing made or compressed first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # programs
sys.path.insert(0, str(Path(__file__).parent))  # lab

import lab


def nixspool(
    the_lab: lab.SshLab, work: Path, url: str, paths: set[str], compression: str
) -> tuple[float, int]:
    """`nixspool flush` of `paths` to `url` from a new spool, signed: its seconds, and
    the compressed NAR bytes it sent."""
    shutil.rmtree(work, ignore_errors=True)
    body = (
        f'[remotes.pi]\nurl = "{url}"\nsign_key_file = "{the_lab.nixspool_key}"\n'
        f'compression = "{compression}"\n'
    )
    config = the_lab.config(work, body)
    the_lab.spool_in(config, paths)
    started = time.perf_counter()
    result = the_lab.nixspool(config, "flush", "--json")
    took = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    (report,) = json.loads(result.stdout)["remotes"].values()
    return took, int(report["uploaded_bytes"])


def rate_bits(rate: str) -> float:
    """tc's rate ("20mbit", "1gbit") in bits per second."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1.0}
    for unit, factor in units.items():
        if rate.lower().endswith(unit):
            return float(rate[: -len(unit)]) * factor
    raise ValueError(rate)


def copy_to_staging(the_lab: lab.SshLab, staging: Path, paths: set[str], compression: str) -> None:
    """Nix's own writer: `nix copy --to file:///staging` as alice (the clock runs)."""
    env = the_lab.daemon.client_env()
    env.pop("NIX_REMOTE")
    copy = ["nix", "--extra-experimental-features", "nix-command", "copy"]
    result = lab.run_as(
        lab.ALICE,
        [*copy, "--to", f"file://{staging}?compression={compression}", *sorted(paths)],
        env,
    )
    assert result.returncode == 0, result.stderr


def empty_staging(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    lab.sh("chown", lab.ALICE, str(staging))


def staged(
    the_lab: lab.SshLab,
    staging: Path,
    host: lab.LanHost,
    cache: Path,
    paths: set[str],
    compression: str,
) -> float:
    empty_staging(staging)
    scp = ["scp", "-q", "-r", "-o", "BatchMode=yes"]
    started = time.perf_counter()
    copy_to_staging(the_lab, staging, paths, compression)
    target = f"{host.sftp_user}@{host.alias}:{cache}/"
    names = [str(p) for p in staging.iterdir()]
    result = lab.run_as(lab.ALICE, [*scp, *names, target], {})
    took = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    return took


def one_file(the_lab: lab.SshLab, root: Path, size: int, rounds: int) -> float:
    """Median seconds of `scp` of one file of `size` random bytes to the host, as
    alice, login included: what the link really carries per byte (TCP, IP and
    Ethernet headers, SSH's framing), with nothing made or compressed first."""
    host = the_lab.hosts[0]
    staging = root / "one-file"
    empty_staging(staging)
    blob = staging / "blob"
    blob.write_bytes(os.urandom(size))
    blob.chmod(0o644)
    times = []
    for _ in range(rounds):
        cache = host.serve_sftp(the_lab.alice.public_key, name="bench-cache")
        scp = ["scp", "-q", "-o", "BatchMode=yes", str(blob)]
        started = time.perf_counter()
        result = lab.run_as(lab.ALICE, [*scp, f"{host.sftp_user}@{host.alias}:{cache}/"], {})
        times.append(time.perf_counter() - started)
        assert result.returncode == 0, result.stderr
    return statistics.median(times)


def login(host: lab.LanHost) -> float:
    """One SSH login to the host's SFTP account as alice, and nothing sent: what
    any upload there pays before its first byte (scp's too)."""
    ssh = ["ssh", "-o", "BatchMode=yes", "-s", f"{host.sftp_user}@{host.alias}", "sftp"]
    started = time.perf_counter()
    result = lab.run_as(lab.ALICE, ssh, {}, stdin=subprocess.DEVNULL)
    took = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    return took


def side_by_side(
    the_lab: lab.SshLab, root: Path, paths: set[str], rounds: int, compression: str
) -> tuple[float, float, int, float]:
    """Medians of nixspool's flush and the staged copy, the NAR bytes nixspool sent,
    and the median of an SSH login measured in the same rounds."""
    host = the_lab.hosts[0]
    ours, theirs, logins, sent = [], [], [], 0
    for round_ in range(rounds):
        variants = ["nixspool", "staged"] if round_ % 2 == 0 else ["staged", "nixspool"]
        for variant in variants:
            cache = host.serve_sftp(the_lab.alice.public_key, name="bench-cache")
            logins.append(login(host))
            if variant == "nixspool":
                url = host.sftp_url(cache)
                took, sent = nixspool(the_lab, root / "work", url, paths, compression)
                ours.append(took)
            else:
                theirs.append(staged(the_lab, root / "staging", host, cache, paths, compression))
            assert len(list(cache.glob("*.narinfo"))) == len(paths), variant
    return statistics.median(ours), statistics.median(theirs), sent, statistics.median(logins)


def arguments(description: str, compression: str) -> argparse.Namespace:
    """The options every cache benchmark takes (bench_static, bench_s3)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tiny", type=int, default=200, help="paths of a few bytes")
    parser.add_argument("--big", type=int, default=20, help="paths of --big-mb random bytes")
    parser.add_argument("--big-mb", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lan-rate", help="shape the link to the host, e.g. 1gbit")
    parser.add_argument("--compression", default=compression, choices=["xz", "zstd", "none"])
    return parser.parse_args()


def header(args: argparse.Namespace, where: str) -> str:
    link = f" at {args.lan_rate}" if args.lan_rate else ""
    return (
        f"# {lab.nix_version()}, Python {sys.version.split()[0]}, "
        f"{len(os.sched_getaffinity(0))} cores; {where} in a network "
        f"namespace{link}; {args.compression}; medians of {args.rounds} rounds"
    )


def path_sets(the_lab: lab.SshLab, args: argparse.Namespace) -> Iterator[tuple[str, set[str]]]:
    """("tiny", its paths), then ("big", ...), built as the options say."""
    for label, count, size in (
        ("tiny", args.tiny, 0),
        ("big", args.big, int(args.big_mb * (1 << 20))),
    ):
        yield label, the_lab.build(count, bytes_each=size)


def main() -> None:
    args = arguments(__doc__.split("\n\n")[0], "xz")
    lab.require_lab("sshd", "ip", "ssh-keygen", "scp")
    lab.ensure_user(lab.BUILDER, groups=["nix-users"])
    root = Path(tempfile.mkdtemp(prefix="nixspool-bench-static-"))
    root.chmod(0o755)
    the_lab = lab.SshLab(root / "ssh")
    try:
        the_lab.hosts[0].shape(args.lan_rate)
        print(header(args, "SFTP to a LAN host"))
        for label, paths in path_sets(the_lab, args):
            ours, theirs, sent, ssh = side_by_side(
                the_lab, root, paths, args.rounds, args.compression
            )
            print(
                f"{label}: {len(paths)} paths: nixspool flush {ours:6.2f} s, "
                f"nix copy to file:// + scp -r {theirs:6.2f} s, ratio {ours / theirs:.2f}"
            )
            if args.lan_rate and label == "big":  # the link's floor: the NAR bytes at its rate
                floor = sent * 8 / rate_bits(args.lan_rate)
                print(
                    f"{label}: {sent / 1e6:.1f} MB of NARs at {args.lan_rate}: floor "
                    f"{floor:.2f} s, nixspool flush / floor {ours / floor:.2f}; "
                    f"with one SSH login ({ssh:.2f} s) {ours / (floor + ssh):.2f}"
                )
                scp = one_file(the_lab, root, sent, args.rounds)
                print(
                    f"{label}: scp of one file of those {sent / 1e6:.1f} MB, login included: "
                    f"{scp:.2f} s ({scp / floor:.2f} x floor), nixspool flush / this "
                    f"{ours / scp:.2f}"
                )
    finally:
        the_lab.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
