"""The batch loop (flush/batches.py) with a fake transport, on a real SQLite spool:
how each way a copy can end settles the rows. No Nix, no network, no root: the
lab tests run the same loop with `nix copy` and the cache writer for real."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from nixspool import nix
from nixspool.config import Remote
from nixspool.errors import CommandError, RemoteConfigError, UnreachableError
from nixspool.flush import Batches, RemoteReport
from nixspool.flush.transport import (
    RemoteFailed,
    Stalled,
    TimedOut,
    Transient,
    known_closures,
)
from nixspool.hook import rows
from nixspool.nix import PathInfo
from nixspool.spool import Spool, State

H = "0" * 31


def p(i: int) -> str:
    return f"/nix/store/{H}{i % 10}-path-{i:03d}"


class FakeTransport:
    """A remote that answers each copy with what `answer(paths)` says: None for
    delivered, or an exception to raise."""

    def __init__(self, answer: Callable[[list[str]], Exception | None]) -> None:
        self.remote = Remote("pi", "ssh-ng://pi", batch_size=16)
        self.answer = answer
        self.copies: list[list[str]] = []
        self.delivered_paths: list[str] = []
        self.wants_closures = False

    def begin(self) -> None:
        pass

    def close(self) -> None:
        pass

    def prepare(self, paths: list[str], closures: Mapping[str, PathInfo]) -> None:
        self.closures = closures

    def copy(self, paths: list[str], started: Callable[[], None]) -> None:
        self.copies.append(paths)
        started()
        error = self.answer(paths)
        if error is not None:
            raise error

    def delivered(self, paths: list[str], report: RemoteReport) -> None:
        self.delivered_paths += paths

    def account_for(self, report: RemoteReport) -> None:
        pass


class Reach:
    def __init__(self, away: bool = False) -> None:
        self.away = away
        self.asked = 0

    def check_reachable(self, remote: Remote) -> None:
        self.asked += 1
        if self.away:
            raise UnreachableError("gone")


@pytest.fixture
def spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Spool]:
    # Every path is in the local store: the loop asks Nix only about gone and sizes.
    monkeypatch.setattr(nix, "invalid_paths", lambda paths, timeout=60: set())
    monkeypatch.setattr(nix, "path_infos", lambda paths, **kw: {})
    monkeypatch.setattr(nix, "start_path_infos", lambda paths: lambda: {})
    s = Spool.open(str(tmp_path / "spool.sqlite"))
    with s.transaction():
        rows.store(s.conn, [rows.Record("", [p(i) for i in range(16)], [], 1.0)])
    s.intake.sync_remotes(["pi"])
    yield s
    s.close()


def run(
    spool: Spool, transport: FakeTransport, reach: Reach | None = None
) -> tuple[RemoteReport, dict[str, tuple[State, int, str | None]]]:
    report = RemoteReport("pi")
    loop = Batches(
        transport,
        spool,
        "test",
        report,
        reach or Reach(),
        retry=(30.0, 3600.0),
        retry_wait=(0.0, 0.0),
    )
    now = time.time()  # as a flush: the rows due when it began, each once
    loop.deliver(spool.queue.due_count("pi", now=now), due_by=now)
    states = {r.path: (r.state, r.attempts, r.last_error) for r in spool.reports.rows()}
    return report, states


def refusal(path: str) -> CommandError:
    return CommandError(
        "nix copy failed",
        stderr=f"error: cannot add path '{path}' because it lacks a signature by a trusted key",
    )


def info(path: str, *references: str) -> PathInfo:
    return PathInfo(path, "sha256:" + "0" * 52, 1, references, ())


def test_a_transport_that_wants_closures_gets_the_loops_and_nix_is_asked_once(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[bool] = []
    dependency = f"/nix/store/{H}x-dependency"

    def path_infos(paths: list[str], recursive: bool = False, **kw: object) -> dict[str, PathInfo]:
        asked.append(recursive)
        return {q: info(q, dependency) for q in paths} | {dependency: info(dependency)}

    monkeypatch.setattr(nix, "path_infos", path_infos)
    transport = FakeTransport(lambda paths: None)
    transport.wants_closures = True
    report, _ = run(spool, transport)
    assert report.delivered == 16 and asked == [True]
    assert set(transport.closures) == {p(i) for i in range(16)} | {dependency}


def test_sizes_asked_alongside_the_copy_are_counted_as_bytes_delivered(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[list[str]] = []

    def start_path_infos(paths: list[str]) -> Callable[[], dict[str, PathInfo]]:
        asked.append(list(paths))
        return lambda: {q: PathInfo(q, "sha256:" + "0" * 52, 1000, (), ()) for q in paths}

    monkeypatch.setattr(nix, "start_path_infos", start_path_infos)
    report, _ = run(spool, FakeTransport(lambda paths: None))
    assert report.delivered == 16 and len(asked) == 1
    assert spool.reports.status().remotes["pi"].delivered_bytes == 16 * 1000


def test_sizes_nix_could_not_give_alongside_are_asked_again_for_the_paths_still_there(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failed() -> dict[str, PathInfo]:
        raise CommandError("nix path-info failed", stderr=f"error: path '{p(3)}' is not valid")

    monkeypatch.setattr(nix, "start_path_infos", lambda paths: failed)
    monkeypatch.setattr(nix, "invalid_paths", lambda paths, timeout=60: set())
    monkeypatch.setattr(
        nix,
        "path_infos",
        lambda paths, **kw: {q: PathInfo(q, "sha256:" + "0" * 52, 10, (), ()) for q in paths},
    )
    report, _ = run(spool, FakeTransport(lambda paths: None))
    assert report.delivered == 16
    assert spool.reports.status().remotes["pi"].delivered_bytes == 16 * 10


def test_known_closures_are_each_paths_own_or_none_if_one_is_unknown() -> None:
    a, b, c, d = (f"/nix/store/{H}{i}-{i}" for i in "abcd")
    closures = {a: info(a, b), b: info(b), c: info(c, d), d: info(d)}
    assert set(known_closures([a], closures) or ()) == {a, b}
    assert set(known_closures([c, b], closures) or ()) == {b, c, d}
    assert known_closures([a, f"/nix/store/{H}e-gone"], closures) is None


def test_delivered_in_one_copy(spool: Spool) -> None:
    transport = FakeTransport(lambda paths: None)
    report, states = run(spool, transport)
    assert len(transport.copies) == 1 and report.delivered == 16
    assert {s for s, _, _ in states.values()} == {State.DELIVERED}
    assert sorted(transport.delivered_paths) == sorted(p(i) for i in range(16))


def test_one_bad_path_fails_only_its_row(spool: Spool) -> None:
    bad = p(5)
    transport = FakeTransport(lambda paths: refusal(bad) if bad in paths else None)
    report, states = run(spool, transport)
    assert (report.delivered, report.failed) == (15, 1)
    assert states[bad][0] is State.FAILED and "lacks a signature" in (states[bad][2] or "")
    assert len(transport.copies) <= 2 * 4 + 1  # the halves that hold it, and their twins


def test_two_bad_paths_are_found_though_both_halves_are_refused(spool: Spool) -> None:
    """Both halves refused alike at the top is not yet the remote's fault: one path
    in each. The chain breaks where a half goes through."""
    bad = {p(3), p(12)}
    transport = FakeTransport(
        lambda paths: refusal(min(bad & set(paths))) if bad & set(paths) else None
    )
    report, states = run(spool, transport)
    assert (report.delivered, report.failed) == (14, 2)
    assert {path for path, (s, _, _) in states.items() if s is State.FAILED} == bad


def test_a_remote_that_refuses_everything_is_one_error(spool: Spool) -> None:
    transport = FakeTransport(lambda paths: refusal(paths[0]))
    with pytest.raises(RemoteConfigError, match="refuses every path alike"):
        run(spool, transport)
    states = {r.path: (r.state, r.attempts) for r in spool.reports.rows()}
    assert set(states.values()) == {(State.QUEUED, 1)}  # one attempt, none failed
    assert len(transport.copies) == 1 + 2 * 4  # both halves at 8, 4, 2 and 1: log2(16) levels


def test_a_transient_failure_is_tried_three_times_then_deferred(spool: Spool) -> None:
    reach = Reach()
    transport = FakeTransport(lambda paths: Transient("protocol hiccup"))
    report, states = run(spool, transport, reach)
    assert len(transport.copies) == 3 and reach.asked == 2  # a probe before each retry
    assert report.deferred == 16
    assert set(states.values()) == {(State.QUEUED, 1, "protocol hiccup")}


def test_a_host_gone_between_tries_leaves_the_rows_untouched(spool: Spool) -> None:
    transport = FakeTransport(lambda paths: Transient("connection reset"))
    with pytest.raises(UnreachableError):
        run(spool, transport, Reach(away=True))
    rows_ = spool.reports.rows()
    assert {(r.state, r.attempts) for r in rows_} == {(State.QUEUED, 0)}
    assert spool.queue.due_count("pi") == 16  # the lease was given back


@pytest.mark.parametrize("kind", [Stalled, TimedOut])
def test_a_stall_or_a_timeout_is_one_attempt_not_retried_here(
    spool: Spool, kind: type[Exception]
) -> None:
    transport = FakeTransport(lambda paths: kind("nix copy moved nothing"))
    report, states = run(spool, transport)
    assert len(transport.copies) == 1 and report.deferred == 16
    assert {a for _, a, _ in states.values()} == {1}


def test_a_remote_whose_nix_fails_is_a_persons_job(spool: Spool) -> None:
    transport = FakeTransport(lambda paths: RemoteFailed("nix-daemon: command not found"))
    with pytest.raises(RemoteConfigError, match="command not found"):
        run(spool, transport)
    assert {(r.state, r.attempts) for r in spool.reports.rows()} == {(State.QUEUED, 1)}


# -- a refusal every path shares, over the whole range of batch sizes ---------------


def refusing(
    directory: Path, count: int, bad: Callable[[str], bool]
) -> tuple[FakeTransport, RemoteReport | RemoteConfigError, dict[str, State]]:
    """A flush of `count` paths in one batch to a remote that refuses each path for
    which `bad` says so, in that path's words (every path alike when all are bad)."""
    directory.mkdir()
    spool = Spool.open(str(directory / "spool.sqlite"))
    try:
        paths = [f"/nix/store/{i:032d}-path-{i}" for i in range(count)]
        with spool.transaction():
            rows.store(spool.conn, [rows.Record("", paths, [], 1.0)])
        spool.intake.sync_remotes(["pi"])
        transport = FakeTransport(lambda batch: next((refusal(q) for q in batch if bad(q)), None))
        transport.remote = Remote("pi", "ssh-ng://pi", batch_size=1000)
        outcome: RemoteReport | RemoteConfigError
        try:
            outcome, _ = run(spool, transport)
        except RemoteConfigError as e:
            outcome = e
        states = {r.path: r.state for r in spool.reports.rows()}
    finally:
        spool.close()
    return transport, outcome, states


