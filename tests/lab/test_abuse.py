"""Abuse: whatever reaches the hook through its environment, the installed hook, run as
a process as Nix runs it, exits 0 without a traceback and records exactly the valid
store paths.

The oracle is a regular expression written from Nix's rules (nix/src/libstore/path.cc),
not the hook's own check. Cases come in batches run side by side (the hook is a
process each time): 3,400 in each root of the matrix, 10,200 in a CI run. The hook
does not call Nix; what changes between roots is Python.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import lab
from nixspool.spool import Spool

pytestmark = pytest.mark.integration

BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"
NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-._?="
STORE_PATH = re.compile(rb"/nix/store/[0-9a-df-np-sv-z]{32}-(?!\.)[A-Za-z0-9+\-._?=]{1,211}")
ARG_MAX_STRLEN = 128 * 1024  # the kernel's bound on one environment string
BATCH = 20

CASES = 3_400


def valid(token: bytes) -> bool:
    return STORE_PATH.fullmatch(token) is not None


hashes = st.text(BASE32, min_size=32, max_size=32)
names = st.text(NAME_CHARS, min_size=1, max_size=211).filter(lambda n: not n.startswith("."))
store_paths = st.builds(lambda h, n: f"/nix/store/{h}-{n}".encode(), hashes, names)
# One valid path with one byte changed, cut, or grown: the near misses.
near_misses = st.builds(
    lambda p, i, b: (p[:i] + bytes([b]) + p[i + 1 :])[: max(1, len(p) - (b % 3))],
    store_paths,
    st.integers(0, 60),
    st.integers(1, 255),
)
anything = st.one_of(
    st.binary(min_size=1, max_size=300).map(lambda b: b.replace(b"\0", b"")),
    st.text(min_size=1, max_size=200).map(lambda t: t.replace("\0", "").encode("utf-8")),
    st.sampled_from(
        [b"/nix/store/../../etc/shadow", b"--store", b"-", b"/nix/store/", b"\n", b"\t", b" "]
    ),
)
tokens = st.one_of(store_paths, store_paths, near_misses, anything)
separators = st.sampled_from([b" ", b" ", b" ", b"  ", b"\t", b"\n"])


@st.composite
def out_paths(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 49)) == 0:  # now and then, a list near the kernel's limit
        count, salt = draw(st.integers(1000, 2800)), draw(st.integers(0, 10**6))
        paths = [
            f"/nix/store/{BASE32[i % 32] * 31}{BASE32[salt % 32]}-big-{salt}-{i}".encode()
            for i in range(count)
        ]
        value = b" ".join(paths)
    else:
        parts = draw(st.lists(st.tuples(tokens, separators), max_size=12))
        value = b"".join(token + sep for token, sep in parts)
    # The bound counts "OUT_PATHS=" and the terminating NUL too.
    return value[: ARG_MAX_STRLEN - len(b"OUT_PATHS=") - 1].replace(b"\0", b"")


derivations = st.one_of(
    st.just(b""),
    store_paths.map(lambda p: p + b".drv"),
    near_misses,
    anything,
)


def expected(drv: bytes, outs: bytes) -> set[bytes]:
    found = {token for token in outs.split(b" ") if valid(token)}
    if not found and valid(drv) and drv.endswith(b".drv"):
        return {drv}  # Nix 2.8.0 gives DRV_PATH alone: the flusher resolves it
    return found


def recorded(spool: Path) -> set[bytes]:
    with sqlite3.connect(spool) as db:
        db.text_factory = bytes
        return {row[0] for row in db.execute("SELECT path FROM paths")}


@settings(
    max_examples=CASES // BATCH,
    deadline=None,
    # Shrinking reruns whole batches of processes for minutes; a failure prints
    # its batch, and each assertion names the case.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(st.tuples(derivations, out_paths()), min_size=BATCH, max_size=BATCH))
def test_the_installed_hook_records_exactly_the_valid_store_paths(
    batch: list[tuple[bytes, bytes]],
) -> None:
    hook = lab.installed_program("nixspool-hook")
    with tempfile.TemporaryDirectory(prefix="nixspool-abuse-") as work:
        spool = Path(work) / "spool" / "spool.sqlite"
        Spool.open(str(spool)).close()
        config = Path(work) / "config.toml"
        config.write_text(f'spool = "{spool}"\n')

        def run(case: tuple[bytes, bytes]) -> subprocess.CompletedProcess[bytes]:
            drv, outs = case
            env = {b"PATH": b"/usr/bin:/bin", b"NIXSPOOL_CONFIG": bytes(config)}
            env.update({b"DRV_PATH": drv, b"OUT_PATHS": outs})
            return subprocess.run(
                [hook], env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=60
            )

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(run, batch))
        for case, result in zip(batch, results, strict=True):
            assert result.returncode == 0, (case, result.stderr)
            assert b"Traceback" not in result.stderr, (case, result.stderr)
            assert result.stdout == b"", case
            assert len(result.stderr.splitlines()) <= 1, (case, result.stderr)
            if expected(*case):
                assert result.stderr == b"", (case, result.stderr)  # silent on success
        want = set().union(*(expected(*case) for case in batch))
        assert recorded(spool) == want
