"""A static binary cache that nixspool writes itself: an sftp:// remote, and a
file:// one with skip_signed_by.

Over SFTP the host needs sshd and SFTP, no Nix: nixspool makes each path's NAR
from the local store (nar.py, in this process), compresses it, and writes it and its
narinfo (narinfo.py) into the directory named by the URL,
sftp://[user@]host/dir. A file:// cache that leaves paths to upstream
(skip_signed_by) is written the same way into a local directory: Nix's own
writer refuses a path whose references the cache lacks, which is the point.

The writing runs in a child process as the configured user
(`python -m nixspool.static_cache`): over SFTP through the user's own ssh (sftp.py),
as nix copy and the probe reach a host, bounded by copy_timeout as a whole and
by connect_timeout for each step, so a link that goes away mid-transfer ends it. The parent
signs (it may read the key; the child never sees it) and hands over each
path's narinfo fields as JSON; the child answers with what it wrote, or why
it stopped, as JSON.

How a cut link never leaves a file that looks whole: each NAR and narinfo is
written to a temporary name in `.nixspool-partial/` and renamed into place
(an atomic rename(2) on the host, through OpenSSH's posix-rename), the NAR
first, and a path only after its references. What a cut left in
`.nixspool-partial/` is removed by a later upload once it is a day old (another
builder may be writing there right now). Which paths are there already is
known from one listing of the directory, not a question per path.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import posixpath
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from . import nar, narinfo, nix, privileges
from .config import Remote
from .errors import CommandError
from .hook.storepath import nix_base32
from .narinfo import Entry
from .probe import SshCommand
from .run import Account, Running, spawn
from .sftp import LoginFailed, connection

PARTIAL_DIR = ".nixspool-partial"
PARTIAL_MAX_AGE = 24 * 3600  # a partial file this old has no writer any more
WORKERS = 4  # paths written at once, each over its own SFTP session
CHUNK = 1 << 20


class Kind:
    """Why an upload stopped (UploadResult.error["kind"])."""

    LOGIN = "login"  # the SSH login failed: `verdict` says how, as the probe's
    LINK = "link"  # the connection broke or stalled mid-transfer
    CACHE = "cache"  # the host refuses the directory (missing, permission): a person
    WRITE = "write"  # a write failed on the host (SFTP "Failure": a full disk...)
    PATH = "path"  # one path cannot be written (gone from the local store, corrupt)


@dataclass
class UploadRequest:
    login: SshCommand | None  # None: a local directory (file://)
    directory: str  # on the host, absolute
    compression: str
    store_dir: str
    entries: list[Entry]  # references first
    check_only: bool = False  # read the directory, write nothing (`nixspool doctor`)

    @classmethod
    def from_json(cls, text: str) -> UploadRequest:
        """The request as start_upload() sent it (asdict, as JSON)."""
        data = json.loads(text)
        login = data.pop("login")
        return cls(
            **data
            | {
                "login": (
                    SshCommand(**login | {"options": tuple(login["options"])}) if login else None
                ),
                "entries": [Entry.from_json(e) for e in data["entries"]],
            }
        )


@dataclass
class UploadResult:
    """What the child did; `error` when it stopped early: {kind, message[, path, verdict]}."""

    uploaded: list[str] = field(default_factory=list)  # written now
    present: list[str] = field(default_factory=list)  # their narinfo was there already
    bytes: int = 0  # compressed NAR bytes written
    narinfo_files: int = 0  # in the directory when it was listed
    # check_only: the store path hashes whose narinfo is there (what reconciling asks)
    narinfo_hashes: list[str] = field(default_factory=list)
    error: dict[str, str] | None = None


def directory_of(url: str) -> str:
    """The cache's directory: sftp://pi/srv/cache and file:///srv/cache are /srv/cache."""
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path).rstrip("/") or "/"


# -- the parent: start it, read its answer ---------------------------------------------


