"""Benchmark: what nixspool-hook costs a build, as ratios measured in one run.

    python tests/lab/bench_hook.py [--runs 200] [--derivations 200] [--rounds 3]
                               [--concurrent 64] [--down-derivations 3]

Run as root with the lab installed (`bash tests/run` installs it).
nixspool-hook is the file `nixspool setup` leaves (its Python in the #! line);
pip's launcher, which runs /bin/sh first, is measured beside it. Prints:
1. the hook's median wall time / a bare start of the same interpreter
   (`python -I -S -c pass`); target <= 1.8; and / its floor in this design: the
   same interpreter start, `import _sqlite3`, one connect and one INSERT into
   a WAL spool, as a stand-alone script (what any hook that records in SQLite
   must do), so that what is above the floor is nixspool's own;
2. CONCURRENT hooks (64 at once, as Nix 2.35 and Lix run them up to max-jobs):
   the median and p99 of one hook's time / a lone hook's median, beside the
   same for 64 bare interpreter starts at once (what sharing 2 cores costs
   anyway); every record must be in the spool afterwards;
3. one nix-build of N trivial derivations through a real nix-daemon with
   nixspool-hook as the post-build-hook / the same with a do-nothing Python
   hook (`#!python -IS`, empty body); target <= 1.15; the milliseconds each
   build gains over that, beside what the floor of 1. gains as the hook;
   / `/bin/true`; and the Nix manual's synchronous hook (`nix copy --to
   ssh-ng://LAN host $OUT_PATHS` inside the hook) / nixspool-hook, with the
   LAN host there;
4. inside the daemon, each hook's own time (a shell around it times it), which
   a build's time, varying by more, hides: nixspool-hook, its floor, the
   empty Python hook, a build of N derivations each;
5. the same with the LAN host's link down: nixspool-hook's build as before,
   and the manual's hook on a few derivations only (each hook waits for ssh to
   give up, then fails, and its build with it), bounded by --down-timeout.
Variants are interleaved round by round, so a noisy neighbour hits them
all alike. This is a benchmark, not a test: it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # programs
sys.path.insert(0, str(Path(__file__).parent))  # lab

import lab
from nixspool import setup
from nixspool.hook import rows
from nixspool.spool import Spool

H = "0123456789abcdfghijklmnpqrsvwxyz"

# The Nix manual's example post-build-hook ("Using the post-build-hook"), aimed at
# the lab's LAN host; run as alice, whose SSH key it is, as nixspool would run it.
MANUAL_HOOK = """\
#!/bin/sh
set -eu
set -f # disable globbing
export IFS=' '
echo "Uploading paths" $OUT_PATHS
exec {runuser} -u {user} -- {nix} copy --to "ssh-ng://{alias}" $OUT_PATHS
"""


def timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def hook_env(work: Path, name: str) -> dict[str, str]:
    """The hook's environment, with a config pointing at a fresh spool `name`, and
    FLOOR_SPOOL, another for the floor (WAL, the schema: as the hook finds one)."""
    spool, floor = work / name / "spool.sqlite", work / f"floor-{name}" / "spool.sqlite"
    for each in (spool, floor):
        Spool.open(str(each)).close()
    config = work / f"{name}.toml"
    config.write_text(f'spool = "{spool}"\n')
    return {
        "PATH": "/usr/bin:/bin",
        "NIXSPOOL_CONFIG": str(config),
        "FLOOR_SPOOL": str(floor),
        "DRV_PATH": f"/nix/store/{H}-bench.drv",
    }


def out_path(i: int, name: str = "bench") -> str:
    return f"/nix/store/{H[:24]}{i:08d}-{name}"


# The floor: what any hook recording in a SQLite spool must do, nothing else; it
# exits without closing the database, as the hook does (a close checkpoints the WAL).
FLOOR = (
    "import _sqlite3, os\n"
    "c = _sqlite3.connect(os.environ['FLOOR_SPOOL'], timeout=2, isolation_level=None)\n"
    "e = os.environ\n"
    f"c.execute({rows.INSERT_PATH!r}, (e.get('OUT_PATHS', ''), e.get('DRV_PATH', ''), 0, 0))\n"
    "os._exit(0)\n"
)


def installed_python() -> str:
    """The interpreter nixspool-hook runs with: the venv's, beside it."""
    return str(Path(lab.installed_program("nixspool-hook")).parent / "python3")


