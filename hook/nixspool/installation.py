"""How this installation finds what it starts: programs (nix, ssh, sftp) and its
own Python code in a child interpreter (the cache writer).

Installations differ. A venv or pip --user puts nixspool beside an interpreter
that finds it by itself; Debian has ssh in /usr/bin. The NixOS package does
neither: nixpkgs' wrapper adds nixspool's and its libraries' site-packages
inside the wrapped script (site.addsitedir), so a bare `python3 -m nixspool...`
started from it finds nothing; and ssh, nix and Python live in store paths of
their own, which the unit's PATH (the module's `path`) names, with no /usr/bin.

So, one rule for every installation:

- A program is found on the PATH nixspool itself was started with (the unit's
  PATH, the person's shell; as root, root decided it), then on the usual
  places (search_path()). Children get that same PATH, so a `nix copy` finds
  the ssh its parent would.
- A child interpreter is given this interpreter's import path (python_module()),
  as the wrapper gave it to this one: whatever imported here imports there.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

# Where programs are when the PATH nixspool was given lacks them: the usual
# directories of a Debian-like system, then NixOS's system profile (a person's
# `sudo nixspool` there) and the multi-user installer's profile (Nix on another
# distribution). Each is root's to write.
USUAL_PLACES = (
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
    "/run/current-system/sw/bin",
    "/nix/var/nix/profiles/default/bin",
)

# The child's first lines: the parent's import path, as nixpkgs' wrapper adds it
# (site.addsitedir, which reads the .pth files there too), then the module as
# `python -m` would run it. -I keeps the user's PYTHON* variables and site out.
_BOOT = (
    "import runpy, site, sys\n"
    "module, *paths = sys.argv[1:]\n"
    "for path in paths:\n"
    "    if path not in sys.path: site.addsitedir(path)\n"
    "sys.argv[1:] = []\n"
    "runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
)


def search_path(environ: Mapping[str, str] | None = None) -> str:
    """The PATH programs are found on, by nixspool and by its children: the one it
    was given (absolute directories only: a relative one would depend on the
    working directory), then USUAL_PLACES."""
    given = (os.environ if environ is None else environ).get("PATH", "")
    directories = [d for d in given.split(os.pathsep) if d.startswith("/")]
    return os.pathsep.join(dict.fromkeys([*directories, *USUAL_PLACES]))


def python_module(module: str) -> list[str]:
    """The argv that runs `module` as `python -m` would, in a new interpreter that
    imports what this one imports, however this installation gave it its code."""
    return [sys.executable, "-I", "-c", _BOOT, module, *(p for p in sys.path if p)]


def module_of(argv: list[str]) -> str | None:
    """The module a python_module() argv runs, for messages; None for others."""
    return argv[4] if len(argv) > 4 and argv[1:4] == ["-I", "-c", _BOOT] else None
