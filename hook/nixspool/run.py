"""The one way nixspool runs another program.

argv lists only (never a shell), `check=True` by default, the argv logged at
debug level, a wall-clock bound that kills the whole process group (so an
ssh started by nix copy dies with it), a parent-death signal (so nothing
outlives a killed nixspool), and optionally as another user. `spawn()`
starts a program and returns at once, for work that may overlap; `run()`
waits for it.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import itertools
import logging
import os
import selectors
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO

from . import installation
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


class Running:
    """A started program: wait() for its result, or kill() it."""

    def __init__(
        self,
        argv: Sequence[str],
        proc: subprocess.Popen[str],
        input: str | None,
        timeout: float | None,
        check: bool,
        stall: float | None = None,
        decode: Callable[[str], str] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.proc = proc
        self.started = time.monotonic()
        self.input = input
        self.deadline = None if timeout is None else self.started + timeout
        self.timeout = timeout
        self.check = check
        self.stall = stall  # seconds the program may write nothing to stderr
        self.decode = decode or (lambda text: text)  # its stderr, as people read it

    def send(self, text: str) -> None:
        """Write `text` to its input now, for it to read while it runs (`input` is
        written when wait() is called, and the input closed)."""
        assert self.proc.stdin is not None, "started without input"
        with contextlib.suppress(BrokenPipeError):  # it ended already: wait() says how
            self.proc.stdin.write(text)
            self.proc.stdin.flush()

    def wait(self) -> subprocess.CompletedProcess[str]:
        """The program's result; CommandError if it failed, ran past its bound, or
        wrote nothing to stderr for its stall bound."""
        try:
            stdout, stderr = self._outputs()
        except _Stalled as e:
            self.kill()
            raise CommandError(
                f"`{command_name(self.argv)}` moved nothing for {self.stall:g} s and was stopped",
                stderr=self.decode(e.stderr),
                stalled=True,
            ) from None
        except subprocess.TimeoutExpired as e:
            self.kill()
            if self.stall is None:
                _, stderr = self.proc.communicate()
            else:  # what _outputs() read, handed over in the exception
                stderr = e.stderr if isinstance(e.stderr, str) else ""
            raise CommandError(
                f"`{command_name(self.argv)}` did not finish within {self.timeout:g} s "
                "and was stopped",
                stderr=self.decode(stderr or ""),
                timed_out=True,
            ) from None
        except BaseException:
            self.kill()  # interrupted: leave no child behind
            raise
        stderr = self.decode(stderr)
        log.debug(
            "`%s` exited %d after %.2f s",
            command_name(self.argv),
            self.proc.returncode,
            time.monotonic() - self.started,
        )
        result = subprocess.CompletedProcess(self.argv, self.proc.returncode, stdout, stderr)
        if self.check and self.proc.returncode != 0:
            raise CommandError(
                f"`{command_name(self.argv)}` failed (exit {self.proc.returncode}): "
                f"{last_line(stderr)}",
                stderr=stderr,
            )
        return result

    def _outputs(self) -> tuple[str, str]:
        """communicate(), watching stderr for the stall bound when there is one."""
        remaining = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
        if self.stall is None:
            return self.proc.communicate(self.input, timeout=remaining)
        assert self.input is None, "a watched program reads no input"
        assert self.proc.stdout is not None and self.proc.stderr is not None
        streams = {self.proc.stdout.fileno(): bytearray(), self.proc.stderr.fileno(): bytearray()}
        err = self.proc.stderr.fileno()
        with contextlib.suppress(OSError):  # the default 64 KiB does, if more is refused
            fcntl.fcntl(err, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        with selectors.DefaultSelector() as selector:
            for fd in streams:
                selector.register(fd, selectors.EVENT_READ)
            heard = time.monotonic()
            while selector.get_map():
                now = time.monotonic()
                if self.deadline is not None and now >= self.deadline:
                    text = streams[err].decode(errors="replace")
                    raise subprocess.TimeoutExpired(self.argv, self.timeout or 0, stderr=text)
                if now - heard >= self.stall:
                    raise _Stalled(streams[err].decode(errors="replace"))
                bound = heard + self.stall - now
                if self.deadline is not None:
                    bound = min(bound, self.deadline - now)
                for key, _ in selector.select(bound):
                    data = os.read(key.fd, PIPE_SIZE)
                    if not data:
                        selector.unregister(key.fd)
                        continue
                    streams[key.fd] += data
                    if key.fd == err:
                        heard = time.monotonic()
                if selector.get_map():
                    time.sleep(READ_EVERY)  # let the next events gather in the pipe
        self.proc.wait()
        out = streams[self.proc.stdout.fileno()].decode(errors="replace")
        return out, streams[err].decode(errors="replace")

    def kill(self) -> None:
        """Stop the program and everything it started; reap it."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            self.proc.kill()
        self.proc.wait()


# A watched program's output is read at most every READ_EVERY seconds, in one
# read of up to PIPE_SIZE bytes. nix copy reports about 40 progress events per MB
# it copies, each written on its own: woken for every one, nixspool used 0.3 s of
# CPU beside a 3 s copy of 551 MB (11,000 wake-ups), on cores the copy needs. A
# stall bound is seconds; 20 ms late is nothing to it, or to a program's end.
READ_EVERY = 0.02
PIPE_SIZE = 1 << 20  # what the pipe holds meanwhile (Linux's default allowance)


