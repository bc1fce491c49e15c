"""The `nixspool` command. The one place where errors are caught and shown (_Commands).

Every command loads the config, opens the spool (which imports the hook's
fallback journal) and fans recorded paths out to the configured remotes
before it reads or changes anything, so what it shows is complete. The
reading commands (status, list) open it read-only when there is nothing to
import or fan out, and then change nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

from . import config as config_mod
from . import privileges
from .errors import CommandError, ConfigError, NixspoolError, UsageError
from .hook import locate
from .spool import Owner, Selector, Spool, State, Status


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
    "stores whenever those can be reached. See README.md for setup.",
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
        help="Config file (default: $NIXSPOOL_CONFIG, "
        "/etc/nixspool/config.toml, then ~/.config/nixspool/config.toml).",
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
    typer.echo(f"error: {message}", err=True)
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
    if reading:
        spool = Spool.open_read_only(cfg.spool, owner)
        if spool is not None and not spool.queue.needs_fan_out(names):
            return spool
        if spool is not None:
            spool.close()
    spool = Spool.open(cfg.spool, owner)
    spool.queue.sync_remotes(names)
    return spool


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True))


def ago(seconds: float | None) -> str:
    """A duration for people: 42s, 3m 12s, 5h 2m, 2d 7h."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


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


def problems(data: Status, configured: set[str], max_age: float) -> list[str]:
    """What `status --check` reports: what needs a person, or waits too long."""
    found = []
    for name, r in data.remotes.items():
        if name not in configured:
            continue  # its rows wait for nothing: `drop --remote` them
        if r.needs_a_person:
            found.append(f"{name}: needs a person: {r.needs_a_person}")
        if r.failed:
            found.append(f"{name}: {r.failed} rows failed (`nixspool list --state failed`)")
        if r.not_verified:
            found.append(f"{name}: {r.not_verified} signatures not verified (`nixspool verify`)")
        age = r.oldest_queued_age_seconds
        if age is not None and age > max_age:
            found.append(f"{name}: the oldest queued row waits since {ago(age)} (> {ago(max_age)})")
    return found


# -- status --------------------------------------------------------------------


@app.command()
def status(
    json_output: JsonOption = False,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="For monitoring: exit 1 if a remote's last flush needs a person, rows "
            "failed or are not verified, or the oldest queued row is older than --max-age.",
        ),
    ] = False,
    max_age: Annotated[
        float,
        typer.Option(
            parser=duration,
            metavar="DURATION",
            help="With --check: how long a row may wait (90s, 30m, 6h, 2d).",
        ),
    ] = "1d",  # type: ignore[assignment]  # parsed by `duration`
) -> None:
    """Counts per state and per remote, the oldest queued row, the last error."""
    cfg = load_config()
    with open_spool(cfg, reading=True) as spool:
        data = spool.reports.status()
    configured = {r.name for r in cfg.remotes}
    for name, remote in data.remotes.items():
        remote.configured = name in configured
    found = problems(data, configured, max_age) if check else []
    if json_output:
        print_json({**data.to_json(), **({"problems": found} if check else {})})
        if found:
            raise typer.Exit(1)
        return
    typer.echo(f"spool {data.spool}: {data.paths} paths")
    if not data.remotes:
        typer.echo(
            "no remotes configured: add [remotes.NAME] with a url to the config "
            "(see `nixspool config`)"
        )
    else:
        typer.echo(
            f"{'remote':<16} {'queued':>8} {'delivered':>10} {'failed':>8} {'skipped':>8}"
            "  oldest queued"
        )
        for name, r in data.remotes.items():
            note = "" if r.configured else "  (not in the config)"
            typer.echo(
                f"{name:<16} {r.queued:>8} {r.delivered:>10} {r.failed:>8} {r.skipped:>8}  "
                f"{ago(r.oldest_queued_age_seconds)}{note}"
            )
        for name, r in data.remotes.items():
            if r.last_error and r.last_error_at is not None:
                typer.echo(
                    f"last error ({name}, {ago(time.time() - r.last_error_at)} ago): {r.last_error}"
                )
    for name, r in data.remotes.items():
        if r.left_to_upstream:
            typer.echo(
                f"{name}: its last flush left {r.left_to_upstream} dependencies to the "
                "upstream caches that signed them (skip_signed_by)"
            )
        if r.verified or r.not_verified:
            typer.echo(
                f"{name}: {r.verified} delivered paths have a verified signature there"
                + (f", {r.not_verified} do NOT (see `nixspool verify`)" if r.not_verified else "")
            )
    if data.unresolved_derivations:
        typer.echo(
            f"{data.unresolved_derivations} derivations wait for their outputs to be "
            "resolved by the next flush"
        )
    if data.rejected:
        typer.echo(f"{data.rejected} values rejected by the hook: see `nixspool list --rejected`")
    if check:
        for problem in found:
            typer.echo(f"CHECK FAILED: {problem}")
        if found:
            raise typer.Exit(1)
        typer.echo("check: ok")


