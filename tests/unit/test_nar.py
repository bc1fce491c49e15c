"""The NAR serialiser (nar.py) on trees with every kind of object: the bytes must
be Nix's. Here against a digest `nix-store --dump` gave for this very tree (so the
fast tier needs no Nix); tests/lab/test_nar_against_nix.py compares byte for byte with the
`nix-store --dump` of every Nix of the matrix, on odder trees and store paths."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pytest

from nixspool import nar


def odd_tree(root: Path) -> Path:
    """Each kind of object, names in an order that byte order and str order
    disagree on, a name that is not UTF-8, an empty file, an executable."""
    tree = root / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    (tree / "a").write_bytes(b"hello")
    (tree / "B").write_bytes(b"upper case sorts first in byte order")
    (tree / "empty").write_bytes(b"")
    (tree / "eight bytes").write_bytes(b"12345678")  # no padding
    (tree / "run").write_bytes(b"#!/bin/sh\nexit 0\n")
    (tree / "run").chmod(0o755)
    (tree / "sub" / "deeper" / "file").write_bytes(bytes(range(256)) * 40)
    os.symlink("/etc/passwd", tree / "absolute")
    os.symlink("../a", tree / "sub" / "relative")
    with open(os.fsencode(tree / "sub") + b"/\xff\xfe not utf-8", "wb") as f:
        f.write(b"z" * 9)
    (tree / "sub" / "empty dir").mkdir()
    return tree


# sha256 of `nix-store --dump` of odd_tree, by Nix 2.8.0 (the format has not
# changed since; tests/lab/test_nar_against_nix.py compares with every Nix of the matrix).
ODD_TREE_NAR = "fe96a794ca5d7d04c3e36dbaed758da795086aaab5976b6e3b4c4437c9305f15"


def test_the_odd_tree_is_nixs_nar(tmp_path: Path) -> None:
    assert hashlib.sha256(b"".join(nar.dump(str(odd_tree(tmp_path))))).hexdigest() == (ODD_TREE_NAR)


def test_the_executable_bit_and_a_byte_change_the_nar(tmp_path: Path) -> None:
    """The digest above is not a constant any tree meets."""
    tree = odd_tree(tmp_path)
    (tree / "run").chmod(0o644)
    assert hashlib.sha256(b"".join(nar.dump(str(tree)))).hexdigest() != ODD_TREE_NAR
    (tree / "run").chmod(0o755)
    (tree / "a").write_bytes(b"hellO")
    assert hashlib.sha256(b"".join(nar.dump(str(tree)))).hexdigest() != ODD_TREE_NAR


def test_a_single_file_is_framed_as_nix_frames_it(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")

    def s(data: bytes) -> bytes:
        return struct.pack("<Q", len(data)) + data + b"\0" * (-len(data) % 8)

    expected = b"".join(
        s(x) for x in (b"nix-archive-1", b"(", b"type", b"regular", b"contents", b"abc", b")")
    )
    assert b"".join(nar.dump(str(path))) == expected


def test_contents_come_in_bounded_chunks(tmp_path: Path) -> None:
    path = tmp_path / "big"
    path.write_bytes(b"x" * (nar.CHUNK * 2 + 5))
    assert max(len(chunk) for chunk in nar.dump(str(path))) <= nar.CHUNK


def test_a_path_that_is_not_there_fails_at_the_call(tmp_path: Path) -> None:
    """At once, before a byte: the cache writer then lets Nix read the path."""
    with pytest.raises(FileNotFoundError):
        nar.dump(str(tmp_path / "gone"))


def test_a_file_that_grows_while_read_is_not_passed_off_as_whole(tmp_path: Path) -> None:
    path = tmp_path / "growing"
    path.write_bytes(b"x" * 10)
    chunks = nar.dump(str(path))
    next(chunks)  # the magic; the file's size is taken next
    path.write_bytes(b"x" * 20)
    with pytest.raises(nar.ChangedWhileRead):
        list(chunks)
