"""The `nixspool` command. The one place where errors are caught and shown (_Commands).

Every command loads the config, opens the spool (which imports the hook's
fallback journal) and fans recorded paths out to the configured remotes
before it reads or changes anything, so what it shows is complete. The
reading commands (status, list) open it read-only when there is nothing to
import or fan out, and then change nothing.

The commands live by what they touch: rows.py (status, list, retry, prune, drop),
deliver.py (flush, metrics, verify), machine.py (add, keygen, setup, doctor,
config); show.py says what they did, for people and for scripts; this module
holds what they share and registers them, in that order.
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

from .. import config as config_mod
from ..errors import ConfigError, NixspoolError, UsageError
from ..hook import locate
from ..spool import Owner, Spool
from . import show


class _Commands(TyperGroup):
    """Every command runs inside invoke(): the one place where errors are caught.

    nixspool's own errors, and the OS's and SQLite's, are shown as one `error:`
    line (exit 2 for a bad command line, else 1); --debug shows the traceback
    instead. Anything else is a bug, and Python's traceback says where.
    """

    def invoke(self, ctx: Any) -> Any:  # a click Context: typer >= 0.22 vendors click
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            raise  # `nixspool list | head`: click ends quietly
        except (NixspoolError, OSError, sqlite3.Error) as e:
            if settings.debug:
                raise
            fail(describe(e), 2 if isinstance(e, UsageError) else 1)


def describe(error: Exception) -> str:
    """One line for an error the user can act on."""
    if isinstance(error, sqlite3.Error):
        return f"spool database: {error} (see `nixspool doctor`)"
    if isinstance(error, OSError) and not isinstance(error, NixspoolError):
        names = [n for n in (error.filename, error.filename2) if n is not None]
        where = " -> ".join(map(str, names))
        return f"{where}: {error.strerror}" if where else str(error)
    return str(error)


app = typer.Typer(
    name="nixspool",
    cls=_Commands,
    help="Queue Nix build outputs recorded by nixspool-hook and upload them to remote "
    "stores whenever those can be reached. See man nixspool.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

log = logging.getLogger("nixspool")

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help=f"Config file (default: $NIXSPOOL_CONFIG, "
        f"{locate.SYSTEM_CONFIG}, then ~/.config/nixspool/config.toml).",
        dir_okay=False,
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output (stable keys).")]
RemoteOption = Annotated[str | None, typer.Option("--remote", "-r", help="Only this remote.")]


class Settings:
    """What the global options set, for the commands to read."""

    config_path: str | None = None
    debug: bool = False


settings = Settings()


@app.callback()
def _global_options(
    config: ConfigOption = None,
    debug: Annotated[
        bool, typer.Option("--debug", help="Log every command run; show tracebacks.")
    ] = False,
) -> None:
    settings.config_path = str(config) if config else None
    settings.debug = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        # With --debug, milliseconds since start: where does a slow flush spend its time?
        format="%(relativeCreated)7.0fms %(message)s" if debug else "%(message)s",
        stream=sys.stderr,
        force=True,
    )


def fail(message: str, code: int = 1) -> NoReturn:
    show.say(f"error: {message}", err=True)
    raise typer.Exit(code)


def load_config(remote: str | None = None) -> config_mod.Config:
    """The config in force; UsageError if `remote` (from --remote) is not in it."""
    cfg = config_mod.load(settings.config_path)
    if remote is not None:
        cfg.remote(remote)
    return cfg


def spool_owner(cfg: config_mod.Config) -> Owner | None:
    """The config's user, who owns the spool; one that does not exist is the
    config's error, told at its line."""
    if not cfg.user:
        return None
    try:
        return Owner.of_user(cfg.user)
    except NixspoolError as e:
        raise ConfigError(f"{cfg.sources.get('user', cfg.path)}: {e}") from None


def open_spool(cfg: config_mod.Config, *, reading: bool = False) -> Spool:
    """The spool, complete: the journal imported, every path fanned out to every
    configured remote. A command that only reads (`reading`) gets it read-only
    when there is nothing to import or fan out, which is the usual case: then it
    changes nothing, not even the spool's owner or its ballast."""
    owner = spool_owner(cfg)
    names = [r.name for r in cfg.remotes]
    stray = locate.stray_journal(os.environ)
    if reading:
        spool = Spool.open_read_only(cfg.spool, owner, stray_journal=stray)
        if spool is not None and not spool.intake.needs_fan_out(names):
            return spool
        if spool is not None:
            spool.close()
    spool = Spool.open(cfg.spool, owner, stray_journal=stray)
    spool.intake.sync_remotes(names)
    return spool


def duration(text: str) -> float:
    """Seconds from '90', '90s', '30m', '6h' or '2d' (a typer parser)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a duration like 90s, 30m, 6h or 2d") from None
    if seconds <= 0:
        raise typer.BadParameter(f"{text!r}: a duration is more than zero")
    return seconds


def _stopped(signum: int, _frame: object) -> NoReturn:
    """SIGTERM (systemd's stop, kill) unwinds like Ctrl-C, through every cleanup on
    the way: a running nix copy and the ssh it started are killed as one process
    group, leased rows are given back. Dying where we stand left each child to its
    own parent-death signal, which ssh under Nix does not always get."""
    raise SystemExit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _stopped)
    app()


# The commands register themselves with `app` as they are imported, in this order
# (the order `nixspool --help` lists them in).
# isort: off
from . import rows  # noqa: E402, F401
from . import deliver  # noqa: E402, F401
from . import machine  # noqa: E402, F401
# isort: on
