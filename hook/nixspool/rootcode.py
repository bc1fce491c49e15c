"""What root runs for every build must be root's alone.

nix-daemon runs the post-build-hook as root: the hook file, the Python beside it
and the nixspool package it imports. Whoever can change any of them, or any
directory above them, runs code as root on the next build, as sshd's StrictModes
reasons about ~/.ssh. `nixspool doctor` fails on such a hook and `nixspool setup`
says so before it writes the hook line.
"""

from __future__ import annotations

import os
import stat
import sysconfig

import nixspool


def who_else_may_change(path: str) -> str | None:
    """Why someone but root could change `path` (the file, what its links lead to,
    or a directory above either), or None. A root-owned directory with the sticky
    bit (/tmp) protects the root-owned entries in it."""
    seen: set[str] = set()
    for candidate in (os.path.abspath(path), os.path.realpath(path)):
        here = candidate
        while here not in seen:
            seen.add(here)
            try:
                st = os.lstat(here)
            except OSError as e:
                return f"{here}: {e.strerror}"
            if st.st_uid != 0:
                return f"{here} belongs to uid {st.st_uid}, not root"
            writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
            sticky = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
            if writable and not stat.S_ISLNK(st.st_mode) and not sticky:
                mode = oct(stat.S_IMODE(st.st_mode))[2:]
                return f"{here} is writable by group or others (mode {mode})"
            if here == "/":
                break
            here = os.path.dirname(here)
    return None


def what_root_runs(hook: str) -> list[str]:
    """What root loads when Nix runs `hook`: the file, the python3 beside it, the
    venv's pyvenv.cfg (its `home =` decides which Python, so which standard
    library) with that home and the standard library, and every file of the
    nixspool package (the hook imports it), compiled ones in __pycache__ included:
    Python loads a .pyc it finds current without reading the .py."""
    package = os.path.dirname(nixspool.__file__)
    venv = os.path.dirname(os.path.dirname(os.path.abspath(hook)))
    paths = [hook, os.path.join(os.path.dirname(hook), "python3"), package]
    pyvenv = os.path.join(venv, "pyvenv.cfg")
    if os.path.exists(pyvenv):
        paths.append(pyvenv)
        with open(pyvenv) as f:
            for line in f:
                key, _, value = line.partition("=")
                if key.strip() == "home" and value.strip():
                    paths.append(value.strip())
    paths += [sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib")]
    paths.append(os.path.join(sysconfig.get_path("platstdlib"), "lib-dynload"))
    for directory, _, names in os.walk(package):
        paths += [os.path.join(directory, name) for name in names]
    return list(dict.fromkeys(paths))


def hook_problems(hook: str) -> list[str]:
    """Who else could change what root runs as `hook` (what_root_runs)."""
    paths = what_root_runs(hook)
    problems = [why for p in paths if os.path.exists(p) and (why := who_else_may_change(p))]
    return list(dict.fromkeys(problems))


def installation_problems(hook: str, nixspool_program: str) -> list[str]:
    """hook_problems, and the `nixspool` program the units and dispatcher run as root."""
    program = who_else_may_change(nixspool_program) if os.path.exists(nixspool_program) else None
    return list(dict.fromkeys([*hook_problems(hook), *([program] if program else [])]))
