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


# -- references ---------------------------------------------------------------------

ROOT = README.parent
# Files of the project that name other files of it: a rename must not leave one
# pointing nowhere (a comment citing a design document that is not in the project).
REFERRING = [
    "README.md",
    "docs/*.md",
    "hook/**/*.py",
    "hook/nixspool/data/*",
    "contrib/**/*",
    "tests/*.py",
    "tests/run",
    "tests/platform/*",
    "nix.conf.example",
    "flake.nix",
]
PATH_REFERENCE = re.compile(r"(?<![\w/.])((?:docs|hook|tests|contrib)/[\w.+-]+(?:/[\w.+-]+)*)")
NOT_PATHS = {"hook/bare"}  # a ratio's label in the benchmarks' output
ANCHOR_REFERENCE = re.compile(r"\b((?:README|docs/ARCHITECTURE)(?:\.md)?)#([a-z0-9-]+)")


def referring_files() -> list[Path]:
    found = {p for pattern in REFERRING for p in ROOT.glob(pattern) if p.is_file()}
    found.discard(Path(__file__))  # its own examples of bad references
    return sorted(p for p in found if "__pycache__" not in p.parts and p.suffix != ".pyc")


def slugs(markdown: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file."""
    headings = re.findall(r"^#+ (.+)$", markdown.read_text(), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}


def test_every_file_the_project_names_exists() -> None:
    missing = []
    for source in referring_files():
        for ref in PATH_REFERENCE.findall(source.read_text(errors="replace")):
            target = ref.rstrip(".")
            if "*" in target or target in NOT_PATHS:
                continue
            if not (ROOT / target).exists():
                missing.append(f"{source.relative_to(ROOT)}: {target}")
    assert missing == []


def test_every_section_the_project_names_exists() -> None:
    missing = []
    for source in referring_files():
        for name, anchor in ANCHOR_REFERENCE.findall(source.read_text(errors="replace")):
            doc = ROOT / (name if name.endswith(".md") else name + ".md")
            if anchor not in slugs(doc):
                missing.append(f"{source.relative_to(ROOT)}: {name}#{anchor}")
    assert missing == []


def test_the_references_checks_can_fail(tmp_path: Path) -> None:
    """The patterns find what they are meant to (else the two tests above pass on nothing)."""
    text = "see docs/NOPE.md and README#no-such-section, and tests/run"
    assert PATH_REFERENCE.findall(text) == ["docs/NOPE.md", "tests/run"]
    assert ANCHOR_REFERENCE.findall(text) == [("README", "no-such-section")]
    assert "ownership" in slugs(README)


def test_readme_table_of_keys_is_the_loaders() -> None:
    """Every top-level key, with its default as TOML writes it, and no other."""
    from nixspool.config import GLOBAL_KEYS

    table = re.search(r"Top-level keys:\n\n(.*?)\n\n", README.read_text(), re.DOTALL)
    assert table, "README has no table of top-level keys"
    rows = {}
    for line in table.group(1).splitlines()[2:]:
        key, default = (cell.strip().strip("`") for cell in line.strip("|").split("|")[:2])
        rows[key] = default
    assert list(rows) == list(GLOBAL_KEYS)
    for key, (_, default, _) in GLOBAL_KEYS.items():
        if default is None:
            continue  # spool: depends on who runs it; user: unset
        if isinstance(default, bool):
            written = str(default).lower()
        elif float(default).is_integer():  # 7776000, not 7.776e+06
            written = str(int(default))
        else:
            written = f"{default:g}"
        assert rows[key] == written, key
