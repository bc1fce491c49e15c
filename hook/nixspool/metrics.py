"""The spool as Prometheus metrics, for node-exporter's textfile collector.

`nixspool metrics` prints them; every flush writes them to `metrics_file` when
the config names one. The file is replaced atomically (a new file beside it,
then rename), so the collector never reads half of it, and a link planted at
its name is replaced, never followed.
"""

from __future__ import annotations

from collections.abc import Iterable

from . import atomic
from .spool import DELIVERY_STATES, Status

# name -> (type, help). Gauges: `drop` lowers the delivered counts.
METRICS = {
    "nixspool_rows": ("gauge", "Delivery rows in the spool, by remote and state."),
    "nixspool_oldest_queued_age_seconds": (
        "gauge",
        "How long the oldest queued row of a remote has waited (0: none queued).",
    ),
    "nixspool_delivered_bytes": (
        "gauge",
        "NAR size of the delivered paths themselves (not their closures), by remote.",
    ),
    "nixspool_not_verified_rows": (
        "gauge",
        "Delivered rows whose signature was not found valid on the remote.",
    ),
    "nixspool_last_delivery_timestamp_seconds": (
        "gauge",
        "When a path was last delivered to a remote (Unix time).",
    ),
    "nixspool_last_flush_timestamp_seconds": ("gauge", "When a flush last ended for a remote."),
    "nixspool_last_flush_exit_code": (
        "gauge",
        "How the last flush ended for a remote: 0 done, 75 try later, 1 needs a person.",
    ),
    "nixspool_left_to_upstream": (
        "gauge",
        "Closure paths a binary cache's last flush left to the upstream caches that signed them.",
    ),
    "nixspool_last_reconcile_timestamp_seconds": (
        "gauge",
        "When a remote was last asked which delivered paths it still has.",
    ),
    "nixspool_reconcile_requeued": (
        "gauge",
        "Delivered rows the remote had lost at the last check, queued again.",
    ),
    "nixspool_paths": ("gauge", "Store paths in the spool."),
    "nixspool_rejected": ("gauge", "Values the hook refused to record."),
    "nixspool_unresolved_derivations": ("gauge", "Derivations whose outputs wait to be resolved."),
}


def _label(value: str) -> str:
    """A label value, escaped as the text format wants (a spool's remote names
    are only ever checked by the config, and the spool is a file)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(status: Status, configured: Iterable[str]) -> str:
    """The text format for the remotes in the config (rows of others wait for nothing)."""
    wanted = set(configured)
    samples: dict[str, list[str]] = {name: [] for name in METRICS}

    def sample(metric: str, value: float, **labels: str) -> None:
        text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        samples[metric].append(f"{metric}{{{text}}} {value:g}" if text else f"{metric} {value:g}")

    for name, r in status.remotes.items():
        if name not in wanted:
            continue
        for state in DELIVERY_STATES:
            sample("nixspool_rows", r.count(state), remote=name, state=state.value)
        sample("nixspool_oldest_queued_age_seconds", r.oldest_queued_age_seconds or 0, remote=name)
        sample("nixspool_delivered_bytes", r.delivered_bytes, remote=name)
        sample("nixspool_not_verified_rows", r.not_verified, remote=name)
        if r.last_delivered_at is not None:
            sample("nixspool_last_delivery_timestamp_seconds", r.last_delivered_at, remote=name)
        if r.last_flush_at is not None and r.last_flush_exit is not None:
            sample("nixspool_last_flush_timestamp_seconds", r.last_flush_at, remote=name)
            sample("nixspool_last_flush_exit_code", r.last_flush_exit, remote=name)
        if r.left_to_upstream is not None:
            sample("nixspool_left_to_upstream", r.left_to_upstream, remote=name)
        if r.reconciled_at is not None:
            sample("nixspool_last_reconcile_timestamp_seconds", r.reconciled_at, remote=name)
            sample("nixspool_reconcile_requeued", r.reconcile_requeued or 0, remote=name)
    sample("nixspool_paths", status.paths)
    sample("nixspool_rejected", status.rejected)
    sample("nixspool_unresolved_derivations", status.unresolved_derivations)
    lines = []
    for metric, (kind, help_text) in METRICS.items():
        if samples[metric]:
            lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} {kind}", *samples[metric]]
    return "\n".join(lines) + "\n"


def write(path: str, text: str) -> None:
    """Replace `path` with `text` atomically, readable by all (a collector runs as
    another user). OSError if the directory does not let us."""
    atomic.write_file(path, text, 0o644)
