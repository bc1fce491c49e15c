"""The commands over the spool's rows: status, list, retry, prune, drop."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer

from ..errors import UsageError
from ..spool import Selector, State, Status
from . import (
    JsonOption,
    RemoteOption,
    app,
    duration,
    load_config,
    open_spool,
    show,
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
            since, limit = show.ago(age), show.ago(max_age)
            found.append(f"{name}: the oldest queued row waits since {since} (> {limit})")
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
    found = problems(data, configured, max_age) if check else None
    if json_output:
        show.print_json({**data.to_json(), **({"problems": found} if check else {})})
    else:
        show.status(data, found)
    if found:
        raise typer.Exit(1)


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
            show.rejects(rejects, json_output)
            return
        found = spool.reports.rows(state=state, remote=remote, limit=limit)
    show.rows(found, json_output)


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
    show.say(f"requeued {count} rows")


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
    show.pruned(pruned, json_output)


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
    show.say(f"dropped {dropped.rows} rows; {len(dropped.paths)} paths left the spool")


# -- flush ---------------------------------------------------------------------
