"""What root runs for every build must be root's alone (rootcode.py): the rule on
real files and directories."""

from __future__ import annotations

from pathlib import Path

from nixspool import rootcode


def test_a_file_in_a_directory_anyone_may_write_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o777)
    (d / "hook").write_text("")
    assert rootcode.who_else_may_change(str(d / "hook")) is not None
