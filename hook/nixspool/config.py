"""The TOML config: where it is, what it says, and where each value came from.

Looked up in this order (docs/ARCHITECTURE.md#contracts): `--config PATH`, `$NIXSPOOL_CONFIG`,
`/etc/nixspool/config.toml`, the user's config dir. No file at all is valid:
every key has a default, and there are then no remotes.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, UsageError
from .hook import locate
from .remote_rules import (
    S3_SCHEME,
    SFTP_SCHEME,
    SSH_SCHEMES,
    check_binary_cache_keys,
    check_url,
    nixspool_writes,
)

_BYTE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class ByteSize(int):
    """A size in bytes, written as a number or with a binary unit: "500M", "2G"."""

    @classmethod
    def parse(cls, value: object) -> ByteSize:
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(value)
        found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(value), re.I)
        if not isinstance(value, str) or found is None:
            raise ValueError(value)
        return cls(float(found.group(1)) * _BYTE_UNITS[found.group(2).upper()])

    def __str__(self) -> str:
        for unit in ("T", "G", "M", "K"):
            if self >= _BYTE_UNITS[unit]:
                return f"{self / _BYTE_UNITS[unit]:.1f} {unit}iB"
        return f"{int(self)} bytes"


# The top-level keys: name -> (type, default, one line for `nixspool config`).
# The defaults that depend on who runs nixspool (spool) are filled in by load().
GLOBAL_KEYS: dict[str, tuple[type, Any, str]] = {
    "spool": (str, None, "the SQLite spool file"),
    "user": (str, None, "run ssh and nix copy as this user when started as root"),
    "run_as_root": (bool, False, "allow ssh and nix copy as root when no user is set"),
    "connect_timeout": (float, 10.0, "seconds for each network connect (probe, ssh)"),
    "copy_timeout": (float, 3600.0, "seconds one nix copy may take in all"),
    "stall_timeout": (float, 300.0, "seconds one nix copy may go without moving a byte"),
    "batch_size": (int, 500, "store paths per nix copy"),
    "retry_min": (float, 30.0, "seconds before the first retry of a failed upload"),
    "retry_max": (float, 3600.0, "longest wait between retries of a row"),
    "accept_new_host_keys": (bool, False, "trust an SSH host key not yet in known_hosts"),
    "flush_on_metered": (
        bool,
        False,
        "NetworkManager: flush on a connection it calls metered (a phone's hotspot) too",
    ),
    "gc_roots": (bool, True, "protect queued paths from garbage collection"),
    "metrics_file": (str, None, "write Prometheus metrics here after each flush (*.prom)"),
    "reconcile_interval": (
        float,
        86400.0,
        "seconds between checks that delivered paths are still on the remote (0: never)",
    ),
    "retention": (float, 90 * 86400.0, "seconds a delivered row is kept after delivery"),
    "failed_retention": (
        float,
        365 * 86400.0,
        "seconds a failed row or a rejected record is kept after its last change",
    ),
}
# Per remote: url is required; the others default to the top-level value.
REMOTE_KEYS: dict[str, tuple[type, Any, str]] = {
    "url": (str, None, "where to copy: any URL `nix copy --to` takes"),
    "ssh_key": (str, None, "SSH private key (default: agent, ~/.ssh/config)"),
    "sign_key_file": (str, None, "Nix secret key to sign paths with before upload"),
    "verify": (bool, None, "read signatures back from the remote after upload"),
    "include": (list, (), "only recorded paths whose name matches one of these globs"),
    "exclude": (list, (), "leave out recorded paths whose name matches one of these globs"),
    "max_size": (ByteSize, None, 'leave out recorded paths whose closure is larger ("2G")'),
    "skip_signed_by": (list, (), "binary caches: leave out paths signed by these keys' names"),
    "compression": (str, "zstd", "caches nixspool writes: NAR compression (zstd, xz, none)"),
    "multipart_threshold": (
        ByteSize,
        ByteSize(64 << 20),
        "s3://: a NAR this large or larger goes up in parts",
    ),
    "part_size": (ByteSize, ByteSize(16 << 20), "s3://: the size of each part (5M or more)"),
    "connect_timeout": GLOBAL_KEYS["connect_timeout"],
    "copy_timeout": GLOBAL_KEYS["copy_timeout"],
    "stall_timeout": GLOBAL_KEYS["stall_timeout"],
    "batch_size": GLOBAL_KEYS["batch_size"],
}
# Bounds on numbers: a timeout of more than 30 years, or a batch that large, is a
# typo; past them SQLite's integers and time arithmetic would overflow.
NUMBER_LIMIT = 10**9
ZERO_MEANS_NEVER = {"reconcile_interval"}
BYTES_LIMIT = 2**62

REMOTE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def _default(key: str) -> Any:
    """The default above: the dataclasses below take theirs from here, never a copy
    (docs/configuration.md's table of keys is checked against GLOBAL_KEYS by a test)."""
    return GLOBAL_KEYS[key][1]


@dataclass(frozen=True)
class Remote:
    name: str
    url: str
    ssh_key: str | None = None
    sign_key_file: str | None = None
    verify: bool | None = None  # None: verify when signing
    include: tuple[str, ...] = ()  # () takes every name
    exclude: tuple[str, ...] = ()
    max_size: ByteSize | None = None
    skip_signed_by: tuple[str, ...] = ()  # key names, e.g. cache.nixos.org-1
    compression: str = REMOTE_KEYS["compression"][1]
    multipart_threshold: ByteSize = REMOTE_KEYS["multipart_threshold"][1]
    part_size: ByteSize = REMOTE_KEYS["part_size"][1]
    connect_timeout: float = _default("connect_timeout")
    copy_timeout: float = _default("copy_timeout")
    stall_timeout: float = _default("stall_timeout")
    batch_size: int = _default("batch_size")

    @property
    def uses_ssh(self) -> bool:
        """Reached by an SSH login (probed first): a Nix store, or an SFTP cache."""
        return self.url.startswith((*SSH_SCHEMES, SFTP_SCHEME))

    @property
    def is_sftp_cache(self) -> bool:
        """A static binary cache over SFTP: nixspool writes it, no Nix there."""
        return self.url.startswith(SFTP_SCHEME)

    @property
    def is_s3_cache(self) -> bool:
        """A binary cache in an S3-compatible bucket, written by nixspool (s3.py)."""
        return self.url.startswith(S3_SCHEME)

    @property
    def nixspool_writes(self) -> bool:
        """nixspool writes the cache's files itself (remote_rules.nixspool_writes)."""
        return nixspool_writes(self.url, self.skip_signed_by)

    @property
    def is_binary_cache(self) -> bool:
        """A directory of .narinfo files and NARs rather than a Nix store: it may
        hold part of a closure (the rest from the substituters it names)."""
        return self.url.startswith((SFTP_SCHEME, S3_SCHEME, "file://"))

    @property
    def verifies(self) -> bool:
        if self.nixspool_writes:  # it writes the narinfo, signature and all
            return False
        return bool(self.sign_key_file) if self.verify is None else self.verify


# Store URL schemes every Nix since 2.8 opens; others (gs://, ...) exist only in some
# Nix builds and versions (s3:// nixspool writes itself).
SCHEMES_EVERY_NIX = ("ssh", "ssh-ng", "file", "http", "https", "daemon", "local", "unix", "auto")


def store_note(remote: Remote) -> str | None:
    """What `nixspool config` says of a remote nix copy may not be able to open."""
    scheme = remote.url.partition("://")[0] if "://" in remote.url else remote.url
    if remote.nixspool_writes or scheme in SCHEMES_EVERY_NIX:
        return None
    return (
        f"{scheme}:// is opened by nix copy only where this Nix was built with it; "
        "`nixspool doctor` asks this machine's Nix"
    )


def credentials_note(remote: Remote, user: str | None) -> str | None:
    """Where an s3:// remote's credentials come from (never what they are)."""
    if not remote.is_s3_cache:
        return None
    from .s3 import Location  # the URL read as the writer reads it (no boto3 here)

    named = Location.of(remote).profile
    profile = f"profile {named}" if named else "the default profile"
    who = user or "the user nixspool runs as"
    return (
        f"credentials: boto3's chain as {who}: {profile} of ~/.aws/credentials and "
        "~/.aws/config, or AWS_* in nixspool's environment (`nixspool doctor` says which)"
    )


@dataclass(frozen=True)
class Config:
    spool: str
    user: str | None = _default("user")
    run_as_root: bool = _default("run_as_root")
    connect_timeout: float = _default("connect_timeout")
    copy_timeout: float = _default("copy_timeout")
    stall_timeout: float = _default("stall_timeout")
    batch_size: int = _default("batch_size")
    retry_min: float = _default("retry_min")
    retry_max: float = _default("retry_max")
    accept_new_host_keys: bool = _default("accept_new_host_keys")
    # Read by the NetworkManager dispatcher script (as text), not by nixspool.
    flush_on_metered: bool = _default("flush_on_metered")
    gc_roots: bool = _default("gc_roots")
    metrics_file: str | None = _default("metrics_file")
    reconcile_interval: float = _default("reconcile_interval")
    retention: float = _default("retention")
    failed_retention: float = _default("failed_retention")
    remotes: tuple[Remote, ...] = ()
    path: str | None = None  # the file it came from, None for defaults only
    # "key" or "remotes.NAME.key" -> "file:line" or "default"
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def remote(self, name: str) -> Remote:
        for remote in self.remotes:
            if remote.name == name:
                return remote
        known = ", ".join(r.name for r in self.remotes) or "none configured"
        raise UsageError(f"unknown remote '{name}' (known: {known}); see `nixspool config`")

    def selected(self, name: str | None) -> tuple[Remote, ...]:
        return self.remotes if name is None else (self.remote(name),)


def find(
    explicit: str | None, environ: Mapping[str, str], system_config: str = locate.SYSTEM_CONFIG
) -> tuple[str | None, str]:
    """The config file in force and why: (path or None, how it was chosen)."""
    if explicit:
        return explicit, "--config"
    return locate.find_config(environ, system_config)


def load(
    explicit: str | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    system_config: str = locate.SYSTEM_CONFIG,
) -> Config:
    env = os.environ if environ is None else environ
    path, _ = find(explicit, env, system_config)
    if path is None:
        return parse("", None, env)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied; is it readable by this user?") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a directory, not a config file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse(text, path, env)


def parse(text: str, path: str | None, environ: Mapping[str, str]) -> Config:
    """A config from its TOML text; `path` names it in errors (None: the defaults)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # "Expected '=' (at line 3, column 5)": the file:line form of every error.
        message = str(e)
        at = re.search(r" \(at line (\d+), column \d+\)$", message)
        line = at.group(1) if at else str(text.count("\n") + 1)  # "at end of document"
        message = message[: at.start()] if at else message.replace(" (at end of document)", "")
        raise ConfigError(f"{path or 'config'}:{line}: invalid TOML: {message}") from None
    return _build(data, path, text, environ)


def _line_of(text: str, table: str | None, key: str | None) -> int | None:
    """The 1-based line where `key` is set in `[table]` (None: top level), or with
    key None, the line of the `[table]` header itself."""
    current: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        header = _header(stripped)
        if header is not None:
            current = header
            if key is None and header == table:
                return number
        elif key is not None and current == table and re.match(rf"{re.escape(key)}\s*=", stripped):
            return number
    return None


def _header(stripped: str) -> str | None:
    """The dotted name a `[table]` line opens, as its keys read (`[remotes."a b"]`
    is "remotes.a b"); None for any other line."""
    if not stripped.startswith("["):
        return None
    try:
        node: Any = tomllib.loads(stripped)
    except tomllib.TOMLDecodeError:
        return None
    parts = []
    while isinstance(node, dict) and len(node) == 1:
        ((name, node),) = node.items()
        parts.append(name)
    return ".".join(parts)


def _where(path: str | None, text: str, table: str | None, key: str) -> str:
    line = _line_of(text, table, key)
    return f"{path}:{line}" if line else f"{path}"


def _check(value: Any, kind: type, key: str, where: str) -> Any:
    if kind is list:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{where}: '{key}' must be {_kind_name(kind)}, not {value!r}")
        if key == "skip_signed_by":
            for name in value:
                if ":" in name or any(c.isspace() for c in name):
                    raise ConfigError(
                        f"{where}: '{key}' takes key names like \"cache.nixos.org-1\" (the "
                        f"part of a public key before ':'), not {name!r}"
                    )
            return tuple(value)
        for pattern in value:
            if "/" in pattern:
                raise ConfigError(
                    f"{where}: '{key}' pattern {pattern!r} has a '/': patterns match a store "
                    'path\'s name (after the hash), e.g. "*-source" or "firefox-*"'
                )
        return tuple(value)
    if kind is ByteSize:
        try:
            value = ByteSize.parse(value)
        except ValueError:
            raise ConfigError(
                f"{where}: '{key}' must be {_kind_name(kind)}, not {value!r}"
            ) from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: '{key}' must be {_kind_name(kind)}, not {value!r}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if key in ZERO_MEANS_NEVER and value == 0:
            return value
        if not value > 0:  # nan too
            raise ConfigError(f"{where}: '{key}' must be greater than 0, not {value!r}")
        limit = BYTES_LIMIT if kind is ByteSize else NUMBER_LIMIT
        if value > limit:  # inf too: a timeout nothing ever reaches is no bound
            raise ConfigError(f"{where}: '{key}' must be at most {limit}, not {value!r}")
    return value


def _kind_name(kind: type) -> str:
    return {
        str: "a string",
        bool: "true or false",
        int: "a whole number",
        float: "a number",
        list: "a list of strings",
        ByteSize: 'a size in bytes, or like "500M", "2G"',
    }[kind]


def _build(data: dict[str, Any], path: str | None, text: str, env: Mapping[str, str]) -> Config:
    sources: dict[str, str] = {}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key == "remotes":
            continue
        where = _where(path, text, None, key)
        if key not in GLOBAL_KEYS:
            raise ConfigError(f"{where}: unknown key '{key}' (known: {', '.join(GLOBAL_KEYS)})")
        values[key] = _check(value, GLOBAL_KEYS[key][0], key, where)
        sources[key] = where
    for key, (_, default, _) in GLOBAL_KEYS.items():
        if key not in values:
            values[key] = default
            sources[key] = "default"
    if values["spool"] is None:
        values["spool"] = locate.default_spool(env)
    values["spool"] = os.path.expanduser(values["spool"])
    if not os.path.isabs(values["spool"]):
        raise ConfigError(f"{sources['spool']}: 'spool' must be an absolute path")
    if values["metrics_file"] is not None and not os.path.isabs(values["metrics_file"]):
        raise ConfigError(f"{sources['metrics_file']}: 'metrics_file' must be an absolute path")
    if values["retry_max"] < values["retry_min"]:
        raise ConfigError(f"{sources['retry_max']}: 'retry_max' must be at least 'retry_min'")

    remotes_data = data.get("remotes", {})
    if not isinstance(remotes_data, dict):
        raise ConfigError(
            f"{_where(path, text, None, 'remotes')}: 'remotes' must be tables like [remotes.pi]"
        )
    remotes = []
    for name, table in remotes_data.items():
        line = _line_of(text, f"remotes.{name}", "url") or _line_of(text, f"remotes.{name}", None)
        where = f"{path}:{line or ''}".rstrip(":")
        if not REMOTE_NAME.fullmatch(name):
            raise ConfigError(
                f"{where}: remote name {name!r} must be letters, digits, '_', '.', '-'"
            )
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: 'remotes.{name}' must be a table like [remotes.{name}]")
        remote: dict[str, Any] = {}
        for key, value in table.items():
            kwhere = _where(path, text, f"remotes.{name}", key)
            if key not in REMOTE_KEYS:
                raise ConfigError(
                    f"{kwhere}: unknown key '{key}' in [remotes.{name}] "
                    f"(known: {', '.join(REMOTE_KEYS)})"
                )
            remote[key] = _check(value, REMOTE_KEYS[key][0], key, kwhere)
            sources[f"remotes.{name}.{key}"] = kwhere
        if "url" not in remote:
            raise ConfigError(f'{where}: [remotes.{name}] needs a url, e.g. url = "ssh-ng://pi"')
        if "://" not in remote["url"] and remote["url"] not in ("daemon", "local", "auto"):
            raise ConfigError(
                f"{sources[f'remotes.{name}.url']}: url {remote['url']!r} is not a "
                "store URL; examples: ssh-ng://pi, ssh://user@nas, file:///srv/cache"
            )
        for key in ("connect_timeout", "copy_timeout", "stall_timeout", "batch_size"):
            if key not in remote:
                remote[key] = values[key]
                sources[f"remotes.{name}.{key}"] = f"{sources[key]} (top level)"
        check_url(remote["url"], sources[f"remotes.{name}.url"])
        check_binary_cache_keys(remote, name, sources)
        for key in ("ssh_key", "sign_key_file"):
            if remote.get(key):
                remote[key] = os.path.expanduser(remote[key])
                kwhere = sources[f"remotes.{name}.{key}"]
                if not os.path.isabs(remote[key]) or any(c.isspace() for c in remote[key]):
                    # Nix splits NIX_SSHOPTS on whitespace: such a path cannot reach ssh.
                    raise ConfigError(f"{kwhere}: '{key}' must be an absolute path without spaces")
        remotes.append(Remote(name=name, **remote))
    return Config(remotes=tuple(remotes), path=path, sources=sources, **values)
