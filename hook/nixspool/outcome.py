"""What a failed copy means: words of Nix and ssh to an Outcome, pure.

Every transport's failures end here, so that one table decides what is "away"
(exit 75, rows untouched), what is worth another try, what a path's own fault is
(its row fails) and what waits for a person (exit 1). The words are those of
every Nix of the matrix (2.8, 2.26, 2.34) and of OpenSSH; tests/unit/test_flush_logic.py
holds the recorded messages.
"""

from __future__ import annotations

import enum
import re

from .errors import CommandError
from .run import last_line


class Outcome(enum.Enum):
    """How a failed `nix copy` is handled, from what it printed."""

    UNREACHABLE = "unreachable"  # the host went away: stop this remote, rows untouched
    TRANSIENT = "transient"  # try again, then later, with backoff
    PERMANENT = "permanent"  # the remote or the path says no: fail the row
    # This machine's Nix cannot open such a store at all (s3:// on a Nix built
    # without S3): no retry helps, every row of the remote waits for a person.
    UNSUPPORTED = "unsupported"


# Lower-cased fragments of Nix's and ssh's error messages.
# What only the network makes ssh say (not a remote Nix that is missing or broken,
# which ends the connection early instead): the host was away when the copy ran,
# even if it answers again by the time the probe asks (a flapping link).
_NETWORK = (
    "connection refused",
    "connection timed out",
    "no route to host",
    "network is unreachable",
    "could not resolve hostname",
    "name or service not known",
    "temporary failure in name",
    "host is down",
    "timeout, server",
    "connection reset",
)
_UNREACHABLE = (
    *_NETWORK,
    "operation timed out",
    "cannot connect",
    # curl, for http(s):// and s3:// stores: the server is not there.
    "could not connect to server",
    "couldn't connect to server",
    "could not resolve host",
    "couldn't resolve host",
    # The connection ended early: the link dropped, or the remote's Nix is missing
    # or broken. For ssh remotes a probe tells which (see flush.transport.NixCopy).
    "broken pipe",
    "connection closed",
    "unexpected end-of-file",
    "cannot open connection to remote store",
    "disconnected unexpectedly",
)
_PERMANENT = (
    "lacks a valid signature",  # Nix 2.8-2.19
    "lacks a signature by a trusted key",  # later Nix
    "is not valid",
    "does not exist",
    "permission denied",
    "not allowed",
    "refusing",
    "there is no substituter that can build it",  # a path gone from the local store
    "no such file or directory",
    "is not a valid store path",
    "read-only file system",
    "cannot add path",
    "host key verification failed",
)
# Nix 2.8-2.19 say "... store 'URL'", later ones "... store with scheme 'S'".
_UNSUPPORTED = ("don't know how to open nix store",)
# Checked first: a full disk also prints "cannot add path", but space comes back.
_TRANSIENT = (
    "no space left on device",
    "disk quota exceeded",
    "database or disk is full",  # the remote store's SQLite
)


def classify(stderr: str) -> Outcome:
    """What a failed `nix copy` (or ssh under it) means, from its words alone."""
    text = stderr.lower()
    if any(fragment in text for fragment in _UNSUPPORTED):
        return Outcome.UNSUPPORTED
    if any(fragment in text for fragment in _TRANSIENT):
        return Outcome.TRANSIENT
    if any(fragment in text for fragment in _UNREACHABLE):
        return Outcome.UNREACHABLE
    if any(fragment in text for fragment in _PERMANENT):
        return Outcome.PERMANENT
    return Outcome.TRANSIENT


def said_by_the_network(stderr: str) -> bool:
    """Did ssh say the network failed it (not the remote's Nix ending the session)?"""
    text = stderr.lower()
    return any(fragment in text for fragment in _NETWORK)


def reason_of(stderr: str) -> str:
    """The line of nix copy's output to keep as a row's last error: the one that
    names a transient cause if there is one (a full disk), else the last."""
    for line in stderr.splitlines():
        if any(fragment in line.lower() for fragment in _TRANSIENT):
            return line.strip()
    return last_line(stderr)


def unsupported_store(url: str, reason: str) -> str:
    """Why a remote this machine's Nix cannot open waits for a person, and what to do."""
    scheme = url.partition("://")[0]
    return (
        f"this machine's Nix cannot open {scheme}:// stores ({reason}); it was built "
        f"without them (Debian's Nix 2.8 and 2.26 have no S3): use a Nix that has "
        f"{scheme}://, or a remote nixspool writes itself (sftp://)"
    )


def remote_message(error: CommandError) -> str:
    """The most telling line of a failed nix copy: the remote shell's or Nix's own
    complaint, rather than the generic last line ("unexpected end-of-file")."""
    lines = [line.strip() for line in (error.stderr or "").splitlines() if line.strip()]
    telling = [
        line
        for line in lines
        if any(
            k in line.lower()
            for k in ("not found", "no such file", "permission denied", "cannot", "error:")
        )
    ]
    return "; ".join(dict.fromkeys(telling[-3:] or lines[-1:])) or str(error)


_STORE_PATH = re.compile(r"/[^\s'\"]*/[0-9a-df-np-sv-z]{32}-[^\s'\"]*")


def refusal_of(error: CommandError) -> str:
    """A refused copy's reason, as a row keeps it."""
    return last_line(error.stderr) if error.stderr else str(error)


def same_refusal(one: CommandError, other: CommandError) -> bool:
    """Refused in the same words, whichever paths they name."""
    return _STORE_PATH.sub("PATH", refusal_of(one)) == _STORE_PATH.sub("PATH", refusal_of(other))
