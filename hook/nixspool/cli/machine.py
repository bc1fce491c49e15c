"""The commands that set a machine up: add, keygen, setup, doctor, config."""

from __future__ import annotations

import json
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
    print_json,
    settings,
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
    if json_output:
        print_json({"added": added, "already_in_spool": already})
        return
    typer.echo(
        f"added {len(added)} paths"
        + (f" ({len(already)} were in the spool already)" if already else "")
        + ("; `nixspool flush` uploads them" if added else "")
    )


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
    typer.echo(f"secret key: {secret_path} (mode 0600; never share it)")
    typer.echo(f"public key: {public_path}")
    typer.echo(public)


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
) -> None:
    """Write the config, create the spool, install the units and the dispatcher script.

    Prints the nix.conf line to add; never edits nix.conf. Running it again with the
    same options changes nothing.
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
        )
    )
    for path in report.changed:
        typer.echo(f"wrote     {path}")
    for path in report.unchanged:
        typer.echo(f"unchanged {path}")
    if not report.changed:
        typer.echo("nothing to change")
    for note in report.notes:
        typer.echo(f"\n{note}")


@app.command()
def doctor(json_output: JsonOption = False) -> None:
    """Check the setup: nix.conf, the spool, each remote (SSH, Nix, trust), key files.

    One line per check, with the fix for what is wrong. Exits 1 if anything is.
    """
    from .. import doctor as doctor_mod

    checks = doctor_mod.diagnose(settings.config_path)
    if json_output:
        print_json([c.as_dict() for c in checks])
    else:
        for c in checks:
            typer.echo(f"{'ok  ' if c.ok else 'FAIL'}  {c.name:<12} {c.detail}")
            if c.fix:
                typer.echo(f"{'':18}fix: {c.fix}")
    raise typer.Exit(0 if all(c.ok for c in checks) else 1)


# -- config --------------------------------------------------------------------


@app.command("config")
def show_config(json_output: JsonOption = False) -> None:
    """The effective config, and where each value came from."""
    path, how = config_mod.find(settings.config_path, os.environ)
    cfg = load_config()
    values: dict[str, Any] = {k: getattr(cfg, k) for k in config_mod.GLOBAL_KEYS}
    remotes = {r.name: {k: getattr(r, k) for k in config_mod.REMOTE_KEYS} for r in cfg.remotes}
    if json_output:
        print_json(
            {
                "file": path,
                "chosen_by": how,
                "values": values,
                "remotes": remotes,
                "sources": dict(cfg.sources),
            }
        )
        return
    typer.echo(f"# config file: {path or '(none)'} ({how})")
    for key, value in values.items():
        typer.echo(f"{key} = {_toml(value)}  # {cfg.sources[key]}")
    for r in cfg.remotes:
        typer.echo(f"\n[remotes.{r.name}]")
        for key, value in remotes[r.name].items():
            if value in (None, ()) or (key == "compression" and not r.nixspool_writes):
                continue  # unset, or a key this kind of remote has no use for
            source = cfg.sources.get(f"remotes.{r.name}.{key}", "default")
            typer.echo(f"{key} = {_toml(value)}  # {source}")
        if note := config_mod.store_note(r):
            typer.echo(f"# note: {note}")


def _toml(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return json.dumps(list(value))
    return json.dumps(value) if isinstance(value, str) else repr(value)
