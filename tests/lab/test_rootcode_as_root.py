"""What root runs for every build is root's alone: the rule on root's own files, and on
the installed hook of this test run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nixspool import rootcode

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the rule is about root's files")


@as_root
def test_roots_own_files_pass_and_each_way_out_is_named(tmp_path: Path) -> None:
    d = tmp_path / "venv"
    d.mkdir(mode=0o755)
    hook = d / "nixspool-hook"
    hook.write_text("")
    hook.chmod(0o755)
    assert rootcode.who_else_may_change(str(hook)) is None
    d.chmod(0o775)
    assert f"{d} is writable by group or others (mode 775)" == rootcode.who_else_may_change(
        str(hook)
    )
    d.chmod(0o755)
    os.chown(hook, 65534, 65534)
    assert rootcode.who_else_may_change(str(hook)) == f"{hook} belongs to uid 65534, not root"
    os.chown(hook, 0, 0)
    # A link is judged by where it leads too: the venv's python3 is one.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o777)
    elsewhere.chmod(0o777)
    (elsewhere / "python3").write_text("")
    (d / "python3").symlink_to(elsewhere / "python3")
    assert "writable by group or others" in (rootcode.who_else_may_change(str(d / "python3")) or "")
    # A root-owned sticky directory (/tmp) protects root's entries in it.
    assert rootcode.who_else_may_change("/tmp") is None


@as_root
def test_the_installed_hook_of_the_test_run_is_roots_alone() -> None:
    import shutil
    import sys

    hook = Path(sys.executable).parent / "nixspool-hook"
    assert hook.exists() or shutil.which("nixspool-hook")
    assert rootcode.hook_problems(str(hook)) == []
