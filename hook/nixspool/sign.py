"""Nix-format ed25519 keys and signatures, made with pynacl.

A Nix signature signs a path's *fingerprint*:
    1;<store path>;<nar hash as sha256:nix-base32>;<nar size>;<sorted references>
and is written `<key name>:<base64 of the 64-byte signature>`. A secret key
file holds `<name>:<base64 of 64 bytes: seed, then public key>`, a public key
`<name>:<base64 of 32 bytes>` (nix-store --generate-binary-cache-key).

How signatures reach the local store, from Nix 2.8 to today: nixspool
writes a throw-away file:// binary cache whose .narinfo files carry the new
signatures, and runs `nix store copy-sigs --substituter file://...` on the
paths; Nix adds them to its database. The secret key is read by nixspool
only, never passed to another program or on a command line. Adding
signatures to the local store needs a trusted user (root is).
"""

from __future__ import annotations

import base64
import json
import os
import stat
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import nacl.exceptions
import nacl.signing

from . import nix
from .errors import SigningKeyError
from .run import run

NIX_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"


def nix_base32(data: bytes) -> str:
    """Nix's base-32 (not RFC 4648): the alphabet above, least significant first."""
    length = (len(data) * 8 - 1) // 5 + 1
    out = []
    for n in range(length - 1, -1, -1):
        bit = n * 5
        i, j = divmod(bit, 8)
        c = data[i] >> j
        if i + 1 < len(data):
            c |= data[i + 1] << (8 - j)
        out.append(NIX_BASE32[c & 0x1F])
    return "".join(out)


def nar_hash_for_fingerprint(nar_hash: str) -> str:
    """`sha256:<nix-base32>`, from any form Nix prints (SRI, base16, base32)."""
    if nar_hash.startswith("sha256-"):  # SRI, as `nix path-info --json` gives it
        return "sha256:" + nix_base32(base64.b64decode(nar_hash[len("sha256-") :]))
    algo, _, digest = nar_hash.partition(":")
    if algo == "sha256" and len(digest) == 64:  # base16
        return "sha256:" + nix_base32(bytes.fromhex(digest))
    return nar_hash  # already sha256:<nix-base32>


@dataclass(frozen=True)
class PathInfo:
    path: str
    nar_hash: str
    nar_size: int
    references: tuple[str, ...]
    signatures: tuple[str, ...]

    def fingerprint(self) -> bytes:
        refs = ",".join(sorted(self.references))
        return (
            f"1;{self.path};{nar_hash_for_fingerprint(self.nar_hash)};{self.nar_size};{refs}"
        ).encode()


@dataclass(frozen=True)
class SecretKey:
    name: str
    key: nacl.signing.SigningKey

    def __repr__(self) -> str:  # never shown, not even by accident
        return f"SecretKey({self.name!r}, <secret>)"

    @property
    def public(self) -> str:
        return f"{self.name}:{base64.b64encode(bytes(self.key.verify_key)).decode()}"

    def sign(self, info: PathInfo) -> str:
        signature = self.key.sign(info.fingerprint()).signature
        return f"{self.name}:{base64.b64encode(signature).decode()}"


def generate(name: str) -> tuple[str, str]:
    """A new key pair in Nix's format: (secret file content, public key)."""
    if not name or ":" in name or any(c.isspace() for c in name):
        raise SigningKeyError(f"key name {name!r} must be non-empty, without ':' or spaces")
    key = nacl.signing.SigningKey.generate()
    secret = base64.b64encode(bytes(key) + bytes(key.verify_key)).decode()
    return f"{name}:{secret}", SecretKey(name, key).public