def set_up_hook(work: Path) -> str:
    """nixspool-hook as `nixspool setup` leaves it on a machine, its Python in the
    #! line and no /bin/sh in front: setup's own rendering of the installed hook,
    written here, so the benchmark leaves the installation as it is."""
    path = work / "nixspool-hook"
    if not path.exists():
        content = setup.direct_hook(lab.installed_program("nixspool-hook"))
        assert content is not None, "the lab's venv path cannot be a #! line"
        path.write_text(content)
        path.chmod(0o755)
    return str(path)


def hook_vs_bare_start(work: Path, runs: int) -> dict[str, list[float]]:
    hook, launcher = set_up_hook(work), lab.installed_program("nixspool-hook")
    python = installed_python()
    env = hook_env(work, "spool")
    site_hook = [python, "-c", "from nixspool.hook.main import main; main()"]
    samples: dict[str, list[float]] = {
        "bare": [],
        "hook": [],
        "hook_with_site": [],
        "floor": [],
        "pip_launcher": [],
    }
    for i in range(runs):
        env["OUT_PATHS"] = out_path(i)
        samples["bare"].append(timed([python, "-I", "-S", "-c", "pass"], env))
        samples["floor"].append(timed([python, "-I", "-S", "-c", FLOOR], env))
        samples["hook"].append(timed([hook], env))
        env["OUT_PATHS"] = out_path(i, "bench-launcher")
        samples["pip_launcher"].append(timed([launcher], env))
        env["OUT_PATHS"] = out_path(i, "bench-site")
        samples["hook_with_site"].append(timed(site_hook, env))
    return samples


def all_at_once(argv: list[str], env: dict[str, str], n: int, first: int) -> list[float]:
    """Start `n` processes at the same instant; each one's wall time."""
    times: list[float] = []
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        own = {**env, "OUT_PATHS": out_path(first + i, "bench-concurrent")}
        barrier.wait()
        times.append(timed(argv, own))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return times


def concurrent_hooks(work: Path, n: int, rounds: int) -> dict[str, list[float]]:
    hook, python = set_up_hook(work), installed_python()
    env = hook_env(work, "concurrent")
    samples: dict[str, list[float]] = {"hook": [], "bare": []}
    for r in range(rounds):
        samples["hook"] += all_at_once([hook], env, n, r * n)
        samples["bare"] += all_at_once([python, "-I", "-S", "-c", "pass"], env, n, 0)
    with sqlite3.connect(work / "concurrent" / "spool.sqlite") as db:
        recorded = db.execute("SELECT count(*) FROM paths").fetchone()[0]
    assert recorded == n * rounds, f"{recorded} of {n * rounds} concurrent hooks recorded"
    return samples


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98]


def build_once(
    work: Path, name: str, program: str, env: dict[str, str], count: int, timeout: float
) -> tuple[float, str]:
    """(seconds, "" or why it failed) for one nix-build of `count` fresh derivations
    through a nix-daemon whose post-build-hook is `program`. Every daemon signs what
    it builds with the lab's key, which the LAN host trusts, as a cache's users do."""
    daemon = lab.NixDaemon(
        work / f"nix-{name}-{lab.nonce()}",
        program,
        env=env,
        extra_conf=f"secret-key-files = {work / 'lab' / 'nixspool-lab.sec'}\n",
    )
    try:
        expr = lab.write_expr(work)
        args = {"nonce": lab.nonce(), "count": str(count)}
        argv = ["nix-instantiate", str(expr), "--argstr", "nonce", args["nonce"]]
        argv += ["--argstr", "count", args["count"]]
        lab.run_as(lab.BUILDER, argv, daemon.client_env())  # evaluation is not measured
        started = time.perf_counter()
        try:
            result = daemon.build(expr, args, check=False, timeout=timeout)
        except subprocess.TimeoutExpired:
            return time.perf_counter() - started, f"still building after {timeout:.0f} s"
        took = time.perf_counter() - started
        if result.returncode == 0:
            return took, ""
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        return took, " / ".join(lines[-3:])
    finally:
        daemon.stop()


