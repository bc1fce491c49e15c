"""The Nix adapter: each supported Nix's command names and JSON shapes.

The tables hold the shapes each Nix prints (2.8's list, 2.19's map, 2.33's
`--json-format 2` and derivation version 4); the lab tests ask the Nix under
test itself, so each matrix entry checks its own version for real.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
from collections.abc import Callable, Sequence

import pytest

from nixspool import nix
from nixspool.errors import NixOutputError
from nixspool.hook.storepath import nix_base32
from nixspool.nix import NixVersion

STORE = "/nix/store"
A = "w0ixw1ldwjf9mgbzy1dz4prykzmk6hl7-a"
B = "qz9hbbc1w1v1nvz7l9rz4l6ks1p4r5m6-b"
DIGEST = hashlib.sha256(b"nixspool").digest()
SRI = "sha256-" + base64.b64encode(DIGEST).decode()
NIX32 = "sha256:" + nix_base32(DIGEST)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nix (Nix) 2.8.0", (2, 8, 0, False)),
        ("nix (Nix) 2.26.3\n", (2, 26, 3, False)),
        ("nix (Nix) 2.34.0pre20260101_abcdef", (2, 34, 0, False)),
        ("nix (Lix, like Nix) 2.93.3", (2, 93, 3, True)),
        ("nix (Nix) 2.30", (2, 30, 0, False)),
    ],
)
def test_version_is_parsed(text: str, expected: tuple[int, int, int, bool]) -> None:
    v = NixVersion.parse(text)
    assert (v.major, v.minor, v.patch, v.lix) == expected


@pytest.mark.parametrize(
    ("text", "at_least", "has"),
    [
        ("nix (Nix) 2.8.0", (2, 19), False),
        ("nix (Nix) 2.19.0", (2, 19), True),
        ("nix (Nix) 2.34.8", (2, 33), True),
        ("nix (Nix) 3.0.0", (2, 33), True),
        # Lix numbers itself 2.9x but keeps the command line of the 2.18 it forked from.
        ("nix (Lix, like Nix) 2.93.3", (2, 19), False),
    ],
)
def test_features_follow_the_version(text: str, at_least: tuple[int, int], has: bool) -> None:
    assert NixVersion.parse(text).has(*at_least) is has


def test_an_unreadable_version_is_a_clear_error() -> None:
    with pytest.raises(NixOutputError, match="cannot read the Nix version"):
        NixVersion.parse("command not found")


@pytest.mark.parametrize(
    "value",
    [
        SRI,
        "sha256:" + DIGEST.hex(),
        NIX32,
        {"algorithm": "sha256", "format": "base64", "hash": base64.b64encode(DIGEST).decode()},
        {"algorithm": "sha256", "format": "base16", "hash": DIGEST.hex()},
    ],
)
def test_every_nar_hash_form_gives_the_fingerprint_form(value: object) -> None:
    assert nix.normalize_nar_hash(value) == NIX32


@pytest.mark.parametrize("value", ["md5:abc", "sha256:short", 42, {"algorithm": "sha1"}])
def test_unknown_hashes_are_refused(value: object) -> None:
    with pytest.raises(ValueError):
        nix.normalize_nar_hash(value)


DRV = f"{'2' * 32}-x.drv"


def _info(**extra: object) -> dict[str, object]:
    return {"narHash": SRI, "narSize": 120, "references": [], "signatures": ["k:c2ln"], **extra}


PATH_INFO_SHAPES = {
    "2.8 list": [
        {"path": f"{STORE}/{A}", **_info(references=[f"{STORE}/{B}"], deriver=f"{STORE}/{DRV}")},
        {"path": f"{STORE}/{B}", **_info()},
        {"path": f"{STORE}/{'1' * 32}-gone", "valid": False},
    ],
    "2.19 map": {
        f"{STORE}/{A}": _info(references=[f"{STORE}/{B}"], deriver=f"{STORE}/{DRV}"),
        f"{STORE}/{B}": _info(),
        f"{STORE}/{'1' * 32}-gone": None,
    },
    "2.33 format 1": {
        "version": 1,
        "storeDir": STORE,
        f"{STORE}/{A}": _info(references=[f"{STORE}/{B}"], deriver=f"{STORE}/{DRV}"),
        f"{STORE}/{B}": _info(),
    },
    "2.33 format 2": {
        "version": 2,
        "storeDir": STORE,
        "info": {
            A: _info(references=[B], deriver=DRV),
            B: _info(ca={"method": "nar", "hash": SRI}),
            f"{'1' * 32}-gone": None,
        },
    },
    "structured signatures": {
        "version": 2,
        "storeDir": STORE,
        "info": {
            A: _info(references=[B], signatures=[{"keyName": "k", "sig": "c2ln"}], deriver=DRV),
            B: _info(),
        },
    },
}


@pytest.mark.parametrize("shape", PATH_INFO_SHAPES)
def test_path_info_of_every_nix_reads_the_same(shape: str) -> None:
    infos = nix.parse_path_infos(json.dumps(PATH_INFO_SHAPES[shape]), STORE)
    assert set(infos) == {f"{STORE}/{A}", f"{STORE}/{B}"}
    a = infos[f"{STORE}/{A}"]
    assert (a.nar_hash, a.nar_size, a.references, a.signatures, a.deriver, a.ca) == (
        NIX32,
        120,
        (f"{STORE}/{B}",),
        ("k:c2ln",),
        f"{STORE}/{DRV}",
        None,
    )


@pytest.mark.parametrize(
    ("value", "narinfo_form"),
    [
        (None, None),
        ("fixed:r:sha256:" + NIX32[7:], "fixed:r:sha256:" + NIX32[7:]),  # <= 2.32: as is
        ({"method": "nar", "hash": SRI}, "fixed:r:" + NIX32),
        ({"method": "flat", "hash": SRI}, "fixed:" + NIX32),
        ({"method": "text", "hash": SRI}, "text:" + NIX32),
        ({"method": "git", "hash": SRI}, None),  # a narinfo cannot say it: left out
    ],
)
def test_content_addresses_take_the_narinfo_form(value: object, narinfo_form: str | None) -> None:
    assert nix.normalize_ca(value) == narinfo_form


@pytest.mark.parametrize(
    "text",
    [
        "42",
        '{"info": {"not a store path": {"narHash": "x", "narSize": 1}}}',
        '[{"path": "/etc/passwd", "narHash": "sha256-x", "narSize": 1}]',
        json.dumps({f"{STORE}/{A}": _info(references=["--version"])}),
    ],
)
def test_path_info_nixspool_cannot_read_is_refused(text: str) -> None:
    with pytest.raises((ValueError, KeyError, TypeError)):
        nix.parse_path_infos(text, STORE)


DERIVATION_SHAPES = {
    "2.8 show-derivation": {f"{STORE}/{DRV}": {"outputs": {"out": {"path": f"{STORE}/{A}"}}}},
    "2.34 version 4": {
        "version": 4,
        "derivations": {DRV: {"outputs": {"out": {"path": A}, "dev": {"path": B}}}},
    },
}


def test_derivation_outputs_of_every_nix() -> None:
    old = nix.parse_derivation_outputs(json.dumps(DERIVATION_SHAPES["2.8 show-derivation"]), STORE)
    assert old == {f"{STORE}/{DRV}": [f"{STORE}/{A}"]}
    new = nix.parse_derivation_outputs(json.dumps(DERIVATION_SHAPES["2.34 version 4"]), STORE)
    assert new == {f"{STORE}/{DRV}": sorted([f"{STORE}/{A}", f"{STORE}/{B}"])}


# -- every command's argv, pinned per Nix version (as nixos-rebuild-ng's tests do) ----

NIXES = {
    "2.8": "nix (Nix) 2.8.0",
    "2.26": "nix (Nix) 2.26.3",
    "2.34": "nix (Nix) 2.34.8",
    "lix": "nix (Lix, like Nix) 2.94.0",
}
P = "/nix/store/" + "a" * 32 + "-x"
NC = ["nix", "--extra-experimental-features", "nix-command"]
PATH_INFO_JSON = {
    "2.8": [*NC, "path-info", "--json"],
    "2.26": [*NC, "path-info", "--json"],
    "2.34": [*NC, "path-info", "--json", "--json-format", "2"],  # a warning without it
    "lix": [*NC, "path-info", "--json"],
}
SHOW_DERIVATION = {
    "2.8": [*NC, "show-derivation"],
    "2.26": [*NC, "derivation", "show"],  # show-derivation: a deprecated alias
    "2.34": [*NC, "derivation", "show"],
    "lix": [*NC, "show-derivation"],
}
STORE_INFO = {
    "2.8": [*NC, "store", "ping"],
    "2.26": [*NC, "store", "info"],
    "2.34": [*NC, "store", "info"],
    "lix": [*NC, "store", "ping"],
}
CONFIG_SHOW = {
    "2.8": [*NC, "show-config"],
    "2.26": [*NC, "config", "show"],
    "2.34": [*NC, "config", "show"],
    "lix": [*NC, "show-config"],
}


def argv_of(
    monkeypatch: pytest.MonkeyPatch, version: str, call: Callable[[], object]
) -> list[list[str]]:
    """The argv `call` runs when the local Nix is `version` (its output aside)."""
    ran: list[list[str]] = []

    class Done:
        stdout = "{}"

        def wait(self) -> Done:
            return self

    def record(argv: Sequence[str], **kw: object) -> Done:
        ran.append(list(argv))
        return Done()

    monkeypatch.setattr(nix, "version", lambda: nix.NixVersion.parse(NIXES[version]))
    monkeypatch.setattr(nix, "run", record)
    monkeypatch.setattr(nix, "spawn", record)
    with contextlib.suppress(Exception):  # "{}" is no answer some callers accept
        call()
    return ran


@pytest.mark.parametrize("version", NIXES)
def test_each_command_is_run_in_the_form_this_nix_takes(
    monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    assert argv_of(monkeypatch, version, lambda: nix.path_infos([P])) == [
        [*PATH_INFO_JSON[version], "--", P]
    ]
    assert argv_of(
        monkeypatch, version, lambda: nix.path_infos([P], recursive=True, store="ssh-ng://pi")
    ) == [[*PATH_INFO_JSON[version], "--recursive", "--store", "ssh-ng://pi", "--", P]]
    assert argv_of(monkeypatch, version, lambda: nix.outputs_of_many([P + ".drv"])) == [
        [*SHOW_DERIVATION[version], "--", P + ".drv"]
    ]
    assert argv_of(monkeypatch, version, lambda: nix.store_info("ssh-ng://pi", timeout=5)) == [
        [*STORE_INFO[version], "--store", "ssh-ng://pi"]
    ]
    assert argv_of(monkeypatch, version, nix.settings) == [CONFIG_SHOW[version]]
    copy = [*NC, "copy", "--to", "ssh://pi", "--log-format", "internal-json", "--", P]
    assert argv_of(monkeypatch, version, lambda: nix.start_copy("ssh://pi", [P], timeout=5)) == [
        copy
    ]
    assert argv_of(monkeypatch, version, lambda: nix.invalid_paths([P])) == [
        ["nix-store", "--check-validity", "--print-invalid", "--", P]
    ]
