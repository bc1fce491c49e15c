"""Signing: Nix-format keys, signatures identical to Nix's, signed and verified uploads."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import nacl.signing
import pytest

from nixspool import sign
from nixspool.errors import SigningKeyError
from programs import installed_program


def test_keygen_writes_safe_files_and_never_the_secret(tmp_path: Path) -> None:
    nixspool = installed_program("nixspool")
    result = subprocess.run(
        [nixspool, "keygen", "k1", "--out", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    secret = (tmp_path / "k1.sec").read_text().strip()
    assert oct((tmp_path / "k1.sec").stat().st_mode & 0o777) == "0o600"
    assert secret.split(":")[1] not in result.stdout + result.stderr
    public = (tmp_path / "k1.pub").read_text().strip()
    assert public in result.stdout
    assert len(base64.b64decode(secret.split(":")[1])) == 64
    assert len(base64.b64decode(public.split(":")[1])) == 32
    again = subprocess.run(
        [nixspool, "keygen", "k1", "--out", str(tmp_path)], capture_output=True, text=True
    )
    assert again.returncode == 2 and "exists; pass --force" in again.stderr
    assert (tmp_path / "k1.sec").read_text().strip() == secret  # untouched
    forced = subprocess.run(
        [nixspool, "keygen", "k1", "--out", str(tmp_path), "--force"],
        capture_output=True,
        text=True,
    )
    assert forced.returncode == 0 and (tmp_path / "k1.sec").read_text().strip() != secret


def test_a_key_others_can_read_is_refused_with_the_fix(tmp_path: Path) -> None:
    secret, _ = sign.generate("k")
    path = tmp_path / "k.sec"
    path.write_text(secret)
    path.chmod(0o644)
    with pytest.raises(SigningKeyError, match=r"readable by group or others.*chmod 0600"):
        sign.load_secret_key(str(path))


def test_a_malformed_key_is_refused_without_showing_it(tmp_path: Path) -> None:
    path = tmp_path / "k.sec"
    path.write_text("k:c2VjcmV0LWJ1dC13cm9uZy1sZW5ndGg=")
    path.chmod(0o600)
    with pytest.raises(SigningKeyError) as error:
        sign.load_secret_key(str(path))
    assert "c2VjcmV0" not in str(error.value) and "not a Nix secret key" in str(error.value)
    assert "<secret>" in repr(sign.SecretKey("k", nacl.signing.SigningKey.generate()))
