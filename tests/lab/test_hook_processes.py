"""The hook as processes: many at once, a spool held locked past the hook's bound,
SIGKILL at any moment. Real processes and real waits, so in the lab tier, not the
fast one.
"""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nixspool.hook import locate, rows
from nixspool.spool import Spool
from programs import installed_program
from test_hook import out, paths_in, unique_out

# -- under fire ----------------------------------------------------------------


def test_32_concurrent_hooks_lose_nothing(hook_env, run_hook, tmp_path) -> None:
    spool = tmp_path / "spool" / "spool.sqlite"
    Spool.open(str(spool)).close()
    expected = [unique_out(i) for i in range(1000)]

    def record(i: int) -> subprocess.CompletedProcess[str]:
        result: subprocess.CompletedProcess[str] = run_hook(hook_env(out(f"d{i}.drv"), expected[i]))
        return result

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(record, range(1000)))
    assert all(r.returncode == 0 for r in results)
    assert paths_in(spool) == set(expected)


def test_a_locked_spool_waits_a_bounded_time_then_uses_the_journal(
    hook_env, run_hook, tmp_path
) -> None:
    spool = tmp_path / "spool" / "spool.sqlite"
    Spool.open(str(spool)).close()
    holder = sqlite3.connect(spool, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        result = run_hook(hook_env(out("a.drv"), out("a")))
        waited = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert result.returncode == 0
    assert "database is locked; recorded in" in result.stderr
    assert rows.HOOK_BUSY_TIMEOUT_SECONDS <= waited < rows.HOOK_BUSY_TIMEOUT_SECONDS + 10
    assert Path(locate.fallback_journal(str(spool))).exists()
    assert paths_in(spool) == {out("a")}
    assert not Path(locate.fallback_journal(str(spool))).exists()


def test_sigkill_at_any_moment_keeps_every_committed_row(hook_env, tmp_path) -> None:
    spool = tmp_path / "spool" / "spool.sqlite"
    Spool.open(str(spool)).close()
    hook_program = installed_program("nixspool-hook")
    completed: set[str] = set()
    rng = random.Random(7)
    # Kill within twice the hook's own run time here, so that on any machine
    # some hooks are killed mid-way and some finish.
    runs = []
    for i in range(3):
        started = time.monotonic()
        subprocess.run(
            [hook_program],
            env=hook_env(out(f"w{i}.drv"), unique_out(1000 + i)),
            stdin=subprocess.DEVNULL,
            check=True,
        )
        runs.append(time.monotonic() - started)
    window = 2 * sorted(runs)[1]
    for i in range(60):
        proc = subprocess.Popen(
            [hook_program],
            env=hook_env(out(f"d{i}.drv"), unique_out(i)),
            stdin=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0, window))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        if proc.wait() == 0:
            completed.add(unique_out(i))
    con = sqlite3.connect(spool)
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    con.close()
    recorded = paths_in(spool)
    assert completed <= recorded  # every hook that finished kept its row
    assert recorded <= {unique_out(i) for i in range(60)} | {unique_out(1000 + i) for i in range(3)}
    assert 0 < len(completed) < 60, "the kill timing did not hit both cases; adjust it"
