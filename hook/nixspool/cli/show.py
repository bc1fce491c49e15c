"""How results are shown: every line a person reads and every JSON document a
script reads, for every command. The commands (rows.py, deliver.py, machine.py)
decide what happened; this module only says it. JSON keys are a contract
(docs/ARCHITECTURE.md#contracts): change them only with a note.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import TYPE_CHECKING, Any

import typer

from .. import config as config_mod

if TYPE_CHECKING:
    from ..doctor import Check
    from ..flush.report import FlushReport
    from ..setup import SetupReport
    from ..spool import Reject, Row, Status
    from ..spool.model import Pruned
    from ..verify import Verdicts


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


def say(text: str, *, err: bool = False, newline: bool = True) -> None:
    """A confirmation (retry, drop), a notice on stderr, or a document (metrics)."""
    typer.echo(text, err=err, nl=newline)


# -- the spool's rows ------------------------------------------------------------


def status(data: Status, found: list[str] | None) -> None:
    """`nixspool status` for people; `found`: what --check found (None: no check)."""
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
    if found is not None:
        for problem in found:
            typer.echo(f"CHECK FAILED: {problem}")
        if not found:
            typer.echo("check: ok")


def rows(found: list[Row], json_output: bool) -> None:
    """`nixspool list`: a line per row, or their JSON."""
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


def rejects(found: list[Reject], json_output: bool) -> None:
    """`nixspool list --rejected`: what the hook refused, and why."""
    if json_output:
        print_json([vars(rej) for rej in found])
        return
    for rej in found:
        typer.echo(f"{rej.id:>6}  {rej.reason}: {rej.value}")


def pruned(done: Pruned, json_output: bool) -> None:
    if json_output:
        print_json(dataclasses.asdict(done))
        return
    typer.echo(
        f"pruned {done.delivered} delivered and {done.failed} failed rows, "
        f"{done.rejects} rejected records; {done.paths} paths left the spool"
    )


def added(new: list[str], already: list[str], json_output: bool) -> None:
    if json_output:
        print_json({"added": new, "already_in_spool": already})
        return
    typer.echo(
        f"added {len(new)} paths"
        + (f" ({len(already)} were in the spool already)" if already else "")
        + ("; `nixspool flush` uploads them" if new else "")
    )


# -- delivering ------------------------------------------------------------------


def flush(report: FlushReport, code: int, seconds: float, json_output: bool) -> None:
    """What `nixspool flush` did, per remote: JSON on stdout, or lines on stderr."""
    if json_output:
        print_json(
            {
                "exit_code": code,
                "seconds": round(seconds, 3),
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


def verified(
    checked: dict[str, dict[str, Any]], results: dict[str, Verdicts], json_output: bool
) -> None:
    """`nixspool verify`: per remote, what is still there and what is signed."""
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


# -- this machine ----------------------------------------------------------------


def keys(secret_path: str, public_path: str, public: str) -> None:
    """Where keygen wrote the pair, and the public key (never the secret one)."""
    typer.echo(f"secret key: {secret_path} (mode 0600; never share it)")
    typer.echo(f"public key: {public_path}")
    typer.echo(public)


def setup(report: SetupReport) -> None:
    """What `nixspool setup` wrote, left alone, and what it asks of the person."""
    for path in report.changed:
        typer.echo(f"wrote     {path}")
    for path in report.unchanged:
        typer.echo(f"unchanged {path}")
    if not report.changed:
        typer.echo("nothing to change")
    for note in report.notes:
        typer.echo(f"\n{note}")


def checks(found: list[Check], json_output: bool) -> None:
    """`nixspool doctor`: a line per check, and the fix for what is wrong."""
    if json_output:
        print_json([c.as_dict() for c in found])
    else:
        for c in found:
            typer.echo(f"{'ok  ' if c.ok else 'FAIL'}  {c.name:<12} {c.detail}")
            if c.fix:
                typer.echo(f"{'':18}fix: {c.fix}")


def config(
    path: str | None,
    how: str,
    cfg: config_mod.Config,
    values: dict[str, Any],
    remotes: dict[str, dict[str, Any]],
    json_output: bool,
) -> None:
    """`nixspool config`: the effective config as TOML, each value's source beside it."""
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
            s3_only = key in ("multipart_threshold", "part_size") and not r.is_s3_cache
            if value in (None, ()) or (key == "compression" and not r.nixspool_writes) or s3_only:
                continue  # unset, or a key this kind of remote has no use for
            source = cfg.sources.get(f"remotes.{r.name}.{key}", "default")
            typer.echo(f"{key} = {_toml(value)}  # {source}")
        if note := config_mod.store_note(r):
            typer.echo(f"# note: {note}")
        if note := config_mod.credentials_note(r, cfg.user):
            typer.echo(f"# {note}")


def _toml(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return json.dumps(list(value))
    return json.dumps(value) if isinstance(value, str) else repr(value)
