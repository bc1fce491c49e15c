"""The files of a static binary cache, as pure logic (test_sftp_cache.py has a real
Nix read what nixspool writes)."""

from __future__ import annotations

import lzma
import os

import pytest
import zstandard

from nixspool import narinfo
from nixspool.narinfo import Entry
from nixspool.nix import PathInfo

STORE = "/nix/store"
HASH = "sha256:" + "1" * 52


def p(index: int, name: str) -> str:
    return f"{STORE}/{str(index) * 32}-{name}"


def info(path: str, *refs: str) -> PathInfo:
    return PathInfo(path, HASH, 128, refs, (), None, None)


def test_a_narinfo_is_written_as_nix_writes_it() -> None:
    app, lib = p(1, "app"), p(2, "lib")
    entry = Entry.of(
        PathInfo(app, HASH, 128, (lib, app), ("old:c2ln",), p(3, "app.drv"), "fixed:r:" + HASH),
        ["old:c2ln", "ours:c2ln"],
    )
    text = entry.text("nar/abc.nar.xz", "xz", "sha256:" + "2" * 52, 64)
    assert text == (
        f"StorePath: {app}\n"
        "URL: nar/abc.nar.xz\n"
        "Compression: xz\n"
        f"FileHash: sha256:{'2' * 52}\n"
        "FileSize: 64\n"
        f"NarHash: {HASH}\n"
        "NarSize: 128\n"
        f"References: {'1' * 32}-app {'2' * 32}-lib\n"
        f"Deriver: {'3' * 32}-app.drv\n"
        "Sig: old:c2ln\n"
        "Sig: ours:c2ln\n"
        f"CA: fixed:r:{HASH}\n"
    )
    assert Entry.from_json(entry.__dict__) == entry  # what crosses to the writer
    assert narinfo.narinfo_name(app) == "1" * 32 + ".narinfo"
    assert narinfo.nar_name("sha256:" + "2" * 52, "zstd") == f"nar/{'2' * 52}.nar.zst"
    assert narinfo.nar_name("sha256:" + "2" * 52, "none") == f"nar/{'2' * 52}.nar"


def test_a_path_without_references_or_deriver_says_so_plainly() -> None:
    text = Entry.of(info(p(1, "x")), []).text("nar/a.nar", "none", HASH, 128)
    assert "References: \n" in text
    assert "Deriver" not in text and "Sig" not in text and "CA" not in text


def test_references_come_first_and_only_the_wanted_are_ordered() -> None:
    a, b, c, d = p(1, "a"), p(2, "b"), p(3, "c"), p(4, "d")
    # d -> c -> b -> a, d -> a, and every path refers to itself
    infos = {a: info(a, a), b: info(b, a, b), c: info(c, b, c), d: info(d, a, c, d)}
    order = narinfo.references_first([d, c, b, a], infos)
    assert order == [a, b, c, d]
    assert narinfo.references_first([d, b], infos) == [b, d]  # c not wanted: not written


def test_the_store_dir_of_a_cache_is_read_from_nix_cache_info() -> None:
    text = narinfo.cache_info("/nix/store")
    assert narinfo.store_dir_of(text) == "/nix/store"
    assert "WantMassQuery: 1" in text
    assert narinfo.store_dir_of("Priority: 40\n") is None


def test_an_upload_request_crosses_to_the_writer_whole() -> None:
    import json
    from dataclasses import asdict, replace
    from types import SimpleNamespace
    from typing import Any, cast

    from nixspool import static_cache
    from nixspool.probe import SshCommand
    from nixspool.run import Running
    from nixspool.static_cache import UploadRequest

    entry = Entry.of(info(p(1, "app"), p(2, "lib")), ["ours:c2ln"])
    ssh = SshCommand(("-o", "BatchMode=yes"), "ssh://u@pi:2222", 3.0)
    for login in (ssh, None):
        # Where, as start_writer() writes it first; then what, as send() leaves it.
        where = UploadRequest(login, "/c", "xz", STORE, [], check_only=login is None)
        request = UploadRequest.from_json(json.dumps(asdict(where)) + "\n")
        assert request == where
        wire: Any = SimpleNamespace(input=None)
        static_cache.send(cast(Running, wire), [entry], [entry.path])
        request.take_batch(wire.input)
        assert request == replace(where, entries=[entry], sign_present=[entry.path])
        request.take_batch("")  # no batch came: nothing changes
        assert request.entries == [entry]


@pytest.mark.parametrize("size", [None, 300, 1 << 18, narinfo.ZSTD_THREADS_FROM])
@pytest.mark.parametrize("compression", ["zstd", "xz"])
def test_a_nar_of_any_size_reads_back(compression: str, size: int | None) -> None:
    data = (os.urandom(1 << 16) * 4 + b"end")[: size or None]
    compress, flush = narinfo.compressor(compression, size)
    out = compress(data[:1000]) + compress(data[1000:]) + flush()
    if compression == "xz":
        assert lzma.decompress(out, format=lzma.FORMAT_XZ) == data
    else:
        assert zstandard.ZstdDecompressor().decompressobj().decompress(out) == data


def test_a_small_nar_compresses_as_well_with_a_dictionary_its_own_size() -> None:
    data = b"".join(b"%d nixspool " % (i % 97) for i in range(20000))  # 230 KB, repetitive
    ours, flush = narinfo.compressor("xz", len(data))
    theirs = lzma.LZMACompressor(lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=6)
    assert len(ours(data) + flush()) <= len(theirs.compress(data) + theirs.flush())