# -- list ----------------------------------------------------------------------


@app.command("list")
def list_rows(
    state: Annotated[
        State | None,
        typer.Option(
            "--state", "-s", help="Only rows in this state (recorded: no remote has it yet)."
        ),
    ] = None,
    remote: RemoteOption = None,
    rejected: Annotated[
        bool, typer.Option("--rejected", help="List what the hook refused to record, and why.")
    ] = False,
    limit: Annotated[
        int | None, typer.Option("--limit", "-n", min=1, help="At most this many rows.")
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """The rows in the spool: one line per store path and remote."""
    cfg = load_config(remote)
    with open_spool(cfg, reading=True) as spool:
        if rejected:
            rejects = spool.reports.rejects(limit)
            if json_output:
                print_json([vars(rej) for rej in rejects])
            else:
                for rej in rejects:
                    typer.echo(f"{rej.id:>6}  {rej.reason}: {rej.value}")
            return
        found = spool.reports.rows(state=state, remote=remote, limit=limit)
    if json_output:
        print_json(
            [
                {
                    "id": r.id,
                    "path": r.path,
                    "remote": r.remote,
                    "state": r.state.value,
                    "attempts": r.attempts,
                    "next_attempt_at": r.next_attempt_at or None,
                    "last_error": r.last_error,
                    "recorded_at": r.recorded_at,
                    "delivered_at": r.delivered_at,
                    "needs_outputs": r.needs_outputs,
                    "drv_path": r.drv_path or None,
                    "verified": r.verified,
                }
                for r in found
            ]
        )
        return
    for r in found:
        extra = f"  ({r.attempts} attempts: {r.last_error})" if r.last_error else ""
        kind = "  (outputs not yet resolved)" if r.needs_outputs else ""
        kind += {True: "  (signature verified)", False: "  (SIGNATURE NOT VERIFIED)", None: ""}[
            r.verified
        ]
        typer.echo(f"{r.id:>6}  {r.remote or '-':<12} {r.state.value:<9}  {r.path}{kind}{extra}")


# -- retry and drop ------------------------------------------------------------

Targets = Annotated[
    list[str] | None,
    typer.Argument(help="Row ids (from `nixspool list`) or store paths.", show_default=False),
]
AllFailed = Annotated[bool, typer.Option("--all-failed", help="Every failed row.")]
AllSkipped = Annotated[
    bool,
    typer.Option("--all-skipped", help="Every row the remote's filters left out (skipped)."),
]


def selector(
    targets: list[str] | None, all_failed: bool, all_skipped: bool, remote: str | None
) -> Selector:
    ids, paths = [], []
    for target in targets or []:
        if target.isdigit():
            ids.append(int(target))
        elif target.startswith("/"):
            paths.append(target)
        else:
            raise UsageError(f"'{target}' is neither a row id nor a store path")
    return Selector(tuple(ids), tuple(paths), all_failed, all_skipped, remote)


@app.command()
def retry(
    targets: Targets = None,
    all_failed: AllFailed = False,
    all_skipped: AllSkipped = False,
    all_pending: Annotated[
        bool,
        typer.Option(
            "--all",
            help="Every row not delivered: waiting on backoff, failed or skipped "
            "(e.g. after freeing the remote's full disk).",
        ),
    ] = False,
    remote: RemoteOption = None,
) -> None:
    """Requeue rows so that the next flush tries them at once, attempts reset.

    Failed, skipped and waiting rows; a delivered row named by id or path is queued
    again too (the copy skips what the remote has). Skipped rows meet the remote's
    filters again: retry them after changing the filters.
    """
    cfg = load_config(remote)
    with open_spool(cfg) as spool:
        chosen = selector(targets, all_failed, all_skipped, remote)
        count = spool.admin.retry(dataclasses.replace(chosen, all_pending=all_pending))
    typer.echo(f"requeued {count} rows")


@app.command()
def prune(json_output: JsonOption = False) -> None:
    """Forget rows past their retention: delivered ones after `retention`, failed ones
    and rejected records after `failed_retention` (a flush does this once a day).

    Queued and skipped rows are never pruned. The spool file stops growing: SQLite
    reuses the freed space.
    """
    cfg = load_config()
    with open_spool(cfg) as spool:
        pruned = spool.admin.prune(cfg.retention, cfg.failed_retention)
    if json_output:
        print_json(dataclasses.asdict(pruned))
        return
    typer.echo(
        f"pruned {pruned.delivered} delivered and {pruned.failed} failed rows, "
        f"{pruned.rejects} rejected records; {pruned.paths} paths left the spool"
    )


@app.command()
def drop(
    targets: Targets = None,
    all_failed: AllFailed = False,
    all_skipped: AllSkipped = False,
    remote: RemoteOption = None,
) -> None:
    """Forget rows: they will not be uploaded (to that remote, with --remote)."""
    cfg = load_config(remote)
    with open_spool(cfg) as spool:
        dropped = spool.admin.drop(selector(targets, all_failed, all_skipped, remote))
    typer.echo(f"dropped {dropped.rows} rows; {len(dropped.paths)} paths left the spool")


# -- flush ---------------------------------------------------------------------


@app.command()
def flush(remote: RemoteOption = None, json_output: JsonOption = False) -> None:
    """Upload due rows to the remotes that can be reached now.

    Exit status: 0 all due work delivered (or none due); 75 a remote could not
    be reached, or uploads will be retried later (rows stay queued); 1 some rows
    failed for a reason retrying will not fix (see `nixspool status`).
    """
    from . import flush as flush_mod

    cfg = load_config(remote)
    account = privileges.remote_account(cfg)  # who may flush: refuse before the spool
    if not cfg.remotes:
        raise UsageError("no remotes configured: add [remotes.NAME] with a url to the config")
    with open_spool(cfg) as spool, flush_mod.single_flusher(spool) as alone:
        if not alone:
            typer.echo(
                "another nixspool flush is running on this spool; it delivers these rows", err=True
            )
            raise typer.Exit(flush_mod.EX_TEMPFAIL)
        started = time.monotonic()
        with _progress(enabled=not json_output) as progress:
            report = flush_mod.Flusher(cfg, spool, account, progress).run(remote)
        if cfg.metrics_file:
            try:
                _write_metrics(cfg, spool, cfg.metrics_file)
            except OSError as e:
                report.errors.append(f"metrics file: {describe(e)}")
    code = flush_mod.exit_code(report)
    if json_output:
        print_json(
            {
                "exit_code": code,
                "seconds": round(time.monotonic() - started, 3),
                "remotes": {r.remote: vars(r) for r in report.remotes},
                "errors": report.errors,
            }
        )
    else:
        for error in report.errors:
            typer.echo(f"error: {error}", err=True)
        for r in report.remotes:
            skipped = f", {r.skipped} left out by filters" if r.skipped else ""
            skipped += f", {r.resigned} signed on the remote" if r.resigned else ""
            if r.left_to_upstream:
                skipped += f", {r.left_to_upstream} dependencies left to upstream"
            if r.uploaded:
                size = config_mod.ByteSize(r.uploaded_bytes)
                skipped += f", {r.uploaded} paths written ({size})"
            if r.requeued:
                skipped += f", {r.requeued} gone from it since delivered (queued again)"
            line = (
                f"{r.remote}: {r.delivered} delivered, {r.failed} failed{skipped}, "
                f"{r.queued} still queued ({r.seconds:.1f} s)"
            )
            if r.error:
                line += f"; {'unreachable' if r.unreachable else 'error'}: {r.error}"
            elif r.reconcile_error:
                line += f"; warning: {r.reconcile_error}"
            typer.echo(line, err=True)
            for failure in r.failures:
                typer.echo(f"  failed: {failure['path']}: {failure['error']}", err=True)
            if r.failures_not_listed:
                typer.echo(
                    f"  ... and {r.failures_not_listed} more: nixspool list --state failed",
                    err=True,
                )
    raise typer.Exit(code)


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str, int, int], None]]:
    """A progress bar on a terminal; plain log lines (journald-friendly) otherwise."""
    if not enabled or not sys.stderr.isatty():

        def log_line(remote: str, done: int, total: int) -> None:
            if done < total:  # the end is the summary line's
                log.info("%s: %d of %d paths delivered", remote, done, total)

        yield log_line
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    bars: dict[str, Any] = {}
    # auto_refresh=False: no refresh thread. The flusher starts its children with
    # a preexec_fn (run.py), which is only safe in a process without threads.
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        auto_refresh=False,
    ) as bar:

        def update(remote: str, done: int, total: int) -> None:
            if remote not in bars:
                bars[remote] = bar.add_task(remote, total=total)
            bar.update(bars[remote], completed=done, refresh=True)

        yield update


