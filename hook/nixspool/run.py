"""The one way nixspool runs another program.

argv lists only (never a shell), `check=True` by default, the argv logged at
debug level, a wall-clock bound that kills the whole process group (so an
ssh started by nix copy dies with it), and optionally as another user.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .errors import CommandError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Account:
    """A user to run commands as: the result of dropping root."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    shell: str


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    account: Account | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv and capture its output; CommandError on failure or timeout."""
    log.debug("$ %s", shlex.join(argv))
    user_args: dict[str, object] = {}
    if account is not None and os.geteuid() != account.uid:
        # subprocess applies these in the safe order: groups, gid, then uid.
        user_args = {
            "user": account.uid,
            "group": account.gid,
            "extra_groups": list(account.groups),
        }
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            env=dict(env) if env is not None else None,
            start_new_session=True,  # its own process group, killed as one on timeout
            preexec_fn=_die_with(os.getpid()),
            cwd="/",
            **user_args,  # type: ignore[call-overload]
        )
    except OSError as e:
        raise CommandError(
            f"cannot run {argv[0]}: {e.strerror}; is it installed and on PATH?"
        ) from None
    try:
        stdout, stderr = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        stdout, stderr = proc.communicate()
        raise CommandError(
            f"{argv[0]} did not finish within {timeout:g} s and was stopped",
            stderr=stderr,
            returncode=None,
        ) from None
    except BaseException:
        _kill_group(proc)  # interrupted: leave no child behind
        proc.wait()
        raise
    result = subprocess.CompletedProcess(list(argv), proc.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise CommandError(
            f"{shlex.join(argv[:3])}... failed (exit {proc.returncode}): {last_line(stderr)}",
            stderr=stderr,
            returncode=proc.returncode,
        )
    return result


def _die_with(parent: int) -> Callable[[], None]:
    """In the child: get SIGKILL when nixspool dies, even by SIGKILL, so no nix copy
    or ssh is left running unbounded. Runs after the uid change (which clears it)."""

    def set_parent_death_signal() -> None:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl: too late for it
            os._exit(1)

    return set_parent_death_signal


def _kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def last_line(text: str) -> str:
    """The last non-empty line of a command's stderr: usually the error."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no error output)"
