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
    """An external command failed or timed out."""

    def __init__(self, message: str, *, stderr: str = "", returncode: int | None = None) -> None:
        super().__init__(message)
        self.stderr = stderr
        self.returncode = returncode


class NixOutputError(NixspoolError):
    """Nix printed something nixspool cannot read (a Nix it does not know yet)."""


class PrivilegeError(NixspoolError):
    """nixspool cannot run as the user the config asks for."""


class UnreachableError(NixspoolError):
    """A remote cannot be reached now; its rows stay queued."""


class RemoteConfigError(NixspoolError):
    """A remote answers but will not take uploads until someone acts (keys, host key)."""


class SigningKeyError(NixspoolError):
    """A signing key is missing, unsafe or malformed."""
