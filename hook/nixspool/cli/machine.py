"""The commands that set a machine up: add, keygen, setup, doctor, config."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

import typer

from .. import atomic
from .. import config as config_mod
from ..errors import UsageError
from ..hook import locate
from . import (
    JsonOption,
    app,
    load_config,
    open_spool,
    settings,
    show,
)


@app.command()
def add(
    paths: Annotated[
        list[str] | None,
        typer.Argument(help="Store paths, or links to them such as ./result.", show_default=False),
    ] = None,
    stdin: Annotated[
        bool, typer.Option("--stdin", help="Also read paths from standard input, one a line.")
    ] = False,
    closure: Annotated[
        bool, typer.Option("--closure", help="Add every path the given ones refer to, too.")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Queue store paths that the hook did not record: built elsewhere, substituted.

    They are uploaded, and signed, exactly as recorded ones: only who may write the
    spool (root and the configured user) may add.
    """
    from .. import adding

    given = list(paths or [])
    if stdin:
        given += sys.stdin.read().split()
    if not given:
        raise UsageError("name store paths (or ./result links), or pass --stdin")
    cfg = load_config()
    with open_spool(cfg) as spool:  # first: who may not write it learns that first
        found = adding.store_paths(given, closure=closure)
        added = spool.intake.add(found)
        spool.intake.sync_remotes(r.name for r in cfg.remotes)
    already = sorted(set(found) - set(added))
    show.added(added, already, json_output)


# -- signing -----------------------------------------------------------------------


@app.command()
def keygen(
    name: Annotated[
        str,
        typer.Argument(help="Key name, e.g. pi-cache-1 (shown in signatures).", show_default=False),
    ],
    out: Annotated[
        str | None,
        typer.Option(
            help="Directory for NAME.sec and NAME.pub "
            f"(default: {os.path.dirname(locate.SYSTEM_CONFIG)} as root, else "
            "~/.config/nixspool)."
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing key pair.")] = False,
) -> None:
    """Make an ed25519 signing key pair in Nix's format (NAME.sec 0600, NAME.pub).

    Put the .sec path in a remote's sign_key_file, and the public key in the
    trusted-public-keys of the cache host and of every machine that substitutes from it.
    """
    from .. import sign

    directory = out or (
        os.path.dirname(locate.SYSTEM_CONFIG)
        if os.geteuid() == 0
        else os.path.dirname(locate.user_config_file(os.environ))
    )
    secret_path = os.path.join(directory, f"{name}.sec")
    public_path = os.path.join(directory, f"{name}.pub")
    for path in (secret_path, public_path):
        if os.path.exists(path) and not force:
            raise UsageError(
                f"{path} exists; pass --force to replace the key pair (what it "
                "signed will no longer be trusted by its public key)"
            )
    secret, public = sign.generate(name)
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
        for path, text, mode in ((secret_path, secret, 0o600), (public_path, public, 0o644)):
            # Without --force an existing key is never replaced, not even by a race.
            atomic.write_file(path, text + "\n", mode, replace=force)
    except FileExistsError as e:
        raise UsageError(
            f"{e.filename2 or e.filename} exists; pass --force to replace the key pair"
        ) from None
    except OSError as e:
        raise UsageError(
            f"cannot write the key pair in {directory}: {e.strerror}; pass --out DIRECTORY"
        ) from None
    show.keys(secret_path, public_path, public)


@app.command()
def setup(
    user: Annotated[
        str,
        typer.Option(
            "--user",
            "-u",
            help="Who owns the SSH key; ssh and nix copy run as this user.",
            show_default=False,
        ),
    ],
    remote: Annotated[
        list[str],
        typer.Option(
            "--remote",
            "-r",
            help="NAME=URL, e.g. pi=ssh-ng://pi; repeat for more.",
            show_default=False,
        ),
    ],
    spool: Annotated[
        str | None, typer.Option(help=f"Spool file (default: {locate.ROOT_SPOOL}).")
    ] = None,
    ssh_key: Annotated[
        str | None,
        typer.Option(help="SSH private key for the remotes (default: the user's agent and keys)."),
    ] = None,
    interface: Annotated[
        list[str] | None,
        typer.Option(help="Only these network interfaces trigger a flush; repeat."),
    ] = None,
    connection: Annotated[
        list[str] | None, typer.Option(help="Only these NetworkManager connections trigger one.")
    ] = None,
    config_file: Annotated[
        str, typer.Option("--config-file", help="Where to write the config.")
    ] = locate.SYSTEM_CONFIG,
    root: Annotated[
        str,
        typer.Option(
            help="Install units and dispatcher scripts under this directory instead of /."
        ),
    ] = "/",
    force: Annotated[bool, typer.Option(help="Replace a config with other content.")] = False,
    allow_unsafe_install: Annotated[
        bool,
        typer.Option(
            help="As root, set up an installation others than root can change "
            "(refused without this: its units and hook run as root)."
        ),
    ] = False,
) -> None:
    """Write the config, create the spool, install the units and the dispatcher script.

    Prints the nix.conf line to add; never edits nix.conf. As root, in an
    installation only root can change, it also makes nixspool-hook start its Python
    directly (pip installs it behind a /bin/sh line; run setup again after a
    reinstall). Running it again with the same options changes nothing.
    """
    from ..setup import SetupRequest, install

    pairs = []
    for item in remote:
        name, eq, url = item.partition("=")
        if not eq or not name or not url:
            raise UsageError(f"--remote takes NAME=URL, e.g. pi=ssh-ng://pi, not {item!r}")
        if not config_mod.REMOTE_NAME.fullmatch(name):
            raise UsageError(
                f"--remote {item!r}: a remote name is letters, digits, '_', '.' and '-'"
            )
        pairs.append((name, url))
    report = install(
        SetupRequest(
            config_path=config_file,
            user=user,
            remotes=tuple(pairs),
            spool=spool,
            ssh_key=ssh_key,
            interfaces=tuple(interface or ()),
            connections=tuple(connection or ()),
            root=root,
            force=force,
            allow_unsafe_install=allow_unsafe_install,
        )
    )
    show.setup(report)


@app.command()
def doctor(json_output: JsonOption = False) -> None:
    """Check the setup: nix.conf, the spool, each remote (SSH, Nix, trust), key files.

    One line per check, with the fix for what is wrong. Exits 1 if anything is.
    """
    from .. import doctor as doctor_mod

    checks = doctor_mod.diagnose(settings.config_path)
    show.checks(checks, json_output)
    raise typer.Exit(0 if all(c.ok for c in checks) else 1)


# -- config --------------------------------------------------------------------


@app.command("config")
def show_config(json_output: JsonOption = False) -> None:
    """The effective config, and where each value came from."""
    path, how = config_mod.find(settings.config_path, os.environ)
    cfg = load_config()
    values: dict[str, Any] = {k: getattr(cfg, k) for k in config_mod.GLOBAL_KEYS}
    remotes = {r.name: {k: getattr(r, k) for k in config_mod.REMOTE_KEYS} for r in cfg.remotes}
    show.config(path, how, cfg, values, remotes, json_output)
