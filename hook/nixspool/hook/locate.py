"""Where the config file and the spool are, cheaply enough for every build.

Standard library only. The post-build-hook needs one value from the config,
`spool`, and `import tomllib` alone costs about two interpreter starts. So
`spool_from_text` reads that one top-level key with a scanner that is exact
for the forms people write (`spool = "/path"`, `spool = '/path'`) and hands
anything it is not sure about to tomllib. It never guesses.

`config.py` uses the same search order through `config_candidates`, so the
hook and the CLI cannot disagree about which file is in force.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:  # collections.abc costs the hook ~0.15 of an interpreter start
    from collections.abc import Mapping

SYSTEM_CONFIG = "/etc/nixspool/config.toml"
ROOT_SPOOL = "/var/lib/nixspool/spool.sqlite"
APP = "nixspool"


def _xdg_dir(environ: Mapping[str, str], variable: str, fallback: str) -> str:
    # The same rule as platformdirs on Linux: an absolute $XDG_* or ~/fallback.
    value = environ.get(variable, "").strip()
    if value and os.path.isabs(value):
        return value
    return os.path.join(os.path.expanduser("~"), fallback)


def user_config_file(environ: Mapping[str, str]) -> str:
    return os.path.join(_xdg_dir(environ, "XDG_CONFIG_HOME", ".config"), APP, "config.toml")


def default_spool(environ: Mapping[str, str], euid: int | None = None) -> str:
    """The spool when no config names one: system-wide for root, per user otherwise."""
    if (os.geteuid() if euid is None else euid) == 0:
        return ROOT_SPOOL
    return os.path.join(_xdg_dir(environ, "XDG_DATA_HOME", ".local/share"), APP, "spool.sqlite")


def config_candidates(
    environ: Mapping[str, str], system_config: str = SYSTEM_CONFIG
) -> list[tuple[str, str]]:
    """(path, how it was chosen) for each config file to try, in order.

    `$NIXSPOOL_CONFIG` is authoritative when set: if it names a missing file,
    that is an error for the caller to report, not a reason to fall through.
    `system_config` is another path only for tests, which must not read this
    machine's.
    """
    explicit = environ.get("NIXSPOOL_CONFIG")
    if explicit:
        return [(explicit, "$NIXSPOOL_CONFIG")]
    return [(system_config, "system config"), (user_config_file(environ), "user config")]


def find_config(
    environ: Mapping[str, str], system_config: str = SYSTEM_CONFIG
) -> tuple[str | None, str]:
    """The config file in force and why: the explicit one, else the first that
    exists; (None, ...) for none (the defaults)."""
    candidates = config_candidates(environ, system_config)
    if len(candidates) == 1:
        return candidates[0]
    for path, how in candidates:
        if os.path.exists(path):
            return path, how
    return None, "no config file (defaults)"


class NeedsToml(Exception):
    """The fast scanner met a form it does not read exactly; use tomllib."""


def _fast_string(value: str) -> str:
    """The value of a one-line TOML string without escapes, or NeedsToml."""
    value = value.strip()
    if len(value) >= 2 and value[0] in "\"'":
        quote = value[0]
        end = value.find(quote, 1)
        rest = value[end + 1 :].strip() if end > 0 else "x"
        body = value[1:end]
        if end > 0 and (not rest or rest.startswith("#")) and "\\" not in body:
            return body
    raise NeedsToml


def spool_from_text(text: str) -> str | None:
    """The top-level `spool` value of a config file, or None if it has none.

    Raises NeedsToml when the text uses TOML the scanner does not read
    exactly (escapes, multi-line strings, quoted or dotted keys mentioning
    spool): the caller then parses it properly.
    """
    found: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            break  # the top-level table ends at the first header
        if '"""' in line or "'''" in line:
            raise NeedsToml  # a multi-line string could hide a header or a key
        key, eq, value = line.partition("=")
        if key.strip() == "spool" and eq:
            if found is not None:
                raise NeedsToml  # duplicate key: let tomllib say so
            found = _fast_string(value)
        elif "spool" in key:
            raise NeedsToml  # "spool" = ..., spool.x = ...: not the simple form
    return found


def spool_from_config(path: str) -> str | None:
    """The spool a config file names (None: it names none)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        found = spool_from_text(text)
    except NeedsToml:
        import tomllib  # slow, and only for configs written in unusual TOML

        value = tomllib.loads(text).get("spool")
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{path}: 'spool' must be a string") from None
        found = value
    if found is not None:
        found = os.path.expanduser(found)
        if not os.path.isabs(found):
            raise ValueError(f"{path}: 'spool' must be an absolute path, not {found!r}")
    return found


def hook_spool(environ: Mapping[str, str]) -> str:
    """The spool the hook writes to: from the config in force, else the default."""
    config, _ = find_config(environ)
    if config is not None:
        spool = spool_from_config(config)
        if spool is not None:
            return spool
    return default_spool(environ)


def fallback_journal(spool: str) -> str:
    """The plain journal beside the spool that catches records it could not take."""
    return spool + ".fallback.jsonl"


def stray_journal(environ: Mapping[str, str]) -> str:
    """Where the hook keeps what it recorded while it could not read the config
    or use the spool's directory: the journal beside the default spool (see
    hook.run), which depends on who runs it and on `environ`."""
    return fallback_journal(default_spool(environ))
