"""`man nixspool` and `man 8 nixspool-hook` work after `pip install`, as a user
whose PATH has the venv's bin/ finds them: the package installs the pages that
docs/man/build.py generated, byte for byte."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import lab

pytestmark = pytest.mark.integration

PAGES = Path(__file__).parents[2] / "docs" / "man"


@pytest.mark.parametrize(("section", "name"), [("1", "nixspool"), ("8", "nixspool-hook")])
def test_man_finds_the_installed_page(section: str, name: str) -> None:
    lab.require_lab("man")
    env = {"PATH": f"{Path(sys.prefix) / 'bin'}:/usr/bin:/bin", "MAN_DISABLE_SECCOMP": "1"}
    where = subprocess.run(
        ["man", "-w", section, name], env=env, capture_output=True, text=True, timeout=60
    )
    assert where.returncode == 0, where.stderr
    installed = Path(where.stdout.strip())
    assert installed.is_relative_to(sys.prefix)
    assert installed.read_text() == (PAGES / f"{name}.{section}").read_text()
    shown = subprocess.run(
        ["man", section, name],
        env={**env, "MANPAGER": "cat", "MANWIDTH": "90"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0 and "post-build-hook" in shown.stdout, shown.stderr
