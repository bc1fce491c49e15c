"""A path's NAR (Nix ARchive), serialised here, streaming, without a process.

The format is Nix's (the thesis, and src/libutil/archive.cc): every field is a
string, written as its length (8 bytes, little-endian), its bytes, and zeros to
the next multiple of 8. A file system object is

    "(" "type" "regular" ["executable" ""] "contents" <the file's bytes> ")"
    "(" "type" "symlink" "target" <the link's target> ")"
    "(" "type" "directory" { "entry" "(" "name" <name> "node" <object> ")" } ")"

with a directory's entries in the byte order of their names, and the whole
preceded by "nix-archive-1". The sha256 of it is the path's NarHash, which the
cache writer checks before it writes a narinfo: a NAR made wrongly here is never
published, it fails its path. `nix-store --dump` makes the same bytes (the lab's
test_nar.py compares them on every Nix of the matrix); the writer falls back to
it for a path it cannot read from here.

A `nix-store --dump` per path costs a process start, and a cache of many small
paths is mostly process starts; this costs a few system calls per file.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Generator, Iterator

from .run import stream

MAGIC = b"nix-archive-1"
CHUNK = 1 << 20


def _string(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data + b"\0" * (-len(data) % 8)


def _strings(*fields: bytes) -> bytes:
    return b"".join(_string(f) for f in fields)


class ChangedWhileRead(OSError):
    """A file's size changed while its NAR was made (a store path never changes:
    something is wrong with this one)."""


def dump(path: str) -> Generator[bytes, None, None]:
    """The NAR of `path`, in chunks (at most CHUNK bytes of a file's contents each).
    OSError at once if the path cannot be seen (the caller may then read it another
    way), or while the chunks are made if a part of it cannot be read."""
    top = os.fsencode(path)
    return _archive(top, os.lstat(top))


def _archive(top: bytes, st: os.stat_result) -> Generator[bytes, None, None]:
    yield _string(MAGIC)
    yield from _object(top, st)


def _object(path: bytes, st: os.stat_result | None = None) -> Iterator[bytes]:
    st = st or os.lstat(path)
    if stat.S_ISREG(st.st_mode):
        executable = st.st_mode & stat.S_IXUSR
        yield _strings(b"(", b"type", b"regular", *((b"executable", b"") if executable else ()))
        yield _string(b"contents")
        yield from _contents(path, st.st_size)
        yield _string(b")")
    elif stat.S_ISLNK(st.st_mode):
        yield _strings(b"(", b"type", b"symlink", b"target", os.readlink(path), b")")
    elif stat.S_ISDIR(st.st_mode):
        yield _strings(b"(", b"type", b"directory")
        for name in sorted(os.listdir(path)):
            yield _strings(b"entry", b"(", b"name", name, b"node")
            yield from _object(path + b"/" + name)
            yield _string(b")")
        yield _string(b")")
    else:
        raise OSError(f"{os.fsdecode(path)}: not a regular file, symlink or directory")


def _contents(path: bytes, size: int) -> Iterator[bytes]:
    """A file's bytes as a NAR string: the length, the bytes in chunks, the padding."""
    yield struct.pack("<Q", size)
    left = size
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        while left:
            chunk = os.read(fd, min(CHUNK, left))
            if not chunk:
                break
            left -= len(chunk)
            yield chunk
        if left or os.read(fd, 1):
            raise ChangedWhileRead(f"{os.fsdecode(path)} changed size while it was read")
    finally:
        os.close(fd)
    if size % 8:
        yield b"\0" * (-size % 8)


def dump_by_nix(path: str, chunk_size: int = 1 << 20) -> Generator[bytes, None, None]:
    """The NAR of a store path (its serialisation, whose sha256 is the path's
    NarHash) as `nix-store --dump` writes it, in chunks; CommandError if it fails.
    (dump() makes the same bytes without a process: the cache writer's way.)"""
    dumping = stream(["nix-store", "--dump", "--", path])
    try:
        while chunk := dumping.stdout.read(chunk_size):
            yield chunk
    except BaseException:
        dumping.kill()
        raise
    dumping.finish()
