"""nar.py makes the bytes `nix-store --dump` makes, on the Nix under test: odd
trees (deep, wide, large, empty, links out of the tree, names that are not
UTF-8) and real store paths, whose NAR's sha256 is their NarHash."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

import lab
from nixspool import nar, nix
from nixspool.hook.storepath import nix_base32
from test_nar import odd_tree

pytestmark = pytest.mark.integration


def nix_dump(path: Path | str) -> bytes:
    return subprocess.run(
        ["nix-store", "--dump", str(path)], capture_output=True, check=True, timeout=120
    ).stdout


def deep_and_wide(root: Path) -> Path:
    tree = root / "deep"
    here = tree
    for level in range(60):
        here = here / f"level-{level}"
    here.mkdir(parents=True)
    (here / "bottom").write_text("the bottom\n")
    wide = tree / "wide"
    wide.mkdir()
    for i in range(500):
        (wide / f"{i:04d}-{'x' * (i % 40)}").write_bytes(os.urandom(i % 17))
    return tree


def large(root: Path) -> Path:
    path = root / "large"
    with open(path, "wb") as f:
        for _ in range(24):
            f.write(os.urandom(1 << 20))
        f.write(b"tail not a multiple of eight")
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("make", [odd_tree, deep_and_wide, large])
def test_the_nar_is_nix_stores_dump_byte_for_byte(make, tmp_path: Path) -> None:
    lab.require_lab()
    path = make(tmp_path)
    assert b"".join(nar.dump(str(path))) == nix_dump(path)


def test_a_symlink_and_an_empty_file_alone(tmp_path: Path) -> None:
    lab.require_lab()
    os.symlink("/nix/store/not-there/bin/sh", tmp_path / "link")
    (tmp_path / "empty").write_bytes(b"")
    for path in (tmp_path / "link", tmp_path / "empty"):
        assert b"".join(nar.dump(str(path))) == nix_dump(path)


def test_store_paths_hash_to_their_nar_hash(ssh_lab: lab.SshLab) -> None:
    """Real outputs of the lab's builds and their closures: the sha256 of our NAR
    is the NarHash Nix recorded."""
    outputs = ssh_lab.build(3, bytes_each=300_000)
    infos = nix.path_infos(sorted(outputs), recursive=True, env=ssh_lab.daemon.root_env())
    assert set(infos) >= outputs
    for path, info in infos.items():
        digest = hashlib.sha256(b"".join(nar.dump(path))).digest()
        assert ("sha256:" + nix_base32(digest), sum(map(len, nar.dump(path)))) == (
            info.nar_hash,
            info.nar_size,
        ), path
