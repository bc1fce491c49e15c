"""A remote's filters as pure logic: names, patterns, closure sizes (the flusher
applies them against a real Nix in test_flush_ssh.py)."""

from __future__ import annotations

from nixspool import filters
from nixspool.config import ByteSize, Remote
from nixspool.nix import PathInfo

H = "0123456789abcdfghijklmnpqrsvwxyz"


def p(name: str, h: str = H) -> str:
    return f"/nix/store/{h}-{name}"


def test_the_name_is_what_follows_the_hash() -> None:
    assert filters.name_of(p("hello-2.12.1")) == "hello-2.12.1"
    assert filters.name_of(p("a-b-c.drv")) == "a-b-c.drv"


def test_exclude_wins_and_include_narrows() -> None:
    pi = Remote("pi", "ssh-ng://pi", include=("hello-*", "*-source"), exclude=("*-source",))
    assert filters.why_name_left_out(pi, p("hello-2.12")) is None
    assert "exclude pattern '*-source'" in str(filters.why_name_left_out(pi, p("hello-source")))
    assert "none of pi's include" in str(filters.why_name_left_out(pi, p("glibc-2.40")))
    everything = Remote("nas", "ssh://nas")
    assert filters.why_name_left_out(everything, p("x.drv")) is None
    # A pattern is matched against the whole name, case and all.
    assert filters.why_name_left_out(Remote("a", "ssh://a", exclude=("*.DRV",)), p("x.drv")) is None


def info(path: str, size: int, *refs: str) -> PathInfo:
    return PathInfo(path, "sha256:" + "0" * 52, size, refs, ())


def test_a_closure_weighs_each_path_once_even_in_a_cycle_or_shared() -> None:
    lib, app, tool = p("lib", "1" * 32), p("app", "2" * 32), p("tool", "3" * 32)
    infos = {
        lib: info(lib, 100, lib),  # a path that refers to itself
        app: info(app, 10, lib, app),
        tool: info(tool, 1, lib, app),
    }
    assert filters.closure_sizes([app, tool, lib], infos) == {app: 110, tool: 111, lib: 100}
    capped = Remote("pi", "ssh-ng://pi", max_size=ByteSize(110))
    assert filters.why_too_big(capped, 110) is None
    assert "closure is 111 bytes, over pi's max_size of 110 bytes" in str(
        filters.why_too_big(capped, 111)
    )
    assert filters.why_too_big(Remote("nas", "ssh://nas"), 1 << 50) is None


def signed(path: str, *keys: str, refs: tuple[str, ...] = ()) -> PathInfo:
    return PathInfo(path, "sha256:" + "0" * 52, 1, refs, tuple(f"{k}:c2ln" for k in keys))


def test_a_binary_cache_leaves_what_upstream_signed_and_keeps_the_rest_of_the_closure() -> None:
    glibc, lib, app = p("glibc", "1" * 32), p("lib", "2" * 32), p("app", "3" * 32)
    infos = {
        glibc: signed(glibc, "cache.nixos.org-1", refs=(glibc,)),
        lib: signed(lib, "builder-1", refs=(glibc,)),  # ours, on upstream's glibc
        app: signed(app, refs=(lib, glibc)),
    }
    pi = Remote("pi", "sftp://pi/c", skip_signed_by=("cache.nixos.org-1",))
    assert filters.cache_closure(pi, [app], infos) == ({app, lib}, {glibc})
    assert filters.upstream_key(pi, infos[glibc]) == "cache.nixos.org-1"
    assert filters.upstream_key(pi, infos[lib]) is None  # another key's: not upstream's
    why = filters.why_left_to_upstream(pi, infos[glibc])
    assert why == "left to upstream: signed by cache.nixos.org-1, whose cache serves it"
    everything = Remote("nas", "file:///c")
    assert filters.cache_closure(everything, [app], infos) == ({app, lib, glibc}, set())
