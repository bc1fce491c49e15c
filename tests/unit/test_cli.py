"""The CLI through typer's CliRunner: output, --json shapes, exit codes, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nixspool.cli import app
from nixspool.hook import journal, locate, rows
from nixspool.spool import Spool

H = "0123456789abcdfghijklmnpqrsvwxyz"
runner = CliRunner()


def p(name: str) -> str:
    return f"/nix/store/{H}-{name}"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    spool = tmp_path / "spool" / "spool.sqlite"
    path.write_text(f'spool = "{spool}"\n\n[remotes.pi]\nurl = "file://{tmp_path}/cache"\n')
    with Spool.open(str(spool)) as s, s.transaction():
        rows.store(s.conn, [rows.Record(p("a.drv"), [p("a"), p("a-dev")], [("x", "bad")], 1.0)])
    return path


def nixspool(config: Path, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["--config", str(config), *args])
    return result.exit_code, result.stdout, result.stderr


def test_status_human_and_json(config: Path) -> None:
    code, out, _ = nixspool(config, "status")
    assert code == 0
    assert re.search(r"^pi\s+2\s+0\s+0\s+0\s+\d+d", out, re.MULTILINE), out
    assert "1 values rejected by the hook" in out
    code, out, _ = nixspool(config, "status", "--json")
    data = json.loads(out)
    assert data["totals"] == {"queued": 2, "delivered": 0, "failed": 0, "skipped": 0}
    assert data["remotes"]["pi"]["configured"] is True


def test_list_filters_and_json(config: Path) -> None:
    _, out, _ = nixspool(config, "list", "--json", "--state", "queued", "--remote", "pi")
    rows = json.loads(out)
    assert [r["path"] for r in rows] == [p("a"), p("a-dev")]
    assert set(rows[0]) == {
        "id",
        "path",
        "remote",
        "state",
        "attempts",
        "next_attempt_at",
        "last_error",
        "recorded_at",
        "delivered_at",
        "needs_outputs",
        "drv_path",
        "verified",
    }
    assert nixspool(config, "list", "--state", "delivered")[1] == ""
    code, out, _ = nixspool(config, "list", "--rejected")
    assert (code, "bad: x" in out) == (0, True)


def test_retry_drop_and_their_errors(config: Path) -> None:
    code, out, _ = nixspool(config, "drop", "1")
    assert (code, out.strip()) == (0, "dropped 1 rows; 1 paths left the spool")
    code, _, err = nixspool(config, "retry", "99")
    assert (code, err.strip()) == (2, "error: not in the spool: 99; see `nixspool list`")
    code, _, err = nixspool(config, "retry", "nonsense")
    assert code == 2 and "neither a row id nor a store path" in err
    code, _, err = nixspool(config, "drop", "--remote", "nas", "--all-failed")
    assert code == 2 and "unknown remote 'nas' (known: pi)" in err
    code, out, _ = nixspool(config, "retry", "--all-failed")
    assert (code, out.strip()) == (0, "requeued 0 rows")


def test_config_shows_values_and_where_they_came_from(config: Path) -> None:
    code, out, _ = nixspool(config, "config")
    assert code == 0
    assert f'url = "file://{config.parent}/cache"  # {config}:4' in out
    assert "connect_timeout = 10.0  # default" in out
    assert "compression" not in out  # Nix writes this file:// cache: the key is not its
    data = json.loads(nixspool(config, "config", "--json")[1])
    assert data["chosen_by"] == "--config"
    assert data["sources"]["spool"] == f"{config}:1"
    config.write_text(config.read_text() + '\n[remotes.pi2]\nurl = "sftp://pi/srv/c"\n')
    out = nixspool(config, "config")[1]
    assert 'compression = "zstd"  # default' in out
    assert "part_size" not in out and "credentials" not in out  # s3:// keys, s3:// notes
    config.write_text(
        config.read_text() + '\n[remotes.team]\nurl = "s3://team-cache?profile=ci"\n'
        'part_size = "8M"\n'
    )
    out = nixspool(config, "config")[1]
    assert "part_size = 8388608  # " in out and "multipart_threshold = 67108864  # default" in out
    assert "# credentials: boto3's chain as" in out and "profile ci of ~/.aws/credentials" in out


def test_config_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[remotes.pi]\nurl = 3\n")
    code, _, err = nixspool(bad, "status")
    assert code == 1
    assert err == f"error: {bad}:2: 'url' must be a string, not 3\n"


def test_a_spool_that_is_not_a_database_is_set_aside_and_made_anew(tmp_path: Path) -> None:
    spool = tmp_path / "spool.sqlite"
    spool.write_text("not sqlite" * 1000)
    spool.chmod(0o600)
    tmp_path.chmod(0o700)
    config = tmp_path / "c.toml"
    config.write_text(f'spool = "{spool}"\n')
    code, _, err = nixspool(config, "status")
    assert code == 0, err
    (kept,) = tmp_path.glob("spool.sqlite.broken-*")
    assert kept.read_text() == "not sqlite" * 1000  # kept for a person, untouched
    assert err.startswith(f"spool {spool} is not a usable SQLite database")
    assert f"set aside as {kept}" in err and len(err.splitlines()) == 1
    assert nixspool(config, "status")[2] == ""  # the new one is whole


def test_flush_refuses_an_unknown_remote(config: Path) -> None:
    # Only the argument handling here; real flushes are in the integration tests.
    code, _, err = nixspool(config, "flush", "--remote", "nope")
    assert code == 2 and "unknown remote 'nope'" in err


def test_keygen_into_a_path_that_cannot_be_a_directory_is_one_line(
    config: Path, tmp_path: Path
) -> None:
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    code, out, err = nixspool(config, "keygen", "k", "--out", str(not_a_dir / "sub"))
    assert code == 2, out
    assert err == (
        f"error: cannot write the key pair in {not_a_dir / 'sub'}: Not a directory; "
        "pass --out DIRECTORY\n"
    )


@pytest.mark.parametrize("item", ["bad name=ssh-ng://pi", "a/b=ssh-ng://pi", "=ssh://x", "pi"])
def test_setup_refuses_a_bad_remote_before_writing_anything(tmp_path: Path, item: str) -> None:
    target = tmp_path / "config.toml"
    result = runner.invoke(
        app,
        ["setup", "--user", "root", "--remote", item, "--config-file", str(target)],
    )
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: --remote"), result.stderr
    assert result.stderr.count("\n") == 1
    assert not target.exists()


def test_status_reads_a_quiet_spool_without_changing_it(config: Path, tmp_path: Path) -> None:
    assert nixspool(config, "status")[0] == 0  # fans the paths out to pi: there was work
    spool = tmp_path / "spool" / "spool.sqlite"
    ballast = Path(str(spool) + ".ballast")
    ballast.unlink()
    before = (spool.stat().st_mtime_ns, spool.read_bytes())
    code, out, _ = nixspool(config, "status", "--json")
    assert code == 0 and json.loads(out)["totals"]["queued"] == 2
    assert nixspool(config, "list")[0] == 0
    assert not ballast.exists()  # a writing open keeps one
    assert (spool.stat().st_mtime_ns, spool.read_bytes()) == before
    # A record waiting in the journal: status imports it first, to be complete.
    journal.append(locate.fallback_journal(str(spool)), rows.Record("", [p("c")], [], 3.0))
    code, out, _ = nixspool(config, "status", "--json")
    assert json.loads(out)["paths"] == 3
    assert json.loads(out)["totals"]["queued"] == 3
    assert ballast.exists()


def test_with_no_remote_recorded_paths_are_listed_and_droppable(tmp_path: Path) -> None:
    """Before any remote is configured the hook still records: `list` shows those
    paths (no remote, state recorded) and `drop` can remove them by id or path."""
    spool = tmp_path / "spool.sqlite"
    config = tmp_path / "config.toml"
    config.write_text(f'spool = "{spool}"\n')
    with Spool.open(str(spool)) as s, s.transaction():
        rows.store(s.conn, [rows.Record(p("a.drv"), [p("a"), p("b")], [], 1.0)])
    code, out, _ = nixspool(config, "list")
    assert code == 0
    assert [line.split()[1:] for line in out.splitlines()] == [
        ["-", "recorded", p("a")],
        ["-", "recorded", p("b")],
    ]
    code, out, _ = nixspool(config, "list", "--json", "--state", "recorded")
    assert [(r["remote"], r["state"], r["path"]) for r in json.loads(out)] == [
        (None, "recorded", p("a")),
        (None, "recorded", p("b")),
    ]
    assert nixspool(config, "list", "--state", "queued")[1] == ""
    code, out, _ = nixspool(config, "drop", p("b"))
    assert (code, out.strip()) == (0, "dropped 1 rows; 1 paths left the spool")
    _, out, _ = nixspool(config, "list", "--json")
    assert [r["path"] for r in json.loads(out)] == [p("a")]
    code, _, err = nixspool(config, "drop", "7")
    assert (code, err.strip()) == (2, "error: not in the spool: 7; see `nixspool list`")


def test_status_check_is_for_monitoring(config: Path) -> None:
    """Exit 1 with a line per problem, or 0 and `check: ok`; --json adds the list."""
    code, out, _ = nixspool(config, "status", "--check")  # recorded at 1.0: decades ago
    assert code == 1
    assert re.search(r"^CHECK FAILED: pi: the oldest queued row waits since \d+d", out, re.M), out
    code, out, _ = nixspool(config, "status", "--check", "--max-age", "36500d")
    assert (code, out.splitlines()[-1]) == (0, "check: ok")
    with Spool.open(str(config.parent / "spool" / "spool.sqlite")) as s:
        s.intake.sync_remotes(["pi"])
        [(path_id, _)] = s.queue.claim("pi", "me", 1, 60)
        s.queue.mark_failed("pi", "me", [path_id], "lacks a signature by a trusted key")
    code, out, _ = nixspool(config, "status", "--check", "--max-age", "36500d", "--json")
    assert code == 1
    assert json.loads(out)["problems"] == ["pi: 1 rows failed (`nixspool list --state failed`)"]
    code, _, err = nixspool(config, "status", "--check", "--max-age", "soon")
    assert code == 2 and "'soon' is not a duration like 90s, 30m, 6h or 2d" in err
    assert nixspool(config, "status", "--check", "--max-age", "0")[0] == 2
