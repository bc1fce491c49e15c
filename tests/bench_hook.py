"""Benchmark: what nixspool-hook costs a build, as ratios measured in one run.

    python tests/bench_hook.py [--runs 200] [--derivations 200] [--rounds 3]

Run as root with the lab installed (`bash tests/run` installs it). Prints:
1. the hook's median wall time / a bare start of the same interpreter
   (`python -I -S -c pass`); target <= 1.8;
2. one nix-build of N trivial derivations through a real nix-daemon with
   nixspool-hook as the post-build-hook / the same with a do-nothing Python
   hook (`#!python -IS`, empty body); target <= 1.15; and / `/bin/true`,
   for information.
Variants are interleaved round by round, so a noisy neighbour hits them
all alike. This is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lab
from nixspool.spool import Spool

H = "0123456789abcdfghijklmnpqrsvwxyz"


def timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def hook_vs_bare_start(work: Path, runs: int) -> dict[str, float]:
    hook = lab.installed_program("nixspool-hook")
    python = str(Path(hook).parent / "python3")
    spool = work / "spool" / "spool.sqlite"
    Spool.open(str(spool)).close()
    (work / "config.toml").write_text(f'spool = "{spool}"\n')
    env = {
        "PATH": "/usr/bin:/bin",
        "NIXSPOOL_CONFIG": str(work / "config.toml"),
        "DRV_PATH": f"/nix/store/{H}-bench.drv",
    }
    site_hook = [python, "-c", "from nixspool.hook.main import main; main()"]
    samples: dict[str, list[float]] = {"bare": [], "hook": [], "hook_with_site": []}
    for i in range(runs):
        env["OUT_PATHS"] = f"/nix/store/{H[:26]}{i:06d}-bench"
        samples["bare"].append(timed([python, "-I", "-S", "-c", "pass"], env))
        samples["hook"].append(timed([hook], env))
        env["OUT_PATHS"] = f"/nix/store/{H[:26]}{i:06d}-bench-site"
        samples["hook_with_site"].append(timed(site_hook, env))
    return {k: statistics.median(v) for k, v in samples.items()}


def build_with_hooks(work: Path, derivations: int, rounds: int) -> dict[str, float]:
    hook = lab.installed_program("nixspool-hook")
    python = str(Path(hook).parent / "python3")
    empty = work / "empty-hook"
    empty.write_text(f"#!{python} -IS\n")
    empty.chmod(0o755)
    spool = work / "build-spool" / "spool.sqlite"
    Spool.open(str(spool)).close()
    config = work / "build-config.toml"
    config.write_text(f'spool = "{spool}"\n')
    expr = lab.write_expr(work)
    hooks = {"nixspool-hook": hook, "empty python -IS": str(empty), "/bin/true": "/bin/true"}
    samples: dict[str, list[float]] = {name: [] for name in hooks}
    for _ in range(rounds):
        for name, program in hooks.items():
            daemon = lab.NixDaemon(
                work / f"nix-{len(samples[name])}-{name[:5]}",
                program,
                env={"NIXSPOOL_CONFIG": str(config)},
            )
            try:
                args = {"nonce": lab.nonce(), "count": str(derivations)}
                lab.run_as(
                    lab.BUILDER,
                    [
                        "nix-instantiate",
                        str(expr),
                        "--argstr",
                        "nonce",
                        args["nonce"],
                        "--argstr",
                        "count",
                        args["count"],
                    ],
                    daemon.client_env(),
                )  # evaluation is not what we measure
                started = time.perf_counter()
                daemon.build(expr, args)
                samples[name].append(time.perf_counter() - started)
            finally:
                daemon.stop()
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--derivations", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    lab.ensure_user(lab.BUILDER, groups=["nix-users"])
    nix_version = subprocess.run(["nix", "--version"], capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory(prefix="nixspool-bench-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        start = hook_vs_bare_start(work, args.runs)
        print(
            f"# {nix_version.strip()}, Python {sys.version.split()[0]}, "
            f"{os.cpu_count()} cores; medians of {args.runs} runs"
        )
        print(f"bare interpreter start (python -I -S -c pass): {start['bare'] * 1000:7.2f} ms")
        print(
            f"nixspool-hook:                                 {start['hook'] * 1000:7.2f} ms"
            f"  ratio {start['hook'] / start['bare']:.2f}  (target <= 1.8)"
        )
        print(
            f"the same as a default console script (site):  "
            f"{start['hook_with_site'] * 1000:7.2f} ms"
            f"  ratio {start['hook_with_site'] / start['bare']:.2f}  (for information)"
        )
        build = build_with_hooks(work, args.derivations, args.rounds)
        base = build["empty python -IS"]
        print(
            f"# one nix-build of {args.derivations} derivations through nix-daemon, "
            f"median of {args.rounds} rounds"
        )
        for name, seconds in build.items():
            print(f"post-build-hook = {name:<18} {seconds:7.2f} s")
        print(
            f"ratio nixspool-hook / empty python hook: {build['nixspool-hook'] / base:.3f}"
            "  (target <= 1.15)"
        )
        print(
            f"ratio nixspool-hook / /bin/true:         "
            f"{build['nixspool-hook'] / build['/bin/true']:.3f}  (for information)"
        )


if __name__ == "__main__":
    main()