def start_upload(
    remote: Remote,
    entries: Sequence[Entry],
    account: Account,
    *,
    accept_new_host_keys: bool,
    store_dir: str,
    check_only: bool = False,
) -> Running:
    """Write `entries` (references first) to `remote`, as `account`, in a child."""
    request = UploadRequest(
        login=(SshCommand.of(remote, accept_new_host_keys) if remote.is_sftp_cache else None),
        directory=directory_of(remote.url),
        compression=remote.compression,
        store_dir=store_dir,
        entries=list(entries),
        check_only=check_only,
    )
    return spawn(
        [sys.executable, "-m", "nixspool.static_cache"],
        input=json.dumps(asdict(request)),
        account=account,
        env=privileges.child_env(account),
        timeout=remote.copy_timeout,
    )


def read_cache(remote: Remote, account: Account, *, accept_new_host_keys: bool) -> UploadResult:
    """The cache directory read as `account`, nothing written: its narinfo names
    (`nixspool doctor`, reconciling). CommandError as result_of() raises it."""
    from .hook.storepath import store_dir

    running = start_upload(
        remote,
        [],
        account,
        accept_new_host_keys=accept_new_host_keys,
        store_dir=store_dir(),
        check_only=True,
    )
    return result_of(running)


def result_of(running: Running) -> UploadResult:
    """The child's answer. CommandError if it ran past copy_timeout (timed_out) or
    crashed or printed nonsense (a bug: its traceback is in the error's stderr)."""
    completed = running.wait()
    try:
        return UploadResult(**json.loads(completed.stdout))
    except (ValueError, TypeError) as e:
        raise CommandError(
            f"the cache writer printed what nixspool cannot read ({e})", stderr=completed.stderr
        ) from None


# -- the child: runs as the user ---------------------------------------------------


class _Stop(Exception):
    def __init__(self, kind: str, message: str, **detail: str) -> None:
        super().__init__(message)
        self.error = {"kind": kind, "message": message, **detail}


def _read(chunks: Iterator[bytes], path: str) -> Iterator[bytes]:
    """The NAR's chunks; a part of the path that cannot be read, or a failed dump,
    is the path's failure."""
    try:
        yield from chunks
    except nar.ChangedWhileRead as e:
        raise _Stop(Kind.PATH, f"{path}: {e}", path=path) from None
    except OSError as e:
        raise _Stop(Kind.PATH, f"{path}: cannot read it: {e}", path=path) from None
    except CommandError as e:
        raise _Stop(Kind.PATH, str(e), path=path) from None


class _Cancelled(Exception):
    """Another path's upload stopped this one before it began."""


