"""What root runs for every build must be root's alone (rootcode.py): the rule on
real files and directories."""

from __future__ import annotations

from pathlib import Path

from nixspool import rootcode


def test_a_file_in_a_directory_anyone_may_write_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o777)
    (d / "hook").write_text("")
    assert rootcode.who_else_may_change(str(d / "hook")) is not None


def test_root_runs_the_compiled_package_and_the_venvs_idea_of_python(tmp_path: Path) -> None:
    """A .pyc in __pycache__ is loaded without its .py; pyvenv.cfg's `home` decides
    which Python's standard library root loads: each is checked, as the .py is."""
    import nixspool

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "nixspool-hook").write_text("")
    (venv / "pyvenv.cfg").write_text(
        "home = /opt/python/bin\ninclude-system-site-packages = false\n"
    )
    checked = rootcode.what_root_runs(str(venv / "bin" / "nixspool-hook"))
    assert str(venv / "pyvenv.cfg") in checked and "/opt/python/bin" in checked
    package = Path(nixspool.__file__).parent
    compiled = [p for p in checked if "__pycache__" in p and p.endswith(".pyc")]
    assert compiled and all(Path(p).is_relative_to(package) for p in compiled)
    assert str(package / "hook" / "main.py") in checked
    assert any(Path(p).name == "lib-dynload" for p in checked)
