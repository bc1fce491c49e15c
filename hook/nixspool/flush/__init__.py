"""`nixspool flush`: deliver the spool's due rows to each remote.

flusher.py runs one flush (probes, reconciling, each remote on its own);
batches.py is the batch loop of one remote (lease, filter, copy, bisect,
back off); transport.py is how a batch reaches a remote (`nix copy`, or the
cache writer); report.py is what a flush says it did, and its exit status.
"""

from typing import Any

from .flusher import Flusher, resolve_derivations, single_flusher
from .report import (
    EX_FAILED,
    EX_OK,
    EX_TEMPFAIL,
    FAILURES_LISTED,
    FlushReport,
    RemoteReport,
    exit_code,
)
from .transport import TIMED_OUT

__all__ = [
    "ATTEMPTS_PER_FLUSH",
    "EX_FAILED",
    "EX_OK",
    "EX_TEMPFAIL",
    "FAILURES_LISTED",
    "TIMED_OUT",
    "TIMEOUTS_ALONE",
    "Batches",
    "FlushReport",
    "Flusher",
    "RemoteReport",
    "backoff",
    "exit_code",
    "resolve_derivations",
    "single_flusher",
]


def __getattr__(name: str) -> Any:
    """The batch loop (and tenacity, the cache writer, signing) is imported when a
    flush has work, not by every command: an idle flush starts that much faster."""
    if name in ("ATTEMPTS_PER_FLUSH", "TIMEOUTS_ALONE", "Batches", "backoff"):
        from . import batches

        return getattr(batches, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
