"""The commands over the spool's rows: status, list, retry, prune, drop."""

from __future__ import annotations

import dataclasses
import time
from typing import Annotated

import typer

from ..errors import UsageError
from ..spool import Selector, State, Status
from . import (
    JsonOption,
    RemoteOption,
    ago,
    app,
    duration,
    load_config,
    open_spool,
    print_json,
)


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
