"""installation.py: whatever nixspool starts is found the same way in every kind of
installation, NixOS's included (nixpkgs' wrapper adds nixspool's code inside the
wrapped script; ssh, nix and Python are each in a directory of their own that the
unit's PATH names, and there is no /usr/bin)."""

from __future__ import annotations

import ast
import json
import os
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from nixspool import installation, privileges, run
from nixspool.errors import CommandError

PACKAGE = Path(installation.__file__).parent


def test_children_get_the_path_nixspool_was_given_then_the_usual_places(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A NixOS unit's PATH names openssh's and nix's store paths: ssh and nix copy
    run as the user must find them there (they did not: a fixed PATH left them out)."""
    unit_path = "/nix/store/aaa-nix-2.31/bin:/nix/store/bbb-openssh-10.3/bin:relative:"
    monkeypatch.setenv("PATH", unit_path)
    env = privileges.child_env(privileges.current_account())
    directories = env["PATH"].split(":")
    assert directories[:2] == ["/nix/store/aaa-nix-2.31/bin", "/nix/store/bbb-openssh-10.3/bin"]
    assert "relative" not in directories and "" not in directories
    assert directories[2:] == list(installation.USUAL_PLACES)


def test_a_program_is_found_on_the_childs_own_path_and_a_missing_one_named(
    tmp_path: Path,
) -> None:
    store_bin = tmp_path / "store-openssh" / "bin"
    store_bin.mkdir(parents=True)
    (store_bin / "ssh").write_text('#!/bin/sh\necho "ssh from the store $*"\n')
    (store_bin / "ssh").chmod(0o755)
    found = run.run(["ssh", "-V"], env={"PATH": str(store_bin)}, timeout=10)
    assert found.stdout == "ssh from the store -V\n"
    with pytest.raises(CommandError) as caught:
        run.run(["ssh", "-V"], env={"PATH": str(tmp_path)}, timeout=10)
    assert str(caught.value).startswith(f"cannot run ssh: it is not on PATH ({tmp_path})")


def bare_interpreter(where: Path) -> Path:
    """A Python with nothing but its standard library, as nixpkgs' python3 is."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(where)
    python = where / "bin" / "python"
    probe = subprocess.run(
        [python, "-I", "-c", "import nixspool"], capture_output=True, text=True, check=False
    )
    assert probe.returncode != 0, (
        "the bare interpreter imports nixspool: the test would prove nothing"
    )
    return python


def test_the_cache_writer_starts_from_an_interpreter_given_its_code_as_nixpkgs_gives_it(
    tmp_path: Path,
) -> None:
    """nixpkgs' wrapper runs the program with `site.addsitedir(...)` for nixspool and
    each of its libraries, inside the script. The writer it starts (a file:// cache
    with skip_signed_by is one nixspool writes) must import there too: before,
    `python3 -m nixspool.static_cache` failed with "Error while finding module"."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "nix-cache-info").write_text("StoreDir: /nix/store\n")
    (cache / f"{'a' * 32}.narinfo").write_text("StorePath: /nix/store/x\n")
    site_dirs = [*site.getsitepackages(), site.getusersitepackages()]
    wrapped = (
        "import site, json\n"
        f"for d in {site_dirs!r}: site.addsitedir(d)\n"
        "from nixspool import config, static_cache\n"
        "from nixspool.privileges import current_account\n"
        f"remote = config.Remote('c', 'file://{cache}', skip_signed_by=('cache.nixos.org-1',))\n"
        "assert remote.nixspool_writes\n"
        "found = static_cache.read_cache(remote, current_account(), accept_new_host_keys=False)\n"
        "print(json.dumps([found.narinfo_files, found.error]))\n"
    )
    python = bare_interpreter(tmp_path / "python3")
    result = subprocess.run(
        [python, "-I", "-c", wrapped],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [1, None]


def children_started_by_module_name(package: Path) -> list[str]:
    """Places in `package` that start `sys.executable` with "-m": that finds the
    module only where the interpreter itself has nixspool on its path."""
    found = []
    for source in package.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.List) and len(node.elts) > 1:
                first, second = node.elts[0], node.elts[1]
                if (
                    ast.unparse(first) == "sys.executable"
                    and isinstance(second, ast.Constant)
                    and second.value == "-m"
                ):
                    found.append(f"{source.relative_to(package)}:{node.lineno}")
    return found


def test_no_child_is_started_by_module_name(tmp_path: Path) -> None:
    assert children_started_by_module_name(PACKAGE) == []
    # ...and the check can fail: it finds the form it forbids.
    (tmp_path / "writer.py").write_text(
        'import sys\nspawn(\n    [sys.executable, "-m", "nixspool.static_cache"], input="")\n'
    )
    assert children_started_by_module_name(tmp_path) == ["writer.py:3"]


def test_a_python_module_child_is_named_as_python_m_in_messages() -> None:
    argv = installation.python_module("nixspool.static_cache")
    assert run.command_name(argv) == f"{Path(sys.executable).name} -m nixspool.static_cache"


def test_an_environment_without_path_searches_where_exec_would(tmp_path: Path) -> None:
    """No PATH at all is exec's default path, not an empty one (Popen's own rule)."""
    found = run.run(["sh", "-c", "echo found"], env={"HOME": str(tmp_path)}, timeout=10)
    assert found.stdout == "found\n"
