"""The files of a static binary cache, as Nix reads them: `.narinfo`, NAR names,
`nix-cache-info`, and the order a closure is written in. Pure: no I/O here.

A cache is a directory: `<hash>.narinfo` per store path (what Nix asks for
first), `nar/<file hash>.nar.xz` with the path's contents, and `nix-cache-info`.
Nix substitutes a path from it when the narinfo is there and, with
`require-sigs`, carries a signature by a trusted key; it then fetches the NAR
the narinfo names and checks its hash. So a narinfo is written only after its
NAR, and a path's only after its references': a reader never sees a narinfo
that promises what is not there yet.
"""

from __future__ import annotations

import lzma
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from .nix import PathInfo

# What each compression is called in a narinfo, and its NAR file's extension.
EXTENSIONS = {"xz": ".xz", "zstd": ".zst", "none": ""}
CACHE_INFO = "nix-cache-info"
NAR_DIR = "nar"


def hash_part(path: str) -> str:
    """The hash of a store path, which names its narinfo: <hash>.narinfo."""
    return os.path.basename(path).split("-", 1)[0]


def narinfo_name(path: str) -> str:
    return hash_part(path) + ".narinfo"


def nar_name(file_hash: str, compression: str) -> str:
    """nar/<nix-base32 file hash>.nar.xz, as Nix names them: content-addressed, so
    two writers of one path write the same file."""
    digest = file_hash.split(":", 1)[1]
    return f"{NAR_DIR}/{digest}.nar{EXTENSIONS[compression]}"


@dataclass(frozen=True)
class Entry:
    """One path to write: its local path info and the signatures its narinfo carries.
    Crosses into the uploader (which runs as the configured user) as JSON: it never
    sees the signing key, only signatures made with it."""

    path: str
    nar_hash: str  # sha256:<nix-base32>
    nar_size: int
    references: tuple[str, ...]
    signatures: tuple[str, ...]
    deriver: str | None = None
    ca: str | None = None

    @classmethod
    def of(cls, info: PathInfo, signatures: Sequence[str]) -> Entry:
        return cls(
            info.path,
            info.nar_hash,
            info.nar_size,
            info.references,
            tuple(signatures),
            info.deriver,
            info.ca,
        )

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Entry:
        return cls(
            str(data["path"]),
            str(data["nar_hash"]),
            int(data["nar_size"]),  # type: ignore[call-overload]
            tuple(data["references"]),  # type: ignore[arg-type]
            tuple(data["signatures"]),  # type: ignore[arg-type]
            data.get("deriver"),  # type: ignore[arg-type]
            data.get("ca"),  # type: ignore[arg-type]
        )

    def text(self, url: str, compression: str, file_hash: str, file_size: int) -> str:
        """The narinfo, in the order and form Nix writes it."""
        refs = " ".join(os.path.basename(r) for r in sorted(self.references))
        lines = [
            f"StorePath: {self.path}",
            f"URL: {url}",
            f"Compression: {compression}",
            f"FileHash: {file_hash}",
            f"FileSize: {file_size}",
            f"NarHash: {self.nar_hash}",
            f"NarSize: {self.nar_size}",
            f"References: {refs}",
        ]
        if self.deriver:
            lines.append(f"Deriver: {os.path.basename(self.deriver)}")
        lines += [f"Sig: {sig}" for sig in self.signatures]
        if self.ca:
            lines.append(f"CA: {self.ca}")
        return "\n".join(lines) + "\n"


class OtherContents(Exception):
    """A narinfo there describes other contents of the path (another build of it)."""


def fields_of(text: str) -> dict[str, str]:
    """A narinfo's fields, Sig lines left out (sigs_of)."""
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        if key != "Sig":
            fields[key] = value
    return fields


def sigs_of(text: str) -> list[str]:
    return [line[len("Sig: ") :] for line in text.splitlines() if line.startswith("Sig: ")]


def with_signatures(text: str, entry: Entry) -> str | None:
    """`text` (a narinfo another writer put there) with the entry's signatures it
    lacks; None if it has them all. OtherContents if it describes other contents
    (a build of the path that differs from ours): our signatures sign our NarHash,
    so they would not verify on theirs, and theirs is left as it is."""
    if fields_of(text).get("NarHash") != entry.nar_hash:
        raise OtherContents(fields_of(text).get("NarHash", "no NarHash"))
    missing = [s for s in entry.signatures if s not in sigs_of(text)]
    if not missing:
        return None
    return text.rstrip("\n") + "\n" + "".join(f"Sig: {s}\n" for s in missing)


def cache_info(store_dir: str, priority: int = 30) -> str:
    """nix-cache-info for a new cache. WantMassQuery lets Nix ask about many paths
    at once; Priority 30 puts it before cache.nixos.org's 40 (Nix asks the lower
    first: the cache on the LAN is the nearer). A substituter URL's ?priority=
    overrides it."""
    return f"StoreDir: {store_dir}\nWantMassQuery: 1\nPriority: {priority}\n"


def store_dir_of(cache_info_text: str) -> str | None:
    for line in cache_info_text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "StoreDir":
            return value.strip()
    return None


def references_first(paths: Iterable[str], infos: Mapping[str, PathInfo]) -> list[str]:
    """`paths` ordered so that each comes after those of its references that are
    among them (a store's closure has no cycles, only self-references)."""
    wanted = set(paths)
    ordered: list[str] = []
    done: set[str] = set()
    for root in sorted(wanted):
        stack = [(root, iter(sorted(infos[root].references)))]
        if root in done:
            continue
        done.add(root)
        while stack:
            path, refs = stack[-1]
            for ref in refs:
                if ref in wanted and ref not in done:
                    done.add(ref)
                    stack.append((ref, iter(sorted(infos[ref].references))))
                    break
            else:
                stack.pop()
                ordered.append(path)
    return ordered


# zstd splits its input into jobs of 4 windows (8 MiB at level 3) to compress them on
# several cores: a smaller NAR is one job, and starting worker threads for it
# cost 0.8 ms a path (measured: 267 tiny paths, 0.21 s of a flush's 1.3 s).
ZSTD_THREADS_FROM = 16 << 20
XZ_DICT, XZ_DICT_MIN = 8 << 20, 4096  # preset 6's dictionary; liblzma's smallest


def compressor(
    compression: str, size: int | None = None
) -> tuple[Callable[[bytes], bytes], Callable[[], bytes]]:
    """(compress, flush) for a NAR of `size` bytes (None: not known): xz as Nix
    writes it (preset 6, CRC64), zstd at its default level, or none."""
    if compression == "xz":
        # Preset 6's 8 MiB dictionary, and the match finder sized for it, are set
        # up for every NAR (0.9 ms each); no match reaches back past a NAR's start,
        # so a smaller NAR gets a dictionary its own size and compresses as well.
        lzma2 = {"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": _xz_dictionary(size)}
        xz = lzma.LZMACompressor(lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, filters=[lzma2])
        return xz.compress, xz.flush
    if compression == "zstd":
        import zstandard  # only a cache writer that uses it pays for the import

        # Level 3, zstd's default; a big NAR is compressed by every core.
        threads = -1 if size is None or size >= ZSTD_THREADS_FROM else 0
        z = zstandard.ZstdCompressor(level=3, threads=threads).compressobj()
        return z.compress, z.flush
    return (lambda chunk: chunk), (lambda: b"")


def _xz_dictionary(size: int | None) -> int:
    """Preset 6's dictionary, or the power of two that holds a smaller NAR."""
    if size is None:
        return XZ_DICT
    return max(XZ_DICT_MIN, min(XZ_DICT, 1 << max(size - 1, 0).bit_length()))