def copies_allowed(count: int) -> int:
    return 2 * math.ceil(math.log2(count)) + 1


@pytest.fixture
def every_path_in_the_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nix, "invalid_paths", lambda paths, timeout=60: set())
    monkeypatch.setattr(nix, "start_path_infos", lambda paths: lambda: {})


# Always tried: the sizes where the old chain went wrong (all but powers of two), the
# ends, and the default batch_size; Hypothesis adds others from the whole range.
SIZES = [1, 2, 3, 5, 6, 7, 12, 27, 100, 500, 999, 1000]
# Each example is a flush of up to 1000 rows: at most 25 of them, even when thorough.
CONCURRENT_SAFE = settings(
    max_examples=min(25, settings().max_examples),  # settings(): the profile loaded
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def with_sizes(*, smallest: int = 1, **fixed: object) -> Callable[..., Callable[..., None]]:
    """Hypothesis examples for each of SIZES from `smallest` up, with `fixed` too."""

    def add(test: Callable[..., None]) -> Callable[..., None]:
        for count in (c for c in SIZES if c >= smallest):
            test = example(count=count, **fixed)(test)
        return test

    return add


@pytest.mark.usefixtures("every_path_in_the_store")
@given(count=st.integers(1, 1000))
@with_sizes()
@CONCURRENT_SAFE
def test_every_batch_size_refused_alike_is_the_remotes_refusal_and_no_row_fails(
    tmp_path: Path, count: int
) -> None:
    """A remote that refuses every path (it trusts none of our keys) costs one copy
    and two for each level of the chain, exits 1 naming the refusal, and fails no
    row: nothing says the refusal is any one path's."""
    transport, outcome, states = refusing(tmp_path / lab_dir(), count, lambda q: True)
    assert isinstance(outcome, RemoteConfigError)
    assert "lacks a signature by a trusted key" in str(outcome)
    assert set(states.values()) == {State.QUEUED}  # deferred with the reason, none failed
    assert len(transport.copies) == 1 + 2 * int(math.log2(count)) <= copies_allowed(count)


@pytest.mark.usefixtures("every_path_in_the_store")
@given(count=st.integers(2, 1000), which=st.floats(0, 1, exclude_max=True))
@with_sizes(smallest=2, which=0.5)
@CONCURRENT_SAFE
def test_one_bad_path_among_good_ones_is_found_and_failed_alone(
    tmp_path: Path, count: int, which: float
) -> None:
    bad = f"/nix/store/{int(which * count):032d}"
    transport, outcome, states = refusing(tmp_path / lab_dir(), count, lambda q: q.startswith(bad))
    assert isinstance(outcome, RemoteReport)
    assert (outcome.delivered, outcome.failed) == (count - 1, 1)
    assert [q for q, s in states.items() if s is State.FAILED] == [
        next(q for q in states if q.startswith(bad))
    ]
    assert len(transport.copies) <= copies_allowed(count)


def lab_dir() -> str:
    """A directory of its own for each example (Hypothesis reuses tmp_path)."""
    return uuid.uuid4().hex
