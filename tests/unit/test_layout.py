"""The house rule on size, kept by a test rather than by memory: no module of the
package over 450 lines, no class over 250. A newcomer finds their way in a
codebase whose parts each fit in a head."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[2] / "hook" / "nixspool"
MODULE_LINES = 450
CLASS_LINES = 250


def test_no_module_over_450_lines() -> None:
    sizes = {p: p.read_text().count("\n") for p in PACKAGE.rglob("*.py")}
    assert sizes, "found no modules: the path is wrong"
    assert {str(p.relative_to(PACKAGE)): n for p, n in sizes.items() if n > MODULE_LINES} == {}


def test_no_class_over_250_lines() -> None:
    big = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > CLASS_LINES:
                    big[f"{path.relative_to(PACKAGE)}:{node.name}"] = size
    assert big == {}
