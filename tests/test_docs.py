"""README and the code check each other: every command's --help is in README.md.

After changing a command, print the README's command reference with
    python tests/test_docs.py
and paste it over the section "Command reference".
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from nixspool.cli import app

README = Path(__file__).parents[1] / "README.md"


def commands() -> list[str]:
    return [c.name or c.callback.__name__ for c in app.registered_commands if c.callback]


def help_text(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], terminal_width=88, prog_name="nixspool")
    assert result.exit_code == 0, result.output
    return result.stdout.rstrip() + "\n"


def reference() -> str:
    parts = ["```console\n$ nixspool --help\n" + help_text() + "```\n"]
    for name in commands():
        parts.append(
            f"### nixspool {name}\n\n```console\n$ nixspool {name} --help\n{help_text(name)}```\n"
        )
    return "\n".join(parts)


def test_readme_has_every_commands_help() -> None:
    readme = README.read_text()
    for args in [(), *((name,) for name in commands())]:
        block = f"$ nixspool {' '.join(args)} --help\n".replace("  ", " ") + help_text(*args)
        assert block in readme, (
            f"README.md lacks the current `nixspool {' '.join(args)} "
            "--help`; run `python tests/test_docs.py` and paste it"
        )


def test_readme_anchors_named_in_error_messages_exist() -> None:
    readme = README.read_text()
    headings = {
        re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", readme, re.MULTILINE)
    }
    sources = "\n".join(p.read_text() for p in (Path(__file__).parents[1] / "hook").rglob("*.py"))
    for anchor in set(re.findall(r"README#([a-z0-9-]+)", sources)):
        assert anchor in headings, f"README.md has no section for README#{anchor}"


@pytest.mark.parametrize("name", ["nixspool", "nixspool-hook"])
def test_readme_names_both_programs(name: str) -> None:
    assert f"`{name}`" in README.read_text()


if __name__ == "__main__":
    typer.echo(reference(), nl=False)
