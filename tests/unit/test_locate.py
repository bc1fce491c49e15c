"""The hook's cheap config reading must agree with tomllib, or defer to it."""

from __future__ import annotations

import tomllib
from pathlib import Path

import platformdirs
import pytest

from nixspool.hook import locate


@pytest.mark.parametrize(
    "text",
    [
        'spool = "/var/lib/nixspool/spool.sqlite"\n',
        "spool = '/srv/spool.sqlite'\n",
        'spool="/a/b.sqlite"   # comment\n',
        '# spool = "/commented/out"\nuser = "alice"\n',
        'user = "alice"\n\n[remotes.pi]\nurl = "ssh-ng://pi"\nspool = "/not/top/level"\n',
        'spool = "/a#not-a-comment"\n',
        "",
        '[remotes.pi]\nurl = "ssh-ng://pi"\n',
    ],
)
def test_fast_scanner_reads_simple_forms_exactly(text: str) -> None:
    assert locate.spool_from_text(text) == tomllib.loads(text).get("spool")


@pytest.mark.parametrize(
    "text",
    [
        'spool = "/with\\\\escape"\n',
        '"spool" = "/quoted/key"\n',
        'spool.x = "/dotted"\n',
        'user = """\n[not a table]\n"""\nspool = "/after/multiline"\n',
        'spool = "/a" "b"\n',
        "spool = 42\n",
    ],
)
def test_fast_scanner_defers_what_it_does_not_read_exactly(text: str) -> None:
    with pytest.raises(locate.NeedsToml):
        locate.spool_from_text(text)


def test_deferred_forms_are_read_by_tomllib(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('user = """\n[x]\n"""\nspool = "/after/multiline"\n')
    assert locate.spool_from_config(str(config)) == "/after/multiline"


def test_relative_spool_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('spool = "relative"\n')
    with pytest.raises(ValueError, match="absolute"):
        locate.spool_from_config(str(config))


def test_user_paths_match_platformdirs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for env in ({}, {"XDG_CONFIG_HOME": str(tmp_path / "cfg"), "XDG_DATA_HOME": str(tmp_path)}):
        for key in ("XDG_CONFIG_HOME", "XDG_DATA_HOME"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert locate.user_config_file(env) == str(
            Path(platformdirs.user_config_dir("nixspool")) / "config.toml"
        )
        assert locate.default_spool(env, euid=1000) == str(
            Path(platformdirs.user_data_dir("nixspool")) / "spool.sqlite"
        )
    assert locate.default_spool({}, euid=0) == "/var/lib/nixspool/spool.sqlite"


def test_search_order() -> None:
    assert locate.config_candidates({"NIXSPOOL_CONFIG": "/x.toml"}) == [
        ("/x.toml", "$NIXSPOOL_CONFIG")
    ]
    paths = [p for p, _ in locate.config_candidates({"HOME": "/home/a"})]
    assert paths[0] == "/etc/nixspool/config.toml"
