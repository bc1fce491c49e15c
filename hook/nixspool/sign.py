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
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import nacl.exceptions
import nacl.signing

from . import nix
from .errors import SigningKeyError
from .hook.files import open_to_others
from .nix import PathInfo
from .run import Account


def fingerprint(info: PathInfo) -> bytes:
    """What a Nix signature signs: `1;path;sha256:<nix-base32>;size;sorted refs`."""
    refs = ",".join(sorted(info.references))
    return f"1;{info.path};{info.nar_hash};{info.nar_size};{refs}".encode()


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
        signature = self.key.sign(fingerprint(info)).signature
        return f"{self.name}:{base64.b64encode(signature).decode()}"


def signatures_with_ours(key: SecretKey, info: PathInfo) -> tuple[str, ...]:
    """The path's signatures, ours made now in place of any older one by our key's
    name: what a narinfo nixspool writes carries (no store is changed)."""
    others = tuple(s for s in info.signatures if not s.startswith(key.name + ":"))
    return (*others, key.sign(info))


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
    if open_to_others(st.st_mode):
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
            verify_key.verify(fingerprint(info), base64.b64decode(encoded))
            return True
        except (nacl.exceptions.BadSignatureError, ValueError):
            continue
    return False


def attach(key: SecretKey, infos: Iterable[PathInfo]) -> list[str]:
    """Sign each path that lacks a valid signature by `key`, into the local store.

    Valid, not merely named: after a key is replaced by a new one of the same name,
    the paths the old one signed carry a signature the remote rejects.
    Returns the paths signed now. Needs a trusted user of the local store.
    """
    todo = [info for info in infos if not verify(info, key.public)]
    if todo:
        with _signature_cache(key, todo) as cache:
            nix.copy_sigs(f"file://{cache}", [info.path for info in todo])
    return [info.path for info in todo]


def push(
    key: SecretKey,
    infos: Sequence[PathInfo],
    store: str,
    *,
    env: Mapping[str, str],
    account: Account,
    timeout: float,
) -> None:
    """Add our signature of each path to the store at URL `store`, which has the paths
    already: Nix adds no signature to a path a store has when it is copied again
    (NixOS/nix#4981). `infos` are the local store's: Nix adds a signature only where
    the remote's hash, size and references are the same. CommandError if the store
    refuses (ssh:// cannot add signatures; a daemon needs a trusted user)."""
    if infos:
        with _signature_cache(key, infos, owner=account) as cache:
            nix.copy_sigs(
                f"file://{cache}",
                [info.path for info in infos],
                store=store,
                env=env,
                account=account,
                timeout=timeout,
            )


@contextmanager
def _signature_cache(
    key: SecretKey, infos: Sequence[PathInfo], owner: Account | None = None
) -> Iterator[str]:
    """A throw-away file:// binary cache whose .narinfo files carry our signatures of
    `infos` (no NARs: `nix store copy-sigs` reads only the narinfo). Given to `owner`,
    who runs Nix on it (Nix creates its nar/ and log/ directories when it opens it)."""
    with tempfile.TemporaryDirectory(prefix="nixspool-sigs-") as cache:
        store_dir = os.path.dirname(infos[0].path)
        with open(os.path.join(cache, "nix-cache-info"), "w") as f:
            f.write(f"StoreDir: {store_dir}\nWantMassQuery: 0\nPriority: 99\n")
        for info in infos:
            basename = os.path.basename(info.path)
            refs = " ".join(os.path.basename(r) for r in sorted(info.references))
            with open(os.path.join(cache, basename.split("-", 1)[0] + ".narinfo"), "w") as f:
                f.write(
                    f"StorePath: {info.path}\nURL: nar/{basename}.nar\nCompression: none\n"
                    f"NarHash: {info.nar_hash}\n"
                    f"NarSize: {info.nar_size}\nReferences: {refs}\n"
                    f"Sig: {key.sign(info)}\n"
                )
        if owner is not None and owner.uid != os.geteuid():
            for name in [".", *os.listdir(cache)]:
                os.chown(os.path.join(cache, name), owner.uid, owner.gid)
        yield cache