def build_with_hooks(work: Path, derivations: int, rounds: int) -> dict[str, list[float]]:
    hooks = {
        "nixspool-hook": set_up_hook(work),
        "empty python -IS": str(work / "empty-hook"),
        "its floor": str(work / "floor-hook"),
        "/bin/true": "/bin/true",
        "nix copy (manual)": str(work / "manual-hook"),
    }
    if not lab.hook_gets_out_paths():  # Nix 2.8.0: the manual's hook has nothing to copy
        del hooks["nix copy (manual)"]
    env = hook_env(work, "build-spool")
    samples: dict[str, list[float]] = {name: [] for name in hooks}
    for _ in range(rounds):
        for name, program in hooks.items():
            took, failed = build_once(work, name[:5], program, env, derivations, 3600)
            assert not failed, f"{name}: {failed}"
            samples[name].append(took)
    return samples


# Around a hook inside the daemon: its own wall time, in nanoseconds, to a file.
TIMED = """\
#!/bin/sh
started=$(date +%s%N)
{program}
code=$?
echo $(( $(date +%s%N) - started )) >> {times}
exit $code
"""


def inside_the_daemon(work: Path, derivations: int) -> dict[str, list[float]]:
    """Each hook's own time as the daemon runs it after each build (a build's
    time varies too much to show a millisecond): a build of `derivations` each,
    the hook wrapped in a shell that times it (the same wrapper for all)."""
    hooks = {
        "nixspool-hook": set_up_hook(work),
        "pip's launcher": lab.installed_program("nixspool-hook"),
        "its floor": str(work / "floor-hook"),
        "empty python -IS": str(work / "empty-hook"),
    }
    env = hook_env(work, "timed-spool")
    samples = {}
    for i, (name, program) in enumerate(hooks.items()):
        times, wrapper = work / f"times-{i}", work / f"timed-hook-{i}"
        wrapper.write_text(TIMED.format(program=program, times=times))
        wrapper.chmod(0o755)
        _, failed = build_once(work, f"timed{i}", str(wrapper), env, derivations, 3600)
        assert not failed, f"{name}: {failed}"
        samples[name] = [int(ns) / 1e9 for ns in times.read_text().split()]
    return samples


def write_hooks(the_lab: lab.SshLab, work: Path) -> None:
    python = installed_python()
    (work / "empty-hook").write_text(f"#!{python} -IS\n")
    (work / "floor-hook").write_text(f"#!{python} -IS\n{FLOOR}")
    manual = MANUAL_HOOK.format(
        runuser=shutil.which("runuser"),
        user=lab.ALICE,
        nix=shutil.which("nix"),
        alias=the_lab.hosts[0].alias,
    )
    (work / "manual-hook").write_text(manual)
    for name in ("empty-hook", "floor-hook", "manual-hook"):
        (work / name).chmod(0o755)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--derivations", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=64)
    parser.add_argument("--concurrent-rounds", type=int, default=10)
    parser.add_argument("--down-derivations", type=int, default=3)
    parser.add_argument("--down-timeout", type=float, default=900)
    args = parser.parse_args()
    lab.ensure_user(lab.BUILDER, groups=["nix-users"])
    nix_version = subprocess.run(["nix", "--version"], capture_output=True, text=True).stdout
    work = Path(tempfile.mkdtemp(prefix="nixspool-bench-"))
    work.chmod(0o755)
    the_lab = lab.SshLab(work / "lab")
    try:
        report(the_lab, work, args, nix_version.strip())
    finally:
        the_lab.close()
        shutil.rmtree(work, ignore_errors=True)


