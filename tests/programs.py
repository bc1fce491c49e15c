"""The programs under test: nixspool and nixspool-hook as installed (pip install
'.[test]'), next to the interpreter running the tests. Both tiers use them."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def installed_program(name: str) -> str:
    """A program installed with nixspool, next to the interpreter running the tests."""
    candidate = Path(sys.prefix) / "bin" / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    assert found, f"{name} is not installed; run `pip install '.[test]'` first"
    return found
