"""atomic.write_file: whole or not at all, private until placed, no clobbering
where asked, nothing left behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from nixspool import atomic


def test_a_file_is_written_whole_with_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "key.sec"
    atomic.write_file(str(path), "secret\n", 0o600)
    assert path.read_text() == "secret\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    atomic.write_file(str(path), "other\n", 0o644)  # replaced
    assert (path.read_text(), stat.S_IMODE(path.stat().st_mode)) == ("other\n", 0o644)
    assert os.listdir(tmp_path) == ["key.sec"]  # no temporary left


def test_without_replace_an_existing_file_is_never_touched(tmp_path: Path) -> None:
    path = tmp_path / "key.sec"
    path.write_text("the old key\n")
    with pytest.raises(FileExistsError):
        atomic.write_file(str(path), "a new key\n", 0o600, replace=False)
    assert path.read_text() == "the old key\n"
    assert os.listdir(tmp_path) == ["key.sec"]


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        atomic.write_file(str(tmp_path / "no-such-dir" / "f"), "x", 0o600)
    path = tmp_path / "f"
    with pytest.raises(TypeError):
        atomic.write_file(str(path), None, 0o600)  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []


def test_the_file_then_its_directory_reach_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsync of the file before the rename, of the directory after it: a power cut
    then leaves the old file or the new one under the name, not none."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        synced.append(f"directory {(tmp_path / 'key.sec').exists()}" if is_dir else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic.write_file(str(tmp_path / "key.sec"), "secret\n", 0o600)
    assert synced == ["file", "directory True"]