def load_secret_key(path: str) -> SecretKey:
    """Read a Nix secret key file, refusing one that others can read."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise SigningKeyError(f"signing key {path}: {e.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        mode = oct(stat.S_IMODE(st.st_mode))[2:]
        raise SigningKeyError(
            f"signing key {path} is readable by group or others (mode {mode}); "
            f"run 'chmod 0600 {path}'"
        )
    with open(path) as f:
        text = f.read().strip()
    name, _, encoded = text.partition(":")
    try:
        raw = base64.b64decode(encoded, validate=True)
        if not name or len(raw) != 64:
            raise ValueError
        key = nacl.signing.SigningKey(raw[:32])
    except (ValueError, nacl.exceptions.CryptoError):
        # Say what is wrong without a single character of the key.
        raise SigningKeyError(
            f"signing key {path} is not a Nix secret key (NAME:base64 of 64 "
            "bytes); make one with `nixspool keygen`"
        ) from None
    if bytes(key.verify_key) != raw[32:]:
        raise SigningKeyError(f"signing key {path}: its public half does not match its secret half")
    return SecretKey(name, key)


def parse_public_key(text: str) -> tuple[str, nacl.signing.VerifyKey]:
    name, _, encoded = text.strip().partition(":")
    return name, nacl.signing.VerifyKey(base64.b64decode(encoded))


def verify(info: PathInfo, public_key: str) -> bool:
    """Does `info` carry a valid signature by this public key (NAME:base64)?"""
    name, verify_key = parse_public_key(public_key)
    for sig in info.signatures:
        sig_name, _, encoded = sig.partition(":")
        if sig_name != name:
            continue
        try:
            verify_key.verify(info.fingerprint(), base64.b64decode(encoded))
            return True
        except (nacl.exceptions.BadSignatureError, ValueError):
            continue
    return False


def path_infos(
    paths: Sequence[str],
    *,
    recursive: bool = False,
    store: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    **run_args: object,
) -> dict[str, PathInfo]:
    """Path info (hash, size, references, signatures) from `nix path-info --json`."""
    argv = [*nix.NIX, "path-info", "--json"]
    if recursive:
        argv.append("--recursive")
    if store:
        argv += ["--store", store]
    infos: dict[str, PathInfo] = {}
    for chunk in nix._chunks(paths):
        result = run([*argv, *chunk], env=env, timeout=timeout, **run_args)  # type: ignore[arg-type]
        for item in json.loads(result.stdout):
            if not item.get("valid", True):
                continue
            infos[item["path"]] = PathInfo(
                item["path"],
                item["narHash"],
                int(item["narSize"]),
                tuple(item.get("references", ())),
                tuple(item.get("signatures", ())),
            )
    return infos


def attach(key: SecretKey, infos: Iterable[PathInfo]) -> list[str]:
    """Sign each path that lacks a signature by `key`, into the local store.

    Returns the paths signed now. Needs a trusted user of the local store.
    """
    todo = [
        info for info in infos if not any(s.startswith(key.name + ":") for s in info.signatures)
    ]
    if not todo:
        return []
    with tempfile.TemporaryDirectory(prefix="nixspool-sigs-") as cache:
        store_dir = os.path.dirname(todo[0].path)
        with open(os.path.join(cache, "nix-cache-info"), "w") as f:
            f.write(f"StoreDir: {store_dir}\nWantMassQuery: 0\nPriority: 99\n")
        for info in todo:
            basename = os.path.basename(info.path)
            refs = " ".join(os.path.basename(r) for r in sorted(info.references))
            with open(os.path.join(cache, basename.split("-", 1)[0] + ".narinfo"), "w") as f:
                f.write(
                    f"StorePath: {info.path}\nURL: nar/{basename}.nar\nCompression: none\n"
                    f"NarHash: {nar_hash_for_fingerprint(info.nar_hash)}\n"
                    f"NarSize: {info.nar_size}\nReferences: {refs}\n"
                    f"Sig: {key.sign(info)}\n"
                )
        for chunk in nix._chunks([info.path for info in todo]):
            run(
                [*nix.NIX, "store", "copy-sigs", "--substituter", f"file://{cache}", *chunk],
                timeout=300,
            )
    return [info.path for info in todo]
