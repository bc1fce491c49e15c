"""Config: defaults, per-remote inheritance, and errors that name file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from nixspool import config
from nixspool.config import ByteSize
from nixspool.errors import ConfigError, UsageError


def load(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return config.load(str(path), environ={})


def test_no_file_means_defaults(tmp_path: Path) -> None:
    # Not this machine's /etc/nixspool/config.toml: one that does not exist.
    cfg = config.load(
        None,
        environ={"NIXSPOOL_CONFIG": "", "HOME": str(tmp_path)},
        system_config=str(tmp_path / "etc" / "config.toml"),
    )
    assert cfg.remotes == ()
    assert cfg.sources["connect_timeout"] == "default"


def test_minimal_config(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        'spool = "/var/lib/nixspool/spool.sqlite"\nuser = "alice"\n\n'
        '[remotes.pi]\nurl = "ssh-ng://pi"\n',
    )
    assert cfg.user == "alice"
    (pi,) = cfg.remotes
    assert (pi.name, pi.url, pi.uses_ssh, pi.connect_timeout) == ("pi", "ssh-ng://pi", True, 10.0)
    assert cfg.sources["remotes.pi.url"] == f"{tmp_path}/config.toml:5"
    assert cfg.sources["user"] == f"{tmp_path}/config.toml:2"


def test_remote_values_override_and_inherit(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        'connect_timeout = 3\n[remotes.a]\nurl = "file:///c"\n'
        '[remotes.b]\nurl = "ssh://b"\nconnect_timeout = 7.5\n',
    )
    assert [r.connect_timeout for r in cfg.remotes] == [3.0, 7.5]
    assert cfg.sources["remotes.a.connect_timeout"].endswith(":1 (top level)")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("spool = \n", r"config.toml:1: invalid TOML: Invalid value$"),
        ('spol = "/x"\n', r"config.toml:1: unknown key 'spol'"),
        ('\n\nbatch_size = "ten"\n', r"config.toml:3: 'batch_size' must be a whole number"),
        ("batch_size = true\n", r"'batch_size' must be a whole number, not True"),
        ("connect_timeout = 0\n", r"'connect_timeout' must be greater than 0"),
        ("gc_roots = 1\n", r"'gc_roots' must be true or false"),
        ('spool = "relative"\n', r"config.toml:1: 'spool' must be an absolute path"),
        ("retry_min = 100\nretry_max = 10\n", r"config.toml:2: 'retry_max' must be at least"),
        ('[remotes.pi]\nuser = "x"\n', r"config.toml:2: unknown key 'user' in \[remotes.pi\]"),
        ('[remotes.pi]\nssh_key = "/k"\n', r"\[remotes.pi\] needs a url"),
        ('[remotes.pi]\nurl = "pi"\n', r"config.toml:2: url 'pi' is not a store URL"),
        ('[remotes."bad name"]\nurl = "ssh://x"\n', r"remote name 'bad name'"),
        ("remotes = 3\n", r"'remotes' must be tables"),
        ('[remotes.pi]\nurl = "ssh://x"\nexclude = "*.drv"\n', r":3: 'exclude' must be a list"),
        ('[remotes.pi]\nurl = "ssh://x"\ninclude = [1]\n', r":3: 'include' must be a list"),
        ('[remotes.pi]\nurl = "ssh://x"\nexclude = [""]\n', r":3: 'exclude' must be a list"),
        ('[remotes.pi]\nurl = "ssh://x"\nexclude = ["a/*"]\n', r":3: .*has a '/': patterns"),
        ('[remotes.pi]\nurl = "ssh://x"\nmax_size = "big"\n', r":3: 'max_size' must be a size"),
        ('[remotes.pi]\nurl = "ssh://x"\nmax_size = "2X"\n', r":3: 'max_size' must be a size"),
        ('[remotes.pi]\nurl = "ssh://x"\nmax_size = 0\n', r":3: 'max_size' must be greater"),
        ('[remotes.pi]\nurl = "ssh://x"\nmax_size = true\n', r":3: 'max_size' must be a size"),
        ('[remotes.pi]\nurl = "sftp://pi"\n', r":2: an sftp:// remote is sftp://\[user@\]host"),
        ('[remotes.pi]\nurl = "sftp:///srv/c"\n', r":2: an sftp:// remote is"),
        ('[remotes.pi]\nurl = "sftp://pi/c?x=1"\n', r":2: an sftp:// remote is"),
        (
            '[remotes.pi]\nurl = "ssh-ng://pi"\nskip_signed_by = ["cache.nixos.org-1"]\n',
            r":3: skip_signed_by is for binary caches .*must hold every path's whole closure",
        ),
        (
            '[remotes.pi]\nurl = "file:///c"\nskip_signed_by = ["cache.nixos.org-1:6NCH"]\n',
            r":3: 'skip_signed_by' takes key names like",
        ),
        (
            '[remotes.pi]\nurl = "file:///c?compression=zstd"\nskip_signed_by = ["k"]\n',
            r":2: with skip_signed_by nixspool writes this cache itself",
        ),
        ('[remotes.pi]\nurl = "ssh://pi"\ncompression = "xz"\n', r":3: compression is for"),
        ('[remotes.pi]\nurl = "sftp://pi/c"\ncompression = "gz"\n', r":3: compression must be"),
        ('[remotes.pi]\nurl = "sftp://pi/c"\nverify = true\n', r":3: verify does not apply"),
    ],
)
def test_invalid_configs_say_where_and_what(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, text)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        config.load(str(tmp_path / "nope.toml"), environ={})
    with pytest.raises(ConfigError, match="no such config file"):
        config.load(None, environ={"NIXSPOOL_CONFIG": str(tmp_path / "nope.toml")})
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'user = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load(str(bad), environ={})


def test_unknown_remote_names_the_known_ones(tmp_path: Path) -> None:
    cfg = load(tmp_path, '[remotes.pi]\nurl = "ssh-ng://pi"\n')
    with pytest.raises(UsageError, match=r"unknown remote 'nas' \(known: pi\)"):
        cfg.remote("nas")


def test_static_caches_take_their_own_keys(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        '[remotes.pi]\nurl = "sftp://cache@pi:2222/srv/nix-cache"\n'
        'skip_signed_by = ["cache.nixos.org-1"]\ncompression = "none"\n'
        '[remotes.dir]\nurl = "file:///srv/c"\nskip_signed_by = ["cache.nixos.org-1"]\n'
        '[remotes.nix]\nurl = "file:///srv/d?compression=zstd"\n',
    )
    pi, d, plain = cfg.remotes
    assert (pi.uses_ssh, pi.is_sftp_cache, pi.nixspool_writes, pi.compression) == (
        True,
        True,
        True,
        "none",
    )
    assert pi.skip_signed_by == ("cache.nixos.org-1",)
    assert (d.uses_ssh, d.nixspool_writes, d.compression) == (False, True, "zstd")
    assert (plain.nixspool_writes, plain.is_binary_cache) == (False, True)  # Nix writes it
    zstd = '[remotes.pi]\nurl = "sftp://pi/c"\ncompression = "zstd"\n'
    assert load(tmp_path, zstd).remotes[0].compression == "zstd"  # on every Python


def test_filters_read_patterns_and_sizes_with_units(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        '[remotes.pi]\nurl = "ssh-ng://pi"\nexclude = ["*.drv", "*-source"]\n'
        'include = ["hello-*"]\nmax_size = "1.5G"\n'
        '[remotes.nas]\nurl = "ssh://nas"\nmax_size = 4096\n',
    )
    pi, nas = cfg.remotes
    assert pi.exclude == ("*.drv", "*-source") and pi.include == ("hello-*",)
    assert pi.max_size == 3 << 29 and str(pi.max_size) == "1.5 GiB"
    assert nas.max_size == 4096 and nas.include == nas.exclude == ()
    assert [str(ByteSize.parse(v)) for v in ("500M", "2GiB", "10k", 100)] == [
        "500.0 MiB",
        "2.0 GiB",
        "10.0 KiB",
        "100 bytes",
    ]


@pytest.mark.parametrize(
    ("url", "noted"),
    [
        ("s3://cache?region=eu-west-1", False),  # nixspool writes it, on every Nix
        ("gs://bucket", True),
        ("ssh-ng://pi", False),
        ("file:///srv/cache", False),
        ("https://cache.example", False),
        ("sftp://pi/c", False),
    ],
)
def test_config_says_which_stores_only_some_nix_can_open(url: str, noted: bool) -> None:
    from nixspool.config import Remote, store_note

    assert (store_note(Remote("r", url)) is not None) is noted