def _metrics_text(cfg: config_mod.Config, spool: Spool) -> str:
    from . import metrics as metrics_mod

    return metrics_mod.render(spool.reports.status(), (r.name for r in cfg.remotes))


def _write_metrics(cfg: config_mod.Config, spool: Spool, path: str) -> None:
    from . import metrics as metrics_mod

    metrics_mod.write(path, _metrics_text(cfg, spool))


@app.command()
def metrics(
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            metavar="FILE",
            help="Replace FILE atomically instead of printing (e.g. for node-exporter's "
            "textfile collector).",
        ),
    ] = None,
) -> None:
    """Prometheus metrics: rows per remote and state, oldest queued age, bytes and time
    of the last delivery, how the last flush ended.

    Every flush also writes them to `metrics_file` when the config names one.
    """
    cfg = load_config()
    with open_spool(cfg, reading=True) as spool:
        if output:
            _write_metrics(cfg, spool, output)
            return
        typer.echo(_metrics_text(cfg, spool), nl=False)


# -- adding paths by hand -------------------------------------------------------------


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
    from . import adding

    given = list(paths or [])
    if stdin:
        given += sys.stdin.read().split()
    if not given:
        raise UsageError("name store paths (or ./result links), or pass --stdin")
    cfg = load_config()
    with open_spool(cfg) as spool:  # first: who may not write it learns that first
        found = adding.store_paths(given, closure=closure)
        added = spool.queue.add(found)
        spool.queue.sync_remotes(r.name for r in cfg.remotes)
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
            "(default: /etc/nixspool as root, else "
            "~/.config/nixspool)."
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing key pair.")] = False,
) -> None:
    """Make an ed25519 signing key pair in Nix's format (NAME.sec 0600, NAME.pub).

    Put the .sec path in a remote's sign_key_file, and the public key in the
    trusted-public-keys of the cache host and of every machine that substitutes from it.
    """
    from . import sign

    directory = out or (
        "/etc/nixspool"
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
            tmp = path + ".tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
            with os.fdopen(fd, "w") as f:
                f.write(text + "\n")
            os.chmod(tmp, mode)
            os.replace(tmp, path)
    except OSError as e:
        raise UsageError(
            f"cannot write the key pair in {directory}: {e.strerror}; pass --out DIRECTORY"
        ) from None
    typer.echo(f"secret key: {secret_path} (mode 0600; never share it)")
    typer.echo(f"public key: {public_path}")
    typer.echo(public)


@app.command()
def verify(remote: RemoteOption = None, json_output: JsonOption = False) -> None:
    """Check that delivered paths are still on the remotes, and their signatures.

    Asks each remote which delivered paths it still has (one query, or one listing of
    a cache nixspool writes): what it lost is queued again, for the next flush; what
    this machine has lost too fails. Then, where the remote signs (sign_key_file),
    reads each path's signatures from it and checks them with the public half of the
    key; a path the remote had before without our signature is signed there now.
    Exits 1 if a remote cannot be asked, a path is gone on both sides, or a path has
    no valid signature by the key there.
    """
    from . import probe, sign
    from . import reconcile as reconcile_mod
    from . import verify as verify_mod

    cfg = load_config()
    account = privileges.remote_account(cfg)
    results: dict[str, verify_mod.Verdicts] = {}
    checked: dict[str, dict[str, Any]] = {}
    with open_spool(cfg) as spool:
        for r in cfg.selected(remote):
            env = probe.nix_ssh_env(r, account, cfg.accept_new_host_keys)
            try:
                done = reconcile_mod.reconcile(
                    r,
                    spool,
                    account=account,
                    env=env,
                    accept_new_host_keys=cfg.accept_new_host_keys,
                )
            except CommandError as e:
                checked[r.name] = {"error": f"could not ask which delivered paths it has: {e}"}
                continue
            checked[r.name] = {
                "delivered": done.checked,
                "requeued": done.requeued,
                "failed": done.failed,
            }
            # A cache nixspool writes has its narinfo files, signature and all, from it.
            if r.sign_key_file and not r.nixspool_writes:
                results[r.name] = verify_mod.check(
                    r,
                    sign.load_secret_key(r.sign_key_file),
                    spool.queue.delivered_paths(r.name),
                    spool,
                    account=account,
                    env=env,
                )
    for name, v in results.items():
        checked[name] |= {
            "verified": sum(v.ok.values()),
            "not_verified": v.bad,
            "signed_on_remote": v.resigned,
        }
    if json_output:
        print_json(checked)
    for name, c in checked.items():
        if json_output:
            break
        if "error" in c:
            typer.echo(f"{name}: {c['error']}")
            continue
        there = c["delivered"] - c["requeued"] - len(c["failed"])
        typer.echo(
            f"{name}: {there} of {c['delivered']} delivered paths are there; "
            f"{c['requeued']} gone: queued again; {len(c['failed'])} gone here too: failed"
        )
        for path in c["failed"]:
            typer.echo(f"  gone from the remote and from this machine: {path}")
        if name in results:
            v = results[name]
            resigned = f" ({len(v.resigned)} signed on the remote now)" if v.resigned else ""
            typer.echo(f"{name}: {sum(v.ok.values())} verified{resigned}, {len(v.bad)} not")
            for path in v.bad:
                typer.echo(f"  no valid signature on the remote: {path}")
    bad = any("error" in c or c["failed"] or c.get("not_verified") for c in checked.values())
    raise typer.Exit(1 if bad else 0)


# -- setup and doctor ------------------------------------------------------------


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
        str | None, typer.Option(help="Spool file (default: /var/lib/nixspool/spool.sqlite).")
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
    from .setup import SetupRequest, install

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
    from . import doctor as doctor_mod

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


def _stopped(signum: int, _frame: object) -> NoReturn:
    """SIGTERM (systemd's stop, kill) unwinds like Ctrl-C, through every cleanup on
    the way: a running nix copy and the ssh it started are killed as one process
    group, leased rows are given back. Dying where we stand left each child to its
    own parent-death signal, which ssh under Nix does not always get."""
    raise SystemExit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _stopped)
    app()
