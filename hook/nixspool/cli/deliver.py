"""The commands that deliver and report: flush, metrics, verify."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import typer

from .. import config as config_mod
from .. import privileges
from ..errors import CommandError, UsageError
from ..spool import Spool
from . import (
    JsonOption,
    RemoteOption,
    app,
    describe,
    load_config,
    log,
    open_spool,
    show,
)


@app.command()
def flush(remote: RemoteOption = None, json_output: JsonOption = False) -> None:
    """Upload due rows to the remotes that can be reached now.

    Exit status: 0 all due work delivered (or none due); 75 a remote could not
    be reached, or uploads will be retried later (rows stay queued); 1 some rows
    failed for a reason retrying will not fix (see `nixspool status`).
    """
    from .. import flush as flush_mod

    cfg = load_config(remote)
    account = privileges.remote_account(cfg)  # who may flush: refuse before the spool
    if not cfg.remotes:
        raise UsageError("no remotes configured: add [remotes.NAME] with a url to the config")
    with open_spool(cfg) as spool, flush_mod.single_flusher(spool) as alone:
        if not alone:
            show.say(
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
    show.flush(report, code, time.monotonic() - started, json_output)
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
    from .. import metrics as metrics_mod

    return metrics_mod.render(spool.reports.status(), (r.name for r in cfg.remotes))


def _write_metrics(cfg: config_mod.Config, spool: Spool, path: str) -> None:
    from .. import metrics as metrics_mod

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
        show.say(_metrics_text(cfg, spool), newline=False)


# -- adding paths by hand -------------------------------------------------------------


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
    from .. import probe, sign
    from .. import reconcile as reconcile_mod
    from .. import verify as verify_mod

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
    show.verified(checked, results, json_output)
    bad = any("error" in c or c["failed"] or c.get("not_verified") for c in checked.values())
    raise typer.Exit(1 if bad else 0)


# -- setup and doctor ------------------------------------------------------------
