"""`status` reads counts the spool's triggers keep (schema, migration 6) instead of
counting every row, and each remote's oldest queued row from one index. Here both
are checked against every row counted, after each step of random sequences of
everything that changes rows: paths recorded (by the hook's own INSERT, .drv rows
included), fan-out, sizes learnt, leases and every ending of one, verdicts, retry,
drop, prune, derivations resolved."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from nixspool.hook import rows
from nixspool.spool import Selector, Spool

H = "0123456789abcdfghijklmnpqrsvwxyz"
REMOTES = ["pi", "nas"]


def store_path(i: int, suffix: str = "") -> str:
    return f"/nix/store/{H[:24]}{i:08d}-p{suffix}"


def counted(spool: Spool) -> dict[tuple[str, str], tuple[int, int, int, int]]:
    """The oracle: every row counted, as status did before the tallies."""
    return {
        (remote, state): (n, verified or 0, not_verified or 0, size)
        for remote, state, n, verified, not_verified, size in spool.conn.execute(
            "SELECT d.remote, d.state, count(*), sum(d.verified IS 1), sum(d.verified IS 0),"
            " coalesce(sum(p.nar_size), 0) FROM deliveries d JOIN paths p ON p.id = d.path_id"
            " GROUP BY d.remote, d.state"
        )
    }


def tallied(spool: Spool) -> dict[tuple[str, str], tuple[int, int, int, int]]:
    return {
        (remote, state): (n, verified, not_verified, size)
        for remote, state, n, verified, not_verified, size in spool.conn.execute(
            "SELECT remote, state, rows, verified, not_verified, bytes FROM tallies"
        )
        if n or verified or not_verified or size  # a state emptied keeps a zero row
    }


def oldest_queued(spool: Spool) -> dict[str, float]:
    """The oracle for each remote's oldest queued row: a join over every queued row."""
    return dict(
        spool.conn.execute(
            "SELECT d.remote, min(p.recorded_at) FROM deliveries d JOIN paths p"
            " ON p.id = d.path_id WHERE d.state = 'queued' GROUP BY d.remote"
        )
    )


def step(spool: Spool, rng: random.Random, made: list[int]) -> str:
    """One random change of rows, as the program makes them; its name."""
    conn, now = spool.conn, 1_000_000.0 + len(made)
    action = rng.choice(
        ["record", "record", "fan out", "sizes", "lease", "lease", "verdicts", "retry",
         "drop", "prune", "resolve"]
    )  # fmt: skip
    paths = [p for (p,) in conn.execute("SELECT path FROM paths")]
    if action == "record":  # the hook's INSERT; one in five a .drv of Nix 2.8.0
        for _ in range(rng.randint(1, 6)):
            made.append(len(made))
            drv = rng.random() < 0.2
            path = store_path(made[-1], ".drv" if drv else "")
            with spool.transaction():
                conn.execute(rows.INSERT_PATH, (path, "", int(drv), now))
    elif action == "fan out":
        spool.intake.sync_remotes(rng.sample(REMOTES, rng.randint(1, 2)))
    elif action == "sizes" and paths:
        spool.queue.set_nar_sizes(
            {p: rng.randint(1, 10_000) for p in rng.sample(paths, min(3, len(paths)))}
        )
    elif action == "lease":
        remote = rng.choice(REMOTES)
        leased = spool.queue.claim(remote, "me", rng.randint(1, 8), 60, now=now)
        ids = [i for i, _ in leased]
        rng.shuffle(ids)
        parts = [ids[k::5] for k in range(5)]
        spool.queue.mark_delivered(remote, "me", parts[0], now=now)
        spool.queue.mark_failed(remote, "me", parts[1], "refused", now=now)
        spool.queue.mark_deferred(remote, "me", parts[2], "later", now + 30, now=now)
        spool.queue.mark_skipped(remote, "me", {i: "filtered" for i in parts[3]}, now=now)
        spool.queue.release(remote, "me", parts[4])
    elif action == "verdicts" and paths:
        remote = rng.choice(REMOTES)
        spool.queue.set_verified(
            remote, {p: rng.random() < 0.5 for p in rng.sample(paths, min(3, len(paths)))}
        )
    elif action == "retry":
        spool.admin.retry(Selector(all_failed=True, remote=rng.choice([None, *REMOTES])))
    elif action == "drop" and paths:
        spool.admin.drop(Selector(paths=tuple(rng.sample(paths, 1))))
    elif action == "prune":
        spool.admin.prune(rng.choice([0.0, 50.0]), rng.choice([0.0, 50.0]), now=now + 40)
    elif action == "resolve":
        for drv_id, _ in spool.intake.unresolved()[:1]:
            made.append(len(made))
            spool.intake.resolve(drv_id, [store_path(made[-1], "-out")])
    return action