def report(the_lab: lab.SshLab, work: Path, args: argparse.Namespace, nix_version: str) -> None:
    med = statistics.median
    start = hook_vs_bare_start(work, args.runs)
    bare, hook = med(start["bare"]), med(start["hook"])
    print(
        f"# {nix_version}, Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} cores; medians of {args.runs} runs"
    )
    print(f"bare interpreter start (python -I -S -c pass): {bare * 1000:7.2f} ms")
    print(
        f"nixspool-hook:                                 {hook * 1000:7.2f} ms"
        f"  ratio {hook / bare:.2f}  (target <= 1.8)"
    )
    floor = med(start["floor"])
    print(
        f"its floor (start, _sqlite3, connect, INSERT):  {floor * 1000:7.2f} ms"
        f"  ratio hook / floor {hook / floor:.2f}, floor / bare start {floor / bare:.2f}"
    )
    launcher = med(start["pip_launcher"])
    print(
        f"pip's launcher, before setup (/bin/sh first): {launcher * 1000:7.2f} ms"
        f"  ratio this / hook {launcher / hook:.2f}"
    )
    site = med(start["hook_with_site"])
    print(
        f"the same as a default console script (site):  {site * 1000:7.2f} ms"
        f"  ratio {site / bare:.2f}  (for information)"
    )

    n = args.concurrent
    together = concurrent_hooks(work, n, args.concurrent_rounds)
    print(
        f"# {n} hooks at once, {args.concurrent_rounds} rounds "
        f"({n * args.concurrent_rounds} hooks, every one recorded)"
    )
    for name, lone in (("nixspool-hook", hook), ("bare start", bare)):
        runs = together["hook" if name == "nixspool-hook" else "bare"]
        print(
            f"{name:<14} median {med(runs) * 1000:7.1f} ms ({med(runs) / lone:5.1f} x alone), "
            f"p99 {p99(runs) * 1000:7.1f} ms ({p99(runs) / lone:5.1f} x alone)"
        )
    print(
        f"ratio hook / bare start, both {n} at once: median "
        f"{med(together['hook']) / med(together['bare']):.2f}, p99 "
        f"{p99(together['hook']) / p99(together['bare']):.2f}  (alone: {hook / bare:.2f})"
    )

    write_hooks(the_lab, work)
    build = {k: med(v) for k, v in build_with_hooks(work, args.derivations, args.rounds).items()}
    print(
        f"# one nix-build of {args.derivations} derivations through nix-daemon, "
        f"median of {args.rounds} rounds, LAN host up"
    )
    for name, seconds in build.items():
        print(f"post-build-hook = {name:<18} {seconds:7.2f} s")
    ours = build["nixspool-hook"]
    print(
        f"ratio nixspool-hook / empty python hook: {ours / build['empty python -IS']:.3f}"
        "  (target <= 1.15)"
    )
    empty = build["empty python -IS"]
    per_build = (ours - empty) / args.derivations * 1000
    floor_per_build = (build["its floor"] - empty) / args.derivations * 1000
    print(
        f"added per build over the empty python hook: {per_build:.1f} ms "
        f"(its floor: {floor_per_build:.1f} ms)"
    )
    print(
        f"ratio nixspool-hook / /bin/true:         {ours / build['/bin/true']:.3f}"
        "  (for information)"
    )
    if "nix copy (manual)" in build:
        print(f"ratio nix copy (manual) / nixspool-hook: {build['nix copy (manual)'] / ours:.2f}")
    else:
        print("(Nix 2.8.0 passes no OUT_PATHS: the manual's nix copy hook cannot run here)")
    timed = {k: med(v) for k, v in inside_the_daemon(work, args.derivations).items()}
    print(
        f"# each hook's own time inside the daemon, timed by a shell around it, "
        f"median of {args.derivations} builds"
    )
    for name, seconds in timed.items():
        over = seconds - timed["empty python -IS"]
        print(f"post-build-hook = {name:<18} {seconds * 1000:7.2f} ms  (+{over * 1000:.2f} ms)")
    print(
        f"nixspool-hook / its floor inside the daemon: "
        f"{timed['nixspool-hook'] / timed['its floor']:.2f}"
    )

    host = the_lab.hosts[0]
    away = {
        "link down": (host.link_down, host.link_up),
        "silent (every packet it sends dropped, as behind a router)": (
            host.go_silent,
            host.speak_again,
        ),
    }
    for name, (leave, come_back) in away.items():
        leave()
        try:
            print(f"# LAN host away: {name}")
            env = hook_env(work, f"away-{len(name)}")
            program = set_up_hook(work)
            took, failed = build_once(work, "away", program, env, args.derivations, 3600)
            print(
                f"post-build-hook = nixspool-hook     {took:7.2f} s for {args.derivations} "
                f"derivations ({took / ours:.2f} x host up): {failed or 'built'}"
            )
            k = args.down_derivations
            if not lab.hook_gets_out_paths():
                continue
            manual = str(work / "manual-hook")
            took, failed = build_once(work, "away", manual, env, k, args.down_timeout)
            outcome = f"FAILED after {took:.1f} s: {failed}" if failed else f"built in {took:.1f} s"
            print(f"post-build-hook = nix copy (manual), {k} derivations: {outcome}")
        finally:
            come_back()


if __name__ == "__main__":
    main()
