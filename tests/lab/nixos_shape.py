"""Running nixspool as a NixOS machine runs it, from the shape tests/nixos/shape.py
built: nixpkgs' wrapper, the flush unit's own environment as the module renders
it, and no /usr/bin but env and sh (ssh, nix and Python each in a directory of
their own, named by the unit's PATH alone).

`tests/run --here` builds the shape where the root's Nix can evaluate nixpkgs
(>= 2.18) and names its shape.json in NIXSPOOL_NIXOS_SHAPE.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

UNSHARE = shutil.which("unshare") or "unshare"

# The namespace: the real /usr/bin and /usr/sbin kept at REAL (where the shape's
# store directories link to), a tmpfs in their place with only what NixOS has
# there too: /usr/bin/env, and /bin/sh (/bin is usr/bin on Debian).
NAMESPACE = """
set -e
given=$PATH
PATH=/usr/bin:/bin
real=$1; shift
mkdir -p "$real/usr-bin" "$real/usr-sbin"
mount --bind /usr/bin "$real/usr-bin"
mount --bind /usr/sbin "$real/usr-sbin"
sh=$(readlink -f "$real/usr-bin/sh")
"$real/usr-bin/mount" -t tmpfs -o mode=755 tmpfs /usr/bin
"$real/usr-bin/mount" -t tmpfs -o mode=755 tmpfs /usr/sbin
"$real/usr-bin/ln" -s "$real/usr-bin/env" /usr/bin/env
"$real/usr-bin/ln" -s "$sh" /usr/bin/sh
PATH=$given
exec "$@"
"""


class NixosShape:
    """The shape shape.py built, and how NixOS would start its programs."""

    def __init__(self, shape_json: Path) -> None:
        self.built: dict[str, Any] = json.loads(shape_json.read_text())
        self.store: dict[str, str] = self.built["store"]
        self.hook: str = self.built["hook"]

    @classmethod
    def from_environment(cls) -> NixosShape | None:
        where = os.environ.get("NIXSPOOL_NIXOS_SHAPE")
        return cls(Path(where)) if where else None

    def directory(self, name: str) -> Path:
        """The directory standing for the store path whose name starts with `name`."""
        for store_path, here in self.store.items():
            if store_path.split("-", 1)[1].startswith(name):
                return Path(here)
        raise KeyError(name)

    @property
    def unit(self) -> dict[str, list[str]]:
        """The flush unit's [Service] as the module rendered it: key -> values."""
        values: dict[str, list[str]] = {}
        section = None
        for line in self.built["service"].splitlines():
            if line.startswith("["):
                section = line.strip()
            elif section == "[Service]" and "=" in line:
                key, value = line.split("=", 1)
                values.setdefault(key, []).append(value)
        return values

    def unit_environment(self) -> dict[str, str]:
        """What systemd gives the flush: the unit's Environment= lines, nothing else."""
        env = {}
        for line in self.unit.get("Environment", []):
            for assignment in shlex.split(line):
                key, value = assignment.split("=", 1)
                env[key] = value
        return env

    def exec_start(self) -> list[str]:
        (line,) = self.unit["ExecStart"]
        return shlex.split(line)

    def run(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        timeout: float = 300,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """`argv` with exactly `env`, where /usr/bin and /usr/sbin are as on NixOS."""
        return subprocess.run(
            [UNSHARE, "--mount", "--propagation", "private", "--", "/bin/sh", "-c", NAMESPACE,
             "shape", self.built["real"], *argv],
            env={"PATH": "", **env},
            text=True,
            capture_output=True,
            timeout=timeout,
            input=input,
            check=False,
        )  # fmt: skip

    def flush_unit(
        self, config: Path, *args: str, env: Mapping[str, str], timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """The flush unit's own command and environment (`env`: the lab's nix.conf
        and daemon socket, which on NixOS are at their usual places), with `args`
        in place of `flush` and the lab's config."""
        command = self.exec_start()
        if args:
            command = [command[0], *args]
        return self.run(
            [command[0], "--config", str(config), *command[1:]],
            {**self.unit_environment(), **env},
            timeout=timeout,
        )