@pytest.mark.parametrize("seed", range(12))
def test_the_tallies_are_every_row_counted(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    made: list[int] = []
    with Spool.open(str(tmp_path / "spool.sqlite")) as spool:
        done = []
        for _ in range(120):
            done.append(step(spool, rng, made))
            assert tallied(spool) == counted(spool), done[-5:]
            shown = {
                name: r.oldest_queued_at
                for name, r in spool.reports.status().remotes.items()
                if r.oldest_queued_at is not None
            }
            assert shown == oldest_queued(spool), done[-5:]
        assert {"lease", "prune", "drop"} <= set(done)


def test_status_reads_the_tallies(tmp_path: Path) -> None:
    """What status reports per remote is what the rows say."""
    with Spool.open(str(tmp_path / "spool.sqlite")) as spool:
        with spool.transaction():
            for i in range(6):
                spool.conn.execute(rows.INSERT_PATH, (store_path(i), "", 0, 100.0 + i))
        spool.intake.sync_remotes(["pi"])
        spool.queue.set_nar_sizes({store_path(i): 1000 for i in range(6)})
        ids = [i for i, _ in spool.queue.claim("pi", "me", 4, 60, now=200.0)]
        spool.queue.mark_delivered("pi", "me", ids[:3], now=200.0)
        spool.queue.mark_failed("pi", "me", ids[3:], "refused", now=200.0)
        spool.queue.set_verified("pi", {store_path(0): True, store_path(1): False})
        pi: Any = spool.reports.status(now=300.0).remotes["pi"]
    assert (pi.queued, pi.delivered, pi.failed, pi.skipped) == (2, 3, 1, 0)
    assert (pi.verified, pi.not_verified, pi.delivered_bytes) == (1, 1, 3000)
    assert pi.last_delivered_at == 200.0
    assert pi.oldest_queued_at == 104.0


def test_a_spool_of_schema_5_gets_its_tallies_counted(tmp_path: Path) -> None:
    """Migration 6 counts what an older spool holds, once."""
    from nixspool.spool import schema

    path = tmp_path / "old.sqlite"
    import sqlite3

    conn = sqlite3.connect(path, isolation_level=None)
    for number in range(5):
        for statement in schema.statements(schema.MIGRATIONS[number]):
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 5")
    for i in range(4):
        conn.execute(rows.INSERT_PATH, (store_path(i), "", 0, 1.0))
    conn.execute("UPDATE paths SET nar_size = 10")
    conn.execute("INSERT INTO remotes (name, expanded_through) VALUES ('pi', 4)")
    conn.execute(
        "INSERT INTO deliveries (remote, path_id, state, verified, delivered_at)"
        " SELECT 'pi', id, CASE WHEN id <= 3 THEN 'delivered' ELSE 'queued' END,"
        " CASE WHEN id = 1 THEN 1 END, 5.0 FROM paths"
    )
    conn.close()
    with Spool.open(str(path)) as spool:
        assert (
            tallied(spool)
            == counted(spool)
            == {
                ("pi", "delivered"): (3, 1, 0, 30),
                ("pi", "queued"): (1, 0, 0, 10),
            }
        )
