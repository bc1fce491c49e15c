"""The Nix adapter against this machine's real Nix."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import lab
from nixspool import nix
from nixspool.errors import CommandError

A = "w0ixw1ldwjf9mgbzy1dz4prykzmk6hl7-a"


# -- against the Nix under test ---------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(nix_lab: Path) -> Iterator[lab.NixDaemon]:
    d = lab.NixDaemon(nix_lab / "nix-adapter" / "nix", None)
    yield d
    d.stop()


def _client_env(daemon: lab.NixDaemon) -> dict[str, str]:
    return {**os.environ, **daemon.client_env()}


@pytest.fixture
def nix_stderr(daemon: lab.NixDaemon, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The adapter talks to the lab's daemon; what each Nix command printed on
    stderr is collected (run() keeps it from the user's terminal, not from logs)."""
    for key, value in daemon.client_env().items():
        monkeypatch.setenv(key, value)
    seen: list[str] = []
    real_run = nix.run  # type: ignore[attr-defined]  # run.run, as nix.py calls it

    def recording_run(argv, **kwargs):
        try:
            result = real_run(argv, **kwargs)
        except CommandError as e:
            seen.append(e.stderr)
            raise
        seen.append(result.stderr)
        return result

    monkeypatch.setattr(nix, "run", recording_run)
    return seen


def test_the_adapter_reads_this_nix_without_a_warning(
    daemon: lab.NixDaemon, nix_lab: Path, nix_stderr: list[str]
) -> None:
    expr = lab.write_expr(nix_lab / "nix-adapter")
    args = {"nonce": lab.nonce(), "count": "5"}
    daemon.build(expr, args)
    drvs = subprocess.run(
        ["nix-instantiate", str(expr), *[a for k, v in args.items() for a in ("--argstr", k, v)]],
        env=_client_env(daemon),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()

    resolved = nix.outputs_of_many(drvs)
    assert sorted(resolved) == sorted(drvs)
    outputs = sorted(p for paths in resolved.values() for p in paths)
    assert len(outputs) == 7  # five derivations, two of them with two outputs
    theirs = subprocess.run(
        ["nix-store", "--query", "--outputs", *drvs],
        env=_client_env(daemon),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert outputs == sorted(theirs)

    infos = nix.path_infos(outputs, recursive=True)
    assert set(outputs) <= set(infos)
    for path in outputs:  # the hash Nix's old CLI prints, in the fingerprint form
        hash_ = subprocess.run(
            ["nix-store", "--query", "--hash", path],
            env=_client_env(daemon),
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert infos[path].nar_hash == nix.normalize_nar_hash(hash_)
    assert any(infos[p].references for p in outputs), "the expression has dependencies"

    assert nix.settings()["substituters"] == ""
    assert nix_stderr, "the recorder saw the adapter's commands"
    assert not [e for e in nix_stderr if "warning" in e.lower()], nix_stderr


def test_the_adapter_puts_paths_after_a_double_dash(nix_stderr: list[str]) -> None:
    # A "path" that looks like an option must never be taken as one.
    for call in (nix.invalid_paths, nix.path_infos, nix.outputs_of_many):
        with pytest.raises(CommandError) as raised:
            call(["--version"])
        assert "nix (Nix)" not in str(raised.value) + raised.value.stderr