class _Stalled(Exception):
    def __init__(self, stderr: str) -> None:
        super().__init__(stderr)
        self.stderr = stderr


def spawn(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    account: Account | None = None,
    input: str | None = None,
    stall: float | None = None,
    decode: Callable[[str], str] | None = None,
) -> Running:
    """Start argv (as `account` if given) and return without waiting. `stall`: stop
    it once it has written nothing to stderr for that long (its progress); `decode`:
    its stderr as people read it."""
    log.debug("$ %s", shlex.join(argv))
    user_args: dict[str, object] = {}
    if account is not None and os.geteuid() != account.uid:
        # subprocess applies these in the safe order: groups, gid, then uid.
        user_args = {
            "user": account.uid,
            "group": account.gid,
            "extra_groups": list(account.groups),
        }
    program = executable(argv[0], env)
    try:
        proc = subprocess.Popen(
            [program, *argv[1:]],
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
        raise CommandError(f"cannot run {program}: {e.strerror}") from None
    return Running(argv, proc, input, timeout, check, stall, decode)


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
    return spawn(argv, check=check, timeout=timeout, env=env, account=account, input=input).wait()


class Streaming:
    """A started program whose output is read as it comes, as bytes (a NAR): read
    `stdout` to its end, then finish()."""

    def __init__(self, argv: Sequence[str], proc: subprocess.Popen[bytes], stderr: IO[bytes]):
        self.argv = list(argv)
        self.proc = proc
        self.stdout: IO[bytes] = proc.stdout  # type: ignore[assignment]
        self._stderr = stderr

    def finish(self) -> None:
        """Wait for the program (its output was read); CommandError if it failed."""
        returncode = self.proc.wait()
        self._stderr.seek(0)
        stderr = self._stderr.read().decode(errors="replace")
        self._stderr.close()
        self.proc.stdout.close()  # type: ignore[union-attr]
        if returncode != 0:
            raise CommandError(
                f"`{command_name(self.argv)}` failed (exit {returncode}): {last_line(stderr)}",
                stderr=stderr,
            )

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._stderr.close()
        self.proc.stdout.close()  # type: ignore[union-attr]


def stream(argv: Sequence[str]) -> Streaming:
    """Start argv, as whoever runs nixspool, to read its output as it comes. Its
    stderr goes to a temporary file: a pipe nobody reads while stdout is read
    could fill up and stall it.

    Unlike spawn(), it stays in the caller's process group, without a preexec_fn:
    its caller is a child that nixspool bounds and kills as a group (the cache
    writer, whose paramiko runs threads, where a preexec_fn is not safe); and
    if the caller dies, its next write into the closed pipe ends it."""
    log.debug("$ %s", shlex.join(argv))
    program = executable(argv[0], None)
    stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by finish() or kill()
    try:
        proc = subprocess.Popen(
            [program, *argv[1:]],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd="/",
        )
    except OSError as e:
        stderr.close()
        raise CommandError(f"cannot run {program}: {e.strerror}") from None
    return Streaming(argv, proc, stderr)


@functools.cache
def _prctl() -> Callable[[int, int], int]:
    import ctypes  # once, in nixspool, not after every fork

    prctl: Callable[[int, int], int] = ctypes.CDLL(None, use_errno=True).prctl
    return prctl


def _die_with(parent: int) -> Callable[[], None]:
    """In the child: get SIGKILL when nixspool dies, even by SIGKILL, so no nix copy
    or ssh is left running unbounded. Runs after the uid change (which clears it).
    A preexec_fn is only safe in a process without threads: nixspool starts none
    (its progress bar refreshes when told, not from a thread of its own)."""
    prctl = _prctl()

    def set_parent_death_signal() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG, <linux/prctl.h>
        if os.getppid() != parent:  # the parent died before prctl: too late for it
            os._exit(1)

    return set_parent_death_signal


def executable(program: str, env: Mapping[str, str] | None) -> str:
    """`program` as the child would find it on its own PATH (`env`'s, or this
    process's), resolved here so that a missing one is told as such, with the
    PATH searched: on NixOS that PATH is all there is (no /usr/bin)."""
    if "/" in program:  # a path already: exec takes it as it is, and says why not
        return program
    path = (os.environ if env is None else env).get("PATH", os.defpath)  # as exec would
    found = shutil.which(program, path=path)
    if found is None:
        raise CommandError(
            f"cannot run {program}: it is not on PATH ({path}); install it, "
            "or start nixspool with a PATH that has it (a unit's Environment=PATH; "
            "on NixOS, services.nixspool.extraPackages)"
        )
    return found


def command_name(argv: Sequence[str]) -> str:
    """The program and its subcommand, for messages: `nix copy`, `nix store info`,
    `nix-store --check-validity`, `python3 -m nixspool.probe`."""
    program, rest = os.path.basename(argv[0]), list(argv[1:])
    module = installation.module_of(list(argv))
    if module is not None:
        return f"{program} -m {module}"
    if program == "ssh":  # its options come first and take values: `ssh -o ...`
        return program
    if rest[:1] == ["--extra-experimental-features"]:  # nix.NIX's prefix
        rest = rest[2:]
    words = list(itertools.takewhile(lambda arg: not arg.startswith("-"), rest))
    if not words:  # an operation given as an option: nix-store --check-validity
        words = rest[:2] if rest[:1] == ["-m"] else rest[:1]
    return " ".join([program, *words])


def last_line(text: str) -> str:
    """The last non-empty line of a command's stderr: usually the error."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no error output)"
