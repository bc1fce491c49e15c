"""The errors nixspool reports. The CLI catches NixspoolError and prints `error: ...`.

Messages name the fix. They never contain key material.
"""

from __future__ import annotations


class NixspoolError(Exception):
    """A failure to show the user as one `error:` line."""


class ConfigError(NixspoolError):
    """The config file is missing, unreadable or invalid."""


class UsageError(NixspoolError):
    """The command line asks for something that does not exist (a remote, a row)."""


class SpoolError(NixspoolError):
    """The spool cannot be opened, created or trusted."""


class CommandError(NixspoolError):
    """An external command failed, ran past nixspool's own time bound (timed_out), or
    said nothing for its stall bound (stalled, which is timed_out too)."""

    def __init__(
        self, message: str, *, stderr: str = "", timed_out: bool = False, stalled: bool = False
    ) -> None:
        super().__init__(message)
        self.stderr = stderr
        self.timed_out = timed_out or stalled
        self.stalled = stalled


class NixOutputError(NixspoolError):
    """Nix printed something nixspool cannot read (a Nix it does not know yet)."""


class PrivilegeError(NixspoolError):
    """nixspool cannot run as the user the config asks for."""


class UnreachableError(NixspoolError):
    """A remote cannot be reached now; its rows stay queued."""


class ProbeError(NixspoolError):
    """nixspool's own SSH probe failed (a bug, or a surprise from paramiko): never
    taken for "the host is away", which would hide it behind exit 75 for ever."""


class LocalError(NixspoolError):
    """Something on this machine failed during a flush (signing, the local store):
    not the remote's doing, so never recorded as the remote's refusal of a path."""


class RemoteConfigError(NixspoolError):
    """A remote answers but will not take uploads until someone acts (keys, host key)."""


class SigningKeyError(NixspoolError):
    """A signing key is missing, unsafe or malformed."""
