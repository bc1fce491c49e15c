"""The spool against real SQLite files: schema, fan-out, leases, retry and drop."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nixspool.errors import SpoolError, UsageError
from nixspool.hook import journal, locate, rows
from nixspool.spool import SCHEMA_VERSION, Dropped, Selector, Spool, State

H = "0123456789abcdfghijklmnpqrsvwxyz"


def p(name: str) -> str:
    return f"/nix/store/{H}-{name}"


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool.open(str(tmp_path / "spool" / "spool.sqlite"))
    yield s
    s.close()


def add(s: Spool, *names: str, drv: str = "") -> None:
    with s.transaction():
        rows.store(s.conn, [rows.Record(drv, [p(n) for n in names], [], 1.0)])


def test_new_spool_has_schema_wal_and_safe_modes(tmp_path: Path) -> None:
    path = tmp_path / "d" / "spool.sqlite"
    Spool.open(str(path)).close()
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert oct(path.parent.stat().st_mode & 0o777) == "0o700"
    assert Path(str(path) + ".ballast").stat().st_size == 1 << 20


def test_the_hooks_statements_are_valid_against_the_current_schema(spool: Spool) -> None:
    add(spool, "a", drv=p("a.drv"))
    with spool.transaction():
        rows.store(spool.conn, [rows.Record(p("b.drv"), [], [("x", "why")], 2.0)])
    assert spool.reports.status().paths == 2
    assert spool.reports.status().unresolved_derivations == 1
    assert spool.reports.status().rejected == 1


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s" / "spool.sqlite"
    Spool.open(str(path)).close()
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.close()
    with pytest.raises(SpoolError, match="newer than this nixspool knows"):
        Spool.open(str(path))


def test_unsafe_modes_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "s" / "spool.sqlite"
    Spool.open(str(path)).close()
    path.chmod(0o666)
    with pytest.raises(SpoolError, match=r"writable by group or others.*chmod 0600"):
        Spool.open(str(path))
    path.chmod(0o600)
    path.parent.chmod(0o770)
    with pytest.raises(SpoolError, match=r"directory .* writable by group or others"):
        Spool.open(str(path))


def test_a_symlinked_spool_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "s" / "real.sqlite"
    Spool.open(str(real)).close()
    (tmp_path / "s" / "spool.sqlite").symlink_to(real)
    with pytest.raises(SpoolError, match="symbolic link"):
        Spool.open(str(tmp_path / "s" / "spool.sqlite"))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_spool_is_set_aside_with_its_wal_and_made_anew(
    tmp_path: Path, damage: str
) -> None:
    path = tmp_path / "s" / "spool.sqlite"
    with Spool.open(str(path)) as s:
        add(s, "a")
        first_id = s.spool_id
    whole = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"this is not a database" * 100)
    else:  # the header says more pages than the file has
        path.write_bytes(whole[: len(whole) // 2])
    with Spool.open(str(path)) as s:
        assert s.queue.recorded([p("a")]) == set()
        assert s.spool_id != first_id  # the roots then know the spool is new
        add(s, "b")
    with Spool.open(str(path)) as s:
        assert s.queue.recorded([p("b")]) == {p("b")}
    (kept,) = path.parent.glob("spool.sqlite.broken-*[0-9]")
    assert kept.stat().st_size == len(whole) // 2 if damage == "truncated" else 2200


def test_every_remote_gets_every_path_and_keeps_its_own_state(spool: Spool) -> None:
    add(spool, "a", "b")
    spool.intake.sync_remotes(["pi", "nas"])
    add(spool, "c")
    spool.intake.sync_remotes(["pi", "nas"])
    status = spool.reports.status()
    assert status.totals == {"queued": 6, "delivered": 0, "failed": 0, "skipped": 0}
    ids = [i for i, _ in spool.queue.claim("pi", "me", 10, 60)]
    assert spool.queue.mark_delivered("pi", "me", ids) == 3
    status = spool.reports.status()
    assert status.remotes["pi"].delivered == 3
    assert status.remotes["nas"].queued == 3


def test_a_lease_hides_rows_until_it_runs_out(spool: Spool) -> None:
    add(spool, "a", "b")
    spool.intake.sync_remotes(["pi"])
    first = spool.queue.claim("pi", "one", 10, 60, now=100)
    assert len(first) == 2
    assert spool.queue.claim("pi", "two", 10, 60, now=120) == []  # held by the first flusher
    assert spool.queue.claim("pi", "two", 10, 60, now=161) == first  # it died; the lease ran out
    # The first flusher comes back late: it no longer holds the lease, marks nothing.
    assert spool.queue.mark_delivered("pi", "one", [i for i, _ in first]) == 0
    assert spool.queue.mark_delivered("pi", "two", [i for i, _ in first]) == 2


def test_deferred_rows_wait_and_released_rows_do_not_count_an_attempt(spool: Spool) -> None:
    add(spool, "a", "b")
    spool.intake.sync_remotes(["pi"])
    (a, _), (b, _) = spool.queue.claim("pi", "me", 10, 60, now=0)
    spool.queue.mark_deferred("pi", "me", [a], "timeout", retry_at=500, now=0)
    spool.queue.release("pi", "me", [b])
    assert spool.queue.attempts("pi", [a, b]) == {a: 1, b: 0}
    assert [i for i, _ in spool.queue.claim("pi", "me", 10, 60, now=100)] == [b]
    assert spool.queue.claim("pi", "me2", 10, 60, now=150) == []  # a waits, b is leased
    # At 500 a is due again and b's lease (taken at 100 for 60 s) has run out.
    assert {i for i, _ in spool.queue.claim("pi", "me2", 10, 60, now=500)} == {a, b}


def test_a_flush_takes_only_rows_due_when_it_began(spool: Spool) -> None:
    """A row the flush deferred itself waits for the next flush, however short its
    backoff: otherwise one run would try a hopeless path again and again."""
    add(spool, "a", "b")
    spool.intake.sync_remotes(["pi"])
    [(a, _)] = spool.queue.claim("pi", "me", 1, 60, now=10, due_by=10)
    spool.queue.mark_deferred("pi", "me", [a], "timeout", retry_at=11, now=10)
    [(b, _)] = spool.queue.claim("pi", "me", 10, 60, now=20, due_by=10)
    assert b != a
    assert [i for i, _ in spool.queue.claim("pi", "me2", 10, 60, now=20)] == [a]


def test_retry_and_drop_by_id_path_and_all_failed(spool: Spool) -> None:
    add(spool, "a", "b", "c")
    spool.intake.sync_remotes(["pi", "nas"])
    rows = spool.queue.claim("pi", "me", 10, 60)
    spool.queue.mark_failed("pi", "me", [rows[0][0], rows[1][0]], "lacks a valid signature")
    assert spool.reports.status().remotes["pi"].last_error == "lacks a valid signature"
    assert spool.admin.retry(Selector(ids=(rows[0][0],), remote="pi")) == 1
    assert spool.admin.retry(Selector(all_failed=True)) == 1
    assert spool.reports.status().totals["failed"] == 0
    spool.queue.release("pi", "me", [rows[2][0]])
    assert spool.admin.drop(Selector(paths=(p("a"),), remote="pi")).paths == []  # nas wants it
    assert spool.admin.drop(Selector(paths=(p("a"),))) == Dropped(1, [p("a")])
    assert spool.reports.status().paths == 2
    spool.intake.sync_remotes(["pi", "nas"])  # a dropped row does not come back
    assert spool.reports.status().totals["queued"] == 4


def test_retry_all_takes_every_row_not_delivered_and_a_named_row_even_delivered(
    spool: Spool,
) -> None:
    add(spool, "a", "b", "c", "d")
    spool.intake.sync_remotes(["pi"])
    (a, _), (b, _), (c, _), (d, _) = spool.queue.claim("pi", "me", 10, 60, now=0)
    spool.queue.mark_delivered("pi", "me", [a], now=1)
    spool.queue.mark_failed("pi", "me", [b], "lacks a valid signature", now=1)
    spool.queue.mark_skipped("pi", "me", {c: "left out"}, now=1)
    spool.queue.mark_deferred("pi", "me", [d], "disk full", retry_at=3600, now=1)
    assert spool.queue.due_count("pi", now=2) == 0
    assert spool.admin.retry(Selector(all_pending=True), now=2) == 3  # b, c and d
    assert spool.queue.due_count("pi", now=2) == 3
    assert spool.reports.status().totals["delivered"] == 1
    # Named, a delivered row goes back too (the remote lost it): attempts reset.
    assert spool.admin.retry(Selector(paths=(p("a"),)), now=3) == 1
    [row] = [r for r in spool.reports.rows() if r.path == p("a")]
    assert (row.state, row.attempts, row.delivered_at) == (State.QUEUED, 0, None)


def test_skipped_rows_keep_their_reason_until_retried(spool: Spool) -> None:
    add(spool, "a", "b")
    spool.intake.sync_remotes(["pi"])
    (a, _), (b, _) = spool.queue.claim("pi", "me", 10, 60)
    assert spool.queue.mark_skipped("pi", "me", {a: "left out by pi's exclude pattern 'a'"}) == 1
    assert spool.queue.mark_skipped("pi", "someone else", {b: "not theirs to skip"}) == 0
    spool.queue.release("pi", "me", [b])
    status = spool.reports.status()
    assert status.totals == {"queued": 1, "delivered": 0, "failed": 0, "skipped": 1}
    assert status.remotes["pi"].last_error is None  # a skip is no error
    [row] = spool.reports.rows(state=State.SKIPPED)
    assert (row.path, row.last_error, row.attempts) == (
        p("a"),
        "left out by pi's exclude pattern 'a'",
        0,
    )
    assert spool.queue.due_count("pi") == 1  # only b
    assert spool.admin.retry(Selector(all_skipped=True)) == 1
    assert spool.queue.due_count("pi") == 2


def test_a_spool_of_schema_1_keeps_every_row_through_the_migration(tmp_path: Path) -> None:
    from nixspool.spool.schema import MIGRATIONS

    path = tmp_path / "old" / "spool.sqlite"
    path.parent.mkdir(mode=0o700)
    con = sqlite3.connect(path)
    con.executescript(MIGRATIONS[0] + "PRAGMA user_version = 1;")
    con.execute("INSERT INTO paths (path, recorded_at) VALUES (?, 1.0)", (p("a"),))
    con.execute("INSERT INTO remotes (name, expanded_through) VALUES ('pi', 1)")
    con.execute(
        "INSERT INTO deliveries (remote, path_id, state, attempts, last_error, verified)"
        " VALUES ('pi', 1, 'failed', 3, 'lacks a valid signature', 0)"
    )
    con.commit()
    con.close()
    with Spool.open(str(path)) as s:
        [row] = s.reports.rows()
        assert (row.path, row.state, row.attempts, row.last_error, row.verified) == (
            p("a"),
            State.FAILED,
            3,
            "lacks a valid signature",
            False,
        )
        assert s.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        names = {r[0] for r in s.conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert {"deliveries_due", "deliveries_path"} <= names
        s.queue.set_nar_sizes({p("a"): 42})
        s.remotes.flush_finished("pi", 75, now=5.0)
        pi = s.reports.status().remotes["pi"]
        assert (pi.failed, pi.last_flush_at, pi.last_flush_exit) == (1, 5.0, 75)
        s.remotes.flush_finished("pi", 1, now=6.0, needs_a_person="pi: no Nix there")
        assert s.reports.status().remotes["pi"].needs_a_person == "pi: no Nix there"
        assert s.remotes.needs_a_person("pi") == "pi: no Nix there"
        s.remotes.flush_finished("pi", 0, now=7.0)  # a flush that ends otherwise clears it
        assert s.remotes.needs_a_person("pi") is None


def test_retry_and_drop_refuse_unknown_rows(spool: Spool) -> None:
    with pytest.raises(UsageError, match="not in the spool: 42"):
        spool.admin.retry(Selector(ids=(42,)))
    with pytest.raises(UsageError, match="name rows"):
        spool.admin.drop(Selector())


def test_resolving_a_derivation_replaces_its_row_by_its_outputs(spool: Spool) -> None:
    with spool.transaction():
        rows.store(spool.conn, [rows.Record(p("x.drv"), [], [], 5.0)])
    spool.intake.sync_remotes(["pi"])
    ((drv_id, _),) = spool.intake.unresolved()
    assert spool.queue.claim("pi", "me", 10, 60) == []  # not uploadable until resolved
    spool.intake.resolve(drv_id, [p("x"), p("x-dev")])
    spool.intake.sync_remotes(["pi"])
    assert [path for _, path in spool.queue.claim("pi", "me", 10, 60)] == [p("x"), p("x-dev")]
    assert spool.intake.unresolved() == []


def test_journal_records_are_imported_once_even_if_imported_twice(tmp_path: Path) -> None:
    path = str(tmp_path / "s" / "spool.sqlite")
    Spool.open(path).close()
    rec = rows.Record(p("a.drv"), [p("a")], [("bad", "why")], 3.0)
    journal.append(locate.fallback_journal(path), rec)
    # Simulate an importer that died after committing but before unlinking.
    os.rename(locate.fallback_journal(path), locate.fallback_journal(path) + ".importing")
    with open(locate.fallback_journal(path) + ".importing", "ab") as f:
        f.write(journal.encode(rec) + b'{"half a line')
    with Spool.open(path) as s:
        assert s.reports.status().paths == 1
        reasons = sorted(r.reason for r in s.reports.rejects())
    assert reasons == ["unreadable line in the fallback journal", "why"]
    assert not os.path.exists(locate.fallback_journal(path) + ".importing")


def test_appends_racing_an_import_are_never_lost(tmp_path: Path) -> None:
    path = str(tmp_path / "s" / "spool.sqlite")
    Spool.open(path).close()
    names = [f"r{i}" for i in range(400)]

    def writer(chunk: list[str]) -> None:
        for n in chunk:
            journal.append(locate.fallback_journal(path), rows.Record("", [p(n)], [], 1.0))

    threads = [threading.Thread(target=writer, args=(names[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    seen = []  # what each import, racing the writers, left in the spool
    while any(t.is_alive() for t in threads):
        with Spool.open(path) as s:
            seen.append(s.reports.status().paths)
    for t in threads:
        t.join()
    with Spool.open(path) as s:
        seen.append(s.reports.status().paths)
    assert seen[-1] == 400
    assert seen == sorted(seen), "an import lost rows a previous one had brought in"


def test_status_shape_is_stable(spool: Spool) -> None:
    add(spool, "a")
    spool.intake.sync_remotes(["pi"])
    status = spool.reports.status(now=11.0).to_json()
    assert set(status) == {
        "spool",
        "paths",
        "unresolved_derivations",
        "rejected",
        "totals",
        "remotes",
    }
    assert status["remotes"]["pi"] == {
        "queued": 1,
        "delivered": 0,
        "failed": 0,
        "skipped": 0,
        "oldest_queued_at": 1.0,
        "oldest_queued_age_seconds": 10.0,
        "last_error": None,
        "last_error_at": None,
        "verified": 0,
        "not_verified": 0,
        "delivered_bytes": 0,
        "last_delivered_at": None,
        "last_flush_at": None,
        "last_flush_exit": None,
        "needs_a_person": None,
        "reconciled_at": None,
        "reconcile_requeued": None,
        "left_to_upstream": None,
        "configured": True,
    }
    assert [r.state for r in spool.reports.rows()] == [State.QUEUED]


def test_gc_roots_of_two_spools_do_not_touch_each_other(tmp_path: Path) -> None:
    from nixspool import gcroots

    env = {"NIX_STATE_DIR": str(tmp_path / "state")}
    one, two = gcroots.roots_dir("/a/spool.sqlite", env), gcroots.roots_dir("/b/spool.sqlite", env)
    assert one != two
    assert gcroots.sync("/a/spool.sqlite", [p("x")], one) == (1, 0)
    assert gcroots.sync("/b/spool.sqlite", [p("y")], two) == (1, 0)
    assert gcroots.sync("/a/spool.sqlite", [], one) == (0, 1)
    assert os.listdir(two) == [os.path.basename(p("y"))]
    assert os.readlink(os.path.join(two, os.path.basename(p("y")))) == p("y")


def test_a_derivation_nix_cannot_resolve_is_asked_once_then_on_retry(spool: Spool) -> None:
    """Each asking costs a `nix derivation show`: not on every flush for ever."""
    with spool.transaction():
        rows.store(spool.conn, [rows.Record(p("gone.drv"), [], [], 1.0)])
    spool.intake.sync_remotes(["pi"])
    ((drv_id, _),) = spool.intake.unresolved()
    spool.intake.fail_unresolved(drv_id, "cannot resolve outputs of it: path is not valid")
    assert spool.intake.unresolved() == []
    (row,) = spool.reports.rows()
    assert (row.state, row.attempts) == (State.FAILED, 1)
    assert row.last_error == "cannot resolve outputs of it: path is not valid"
    assert spool.reports.status().unresolved_derivations == 0
    assert spool.admin.retry(Selector(all_failed=True)) == 1
    assert [i for i, _ in spool.intake.unresolved()] == [drv_id]


def test_roots_made_for_another_spool_id_are_handed_back(tmp_path: Path) -> None:
    from nixspool import gcroots

    directory = gcroots.roots_dir("/a/spool.sqlite", {"NIX_STATE_DIR": str(tmp_path)})
    assert gcroots.sync("/a/spool.sqlite", [p("x")], directory) == (1, 0)
    # Roots never marked (made before spool ids) are this spool's: nothing handed back.
    assert gcroots.left_by_another_spool("/a/spool.sqlite", "new", directory) == []
    assert gcroots.sync("/a/spool.sqlite", [p("x"), p("y")], directory, "old") == (1, 0)
    assert gcroots.left_by_another_spool("/a/spool.sqlite", "old", directory) == []
    handed = gcroots.left_by_another_spool("/a/spool.sqlite", "new", directory)
    assert sorted(handed) == [p("x"), p("y")]  # the marker is not a root
    assert gcroots.sync("/a/spool.sqlite", [p("y")], directory, "new") == (0, 1)
    assert gcroots.left_by_another_spool("/a/spool.sqlite", "new", directory) == []


def test_a_clock_stepped_back_makes_far_rows_due_and_leaves_near_ones(spool: Spool) -> None:
    add(spool, "far", "near")
    spool.intake.sync_remotes(["pi"])
    now = 1_000_000.0
    with spool.transaction():
        for name, due in (("far", now + 86400 * 365), ("near", now + 60)):
            spool.conn.execute(
                "UPDATE deliveries SET next_attempt_at = ?, attempts = 3"
                " WHERE path_id = (SELECT id FROM paths WHERE path = ?)",
                (due, p(name)),
            )
    assert spool.queue.undo_clock_steps(3600, now=now) == 1
    assert [path for _, path in spool.queue.claim("pi", "me", 10, 60, now=now)] == [p("far")]
    assert spool.queue.undo_clock_steps(3600, now=now) == 0


DAY = 86400.0


def test_reconciling_queues_again_what_the_remote_lost(spool: Spool) -> None:
    add(spool, "a", "b", "c")
    spool.intake.sync_remotes(["pi"])
    ids = [i for i, _ in spool.queue.claim("pi", "me", 10, 60, now=0)]
    spool.queue.mark_delivered("pi", "me", ids, now=1)
    assert spool.remotes.reconciled_at("pi") is None
    # b is gone from pi; c from pi and from this machine.
    assert spool.remotes.reconciled("pi", [p("b")], [p("c")], now=5) == (1, 1)
    assert spool.remotes.reconciled_at("pi") == 5
    pi = spool.reports.status().remotes["pi"]
    assert (pi.reconciled_at, pi.reconcile_requeued) == (5, 1)
    rows = {r.path: r for r in spool.reports.rows()}
    assert (rows[p("a")].state, rows[p("b")].state, rows[p("c")].state) == (
        State.DELIVERED,
        State.QUEUED,
        State.FAILED,
    )
    assert "gone from pi" in (rows[p("b")].last_error or "")
    assert rows[p("b")].delivered_at is None and rows[p("b")].attempts == 0
    assert spool.queue.due_count("pi", now=6) == 1
    assert spool.remotes.reconciled("pi", [p("b")], [], now=7) == (0, 0)  # only delivered rows


def test_prune_forgets_only_rows_past_their_retention(spool: Spool) -> None:
    add(spool, "old-delivered", "new-delivered", "old-failed", "new-failed", "queued", "skipped")
    spool.intake.sync_remotes(["pi"])
    ids = dict((path, i) for i, path in spool.queue.claim("pi", "me", 10, 60, now=0))
    spool.queue.mark_delivered("pi", "me", [ids[p("old-delivered")]], now=0)
    spool.queue.mark_delivered("pi", "me", [ids[p("new-delivered")]], now=95 * DAY)
    spool.queue.mark_failed("pi", "me", [ids[p("old-failed")]], "refused", now=0)
    spool.queue.mark_failed("pi", "me", [ids[p("new-failed")]], "refused", now=95 * DAY)
    spool.queue.mark_skipped("pi", "me", {ids[p("skipped")]: "left out"}, now=0)
    spool.queue.release("pi", "me", [ids[p("queued")]])
    pruned = spool.admin.prune(retention=90 * DAY, failed_retention=10 * DAY, now=100 * DAY)
    assert (pruned.delivered, pruned.failed, pruned.paths) == (1, 1, 2)
    left = {r.path: r.state for r in spool.reports.rows()}
    assert left == {
        p("new-delivered"): State.DELIVERED,
        p("new-failed"): State.FAILED,
        p("queued"): State.QUEUED,
        p("skipped"): State.SKIPPED,
    }
    # A flush prunes once a day at most.
    assert spool.admin.prune_if_due(90 * DAY, 10 * DAY, every=DAY, now=200 * DAY) is not None
    assert spool.admin.prune_if_due(90 * DAY, 10 * DAY, every=DAY, now=200.5 * DAY) is None
    assert spool.admin.prune_if_due(90 * DAY, 10 * DAY, every=DAY, now=201 * DAY) is not None


def test_a_pruned_spool_stops_growing(tmp_path: Path) -> None:
    """Builds delivered and pruned, day after day: SQLite reuses the freed pages, so
    the file reaches a size and stays there (it is never rewritten smaller)."""
    path = tmp_path / "spool.sqlite"
    sizes = []
    for day in range(6):
        with Spool.open(str(path)) as s:
            names = [f"day{day}-{i}" for i in range(2000)]
            add(s, *names)
            s.intake.sync_remotes(["pi"])
            while batch := s.queue.claim("pi", "me", 500, 60, now=day * DAY):
                s.queue.mark_delivered("pi", "me", [i for i, _ in batch], now=day * DAY)
            s.admin.prune(retention=DAY / 2, failed_retention=DAY, now=day * DAY + DAY)
            s.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        sizes.append(path.stat().st_size)
    assert sizes[-1] <= sizes[1], sizes  # flat once the first day's pages are free


def test_a_batch_larger_than_sqlites_variable_limit_is_asked_in_chunks(spool: Spool) -> None:
    """batch_size may exceed the variables SQLite takes in one statement (999 before
    3.32, more after, as compiled): the queue's lookups by id must not fail there.
    This connection is held to the oldest limit."""
    spool.conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
    add(spool, *(f"n{i}" for i in range(2500)))
    spool.intake.sync_remotes(["pi"])
    ids = [i for i, _ in spool.queue.claim("pi", "me", 2500, 60)]
    assert len(ids) == 2500
    assert set(spool.queue.attempts("pi", ids).values()) == {0}
    assert spool.queue.mark_deferred("pi", "me", ids, "later", retry_at=10, now=1) == 2500