class _Writer:
    """One upload: WORKERS paths at a time, each worker with its own SFTP session
    (an SFTP session answers one request after another: with a few, small paths
    travel side by side, and compression uses both cores)."""

    def __init__(
        self,
        open_files: Callable[[], Any],
        transport: Any,
        request: UploadRequest,
        result: UploadResult,
    ):
        self._open_files = open_files  # a new SFTPClient, or sftp.LocalFiles
        self._mine = threading.local()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.transport = transport
        self.request = request
        self.root = request.directory
        self.partial = posixpath.join(self.root, PARTIAL_DIR)
        self.result = result

    @property
    def sftp(self) -> Any:
        """This thread's session."""
        files = getattr(self._mine, "files", None)
        if files is None:
            with self.remote_step("opening an SFTP session"):
                files = self._mine.files = self._open_files()
        return files

    @contextlib.contextmanager
    def remote_step(self, what: str) -> Iterator[None]:
        """Turn what SFTP raises into why the upload stopped."""
        import paramiko

        try:
            yield
        except _Stop:
            raise
        except (OSError, EOFError, paramiko.SSHException) as e:
            # A request that waited past the stall bound (TimeoutError), a closed
            # channel or transport: the link, not the host's answer.
            broken = (TimeoutError, EOFError, ConnectionError, paramiko.SSHException)
            if isinstance(e, broken) or not self.transport.is_active():
                raise _Stop(
                    Kind.LINK, f"the connection broke while {what}: {e or type(e).__name__}"
                ) from None
            if e.errno in (errno.ENOENT, errno.EACCES):
                raise _Stop(
                    Kind.CACHE,
                    f"{what}: {e.strerror or e}; does {self.root} exist, writable by "
                    "the user nixspool writes as?",
                ) from None
            # OpenSSH reports most failed writes (ENOSPC, EROFS, EDQUOT) as the one
            # SFTP status "Failure": space may come back, so try again later.
            raise _Stop(
                Kind.WRITE,
                f"{what}: the host refused a write ({e}); is its disk full?",
            ) from None

    def prepare(self) -> set[str]:
        """Check the cache directory, create what is missing; the narinfo names there."""
        with self.remote_step(f"listing {self.root}"):
            names = set(self.sftp.listdir(self.root))
        self.result.narinfo_files = sum(n.endswith(".narinfo") for n in names)
        if self.request.check_only:
            self.result.narinfo_hashes = sorted(
                n[: -len(".narinfo")] for n in names if n.endswith(".narinfo")
            )
        if narinfo.CACHE_INFO in names:
            cache_info = posixpath.join(self.root, narinfo.CACHE_INFO)
            with self.remote_step(f"reading {cache_info}"), self.sftp.open(cache_info) as f:
                text = f.read(4096).decode(errors="replace")
            theirs = narinfo.store_dir_of(text)
            if theirs not in (None, self.request.store_dir):
                raise _Stop(
                    Kind.CACHE,
                    f"{self.root} is a binary cache for the store {theirs}, not "
                    f"{self.request.store_dir}",
                )
        if self.request.check_only:
            return set()
        for name in (narinfo.NAR_DIR, PARTIAL_DIR):
            if name not in names:
                with self.remote_step(f"creating {self.root}/{name}"):
                    try:
                        self.sftp.mkdir(posixpath.join(self.root, name))
                    except OSError:
                        if not self.transport.is_active():
                            raise
                        # Made by another writer just now; or the writes into it
                        # will say what is wrong.
        if narinfo.CACHE_INFO not in names:
            self.write_file(narinfo.CACHE_INFO, narinfo.cache_info(self.request.store_dir))
        self.remove_old_partials()
        return {n for n in names if n.endswith(".narinfo")}

    def remove_old_partials(self) -> None:
        with self.remote_step(f"cleaning {self.partial}"):
            for attr in self.sftp.listdir_attr(self.partial):
                if attr.st_mtime is not None and attr.st_mtime < time.time() - PARTIAL_MAX_AGE:
                    with contextlib.suppress(OSError):
                        self.sftp.remove(posixpath.join(self.partial, attr.filename))

    def temporary(self, suffix: str) -> str:
        return posixpath.join(self.partial, f"{uuid.uuid4().hex}{suffix}")

    def rename(self, temporary: str, name: str) -> None:
        """Into place, atomically, replacing what is there (another writer's copy of
        the same content)."""
        self.sftp.posix_rename(temporary, posixpath.join(self.root, name))

    def write_file(self, name: str, text: str) -> None:
        temporary = self.temporary(".tmp")
        with self.remote_step(f"writing {self.root}/{name}"):
            with self.sftp.open(temporary, "wb") as f:
                f.write(text.encode())
            self.rename(temporary, name)

    def upload(self, entry: Entry, references: Sequence[Future[None]]) -> None:
        """The path's NAR, then, once its references' are in place, its narinfo."""
        if self._stopping.is_set():
            raise _Cancelled
        try:
            url, digest, file_size = self.upload_nar(entry)
            for reference in references:
                reference.result()  # failed: raises, and this narinfo is not written
            self.write_file(
                narinfo.narinfo_name(entry.path),
                entry.text(url, self.request.compression, digest, file_size),
            )
        except BaseException:
            self._stopping.set()
            raise
        with self._lock:
            self.result.uploaded.append(entry.path)
            self.result.bytes += file_size

    def upload_nar(self, entry: Entry) -> tuple[str, str, int]:
        """Write the path's NAR into place: (its name, its file hash, its size). Made
        here (nar.py); by `nix-store --dump` if this process cannot read the path."""
        try:
            chunks = nar.dump(entry.path)
        except OSError:  # not readable by this user: Nix reads it (through its daemon)
            chunks = nix.dump(entry.path, CHUNK)
        try:
            return self.write_nar(entry, chunks)
        finally:
            chunks.close()  # a write that failed midway: a nix-store --dump is killed now

    def write_nar(self, entry: Entry, chunks: Iterator[bytes]) -> tuple[str, str, int]:
        compression = self.request.compression
        temporary = self.temporary(".nar" + narinfo.EXTENSIONS[compression])
        compress, flush = narinfo.compressor(compression)
        nar_hash, file_hash = hashlib.sha256(), hashlib.sha256()
        nar_size = file_size = 0
        try:
            with self.remote_step(f"uploading {entry.path}"):
                with self.sftp.open(temporary, "wb") as f:
                    if hasattr(f, "set_pipelined"):  # SFTP: no round trip per write
                        f.set_pipelined(True)
                    for chunk in _read(chunks, entry.path):
                        nar_hash.update(chunk)
                        nar_size += len(chunk)
                        out = compress(chunk)
                        file_hash.update(out)
                        file_size += len(out)
                        f.write(out)
                    out = flush()
                    file_hash.update(out)
                    file_size += len(out)
                    f.write(out)
                got = "sha256:" + nix_base32(nar_hash.digest())
                if (got, nar_size) != (entry.nar_hash, entry.nar_size):
                    raise _Stop(
                        Kind.PATH,
                        f"{entry.path}: its contents do not match the local store's record "
                        f"(NAR {got}, {nar_size} bytes; expected {entry.nar_hash}, "
                        f"{entry.nar_size} bytes): run `nix-store --verify --check-contents`",
                        path=entry.path,
                    )
                digest = "sha256:" + nix_base32(file_hash.digest())
                url = narinfo.nar_name(digest, compression)
                self.rename(temporary, url)
        except BaseException:
            with contextlib.suppress(Exception):
                self.sftp.remove(temporary)
            raise
        return url, digest, file_size

    def run(self) -> None:
        present = self.prepare()
        if self.request.check_only:
            return
        uploads: dict[str, Future[None]] = {}
        with ThreadPoolExecutor(WORKERS, thread_name_prefix="nixspool-writer") as pool:
            for entry in self.request.entries:  # references first: theirs are submitted
                if narinfo.narinfo_name(entry.path) in present:
                    self.result.present.append(entry.path)
                    continue
                references = [uploads[r] for r in entry.references if r in uploads]
                uploads[entry.path] = pool.submit(self.upload, entry, references)
        for future in uploads.values():  # the first failure, in the order given
            error = future.exception()
            if error is not None and not isinstance(error, _Cancelled):
                raise error


def upload(request: UploadRequest) -> UploadResult:
    """Reach the cache as the user, write the entries; what was written, and why it
    stopped."""
    result = UploadResult()
    try:
        with connection(request.login) as (open_files, transport):
            _Writer(open_files, transport, request, result).run()
    except LoginFailed as e:
        result.error = {
            "kind": Kind.LOGIN,
            "message": e.result.message,
            "verdict": e.result.verdict.value,
        }
    except _Stop as e:
        result.error = e.error
    return result


def main() -> None:
    """`python -m nixspool.static_cache`: one upload, request and result as JSON."""
    request = UploadRequest.from_json(sys.stdin.read())
    try:
        result = upload(request)
    except Exception:  # a bug: the parent reports it as one, with this traceback
        traceback.print_exc()
        sys.exit(1)
    sys.stdout.write(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
