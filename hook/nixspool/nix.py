"""What nixspool asks of the local Nix: outputs, validity, copies.

Written against Nix 2.8 (Debian 12) and later: only commands and flags that
every version since has.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from .errors import CommandError
from .run import Account, Running, run, spawn

# `nix copy` is behind the nix-command feature on 2.4 and later; naming it
# explicitly keeps nixspool independent of the user's nix.conf.
NIX = ("nix", "--extra-experimental-features", "nix-command")
# Keep each argv far below ARG_MAX (2 MiB), whatever the batch size.
ARGV_CHUNK = 2000


def _chunks(items: Sequence[str], size: int = ARGV_CHUNK) -> list[Sequence[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def outputs_of(drv_path: str, timeout: float = 60) -> list[str]:
    """The output paths of a derivation (for Nix 2.8.0's empty OUT_PATHS)."""
    result = run(["nix-store", "--query", "--outputs", drv_path], timeout=timeout)
    return result.stdout.split()


def outputs_of_many(drv_paths: Sequence[str], timeout: float = 120) -> dict[str, list[str]]:
    """{drv: its outputs} in one `nix show-derivation` per chunk.

    CommandError if any of them is not valid: the caller then asks one by one.
    """
    outputs: dict[str, list[str]] = {}
    for chunk in _chunks(drv_paths):
        shown = json.loads(run([*NIX, "show-derivation", *chunk], timeout=timeout).stdout)
        for drv, info in shown.items():
            outputs[drv] = sorted(o["path"] for o in info["outputs"].values() if o.get("path"))
    if set(outputs) != set(drv_paths):
        raise CommandError("nix show-derivation did not describe every derivation")
    return outputs


def invalid_paths(paths: Sequence[str], timeout: float = 60) -> set[str]:
    """The paths that are not (or no longer) valid in the local store."""
    invalid: set[str] = set()
    for chunk in _chunks(paths):
        result = run(["nix-store", "--check-validity", "--print-invalid", *chunk], timeout=timeout)
        invalid.update(result.stdout.split())
    return invalid


def start_copy(
    url: str,
    paths: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    account: Account | None = None,
) -> Running:
    """Start `nix copy --to url paths`: their closures too; what the remote has is skipped."""
    return spawn([*NIX, "copy", "--to", url, *paths], timeout=timeout, env=env, account=account)


def version() -> str:
    return run(["nix", "--version"], timeout=30).stdout.strip()
