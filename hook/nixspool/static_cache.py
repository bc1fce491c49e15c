"""A binary cache that nixspool writes itself: an sftp:// remote, an s3:// one, and a
file:// one with skip_signed_by.

Over SFTP the host needs sshd and SFTP, no Nix; an S3-compatible object store
needs a bucket and credentials. nixspool makes each path's NAR from the local
store (nar.py, in this process), compresses it, and writes it and its narinfo
(narinfo.py) into the cache's place (cache_files.py): a directory over SFTP or
here (sftp.py), a bucket (s3.py). A file:// cache that leaves paths to upstream
(skip_signed_by) is written the same way into a local directory: Nix's own
writer refuses a path whose references the cache lacks, which is the point.

The writing runs in a child process as the configured user
(`python -m nixspool.static_cache`, started as installation.py says): over SFTP
through the user's own ssh, as nix copy and the probe reach a host; to a bucket with the user's own
credentials; bounded by copy_timeout as a whole and by connect_timeout for each
step, so a link that goes away mid-transfer ends it. It is started as soon as a
flush finds rows due, with where to write on its first input line, and logs in
while the parent asks Nix about the paths. The parent signs (it may read the
key; the child never sees it) and then hands over each path's narinfo fields as
JSON; the child answers with what it wrote, or why it stopped, as JSON.

A reader never sees a narinfo that promises what is not there: each file goes
into place whole (the place's own way: a rename, an object PUT), the NAR
before its narinfo, a path only after its references. Which paths are there
already is known from one listing, or, for a bucket too large to list cheaply,
from a question per path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import threading
import traceback
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from . import installation, nar, narinfo, privileges
from .cache_files import CacheFiles, Kind, Stop, discarding
from .config import Remote
from .errors import CommandError
from .hook.storepath import nix_base32
from .narinfo import Entry
from .probe import SshCommand
from .run import Account, Running, spawn
from .sftp import DirectoryFiles, LoginFailed, connection

WORKERS = 4  # paths written at once (over SFTP each over its own session)
CHUNK = 1 << 20
EVERY = sys.maxsize  # top_names(EVERY): list them all, however many


@dataclass
class UploadRequest:
    login: SshCommand | None  # None: a local directory (file://)
    directory: str  # on the host, absolute
    compression: str
    store_dir: str
    entries: list[Entry]  # references first
    check_only: bool = False  # read the directory, write nothing (`nixspool doctor`)
    probe_write: bool = False  # check_only, a bucket: write and delete a probe object
    s3: dict[str, Any] | None = None  # an s3:// cache: s3.Location's fields
    # Paths whose narinfo may be there already, written by another builder: add
    # our signatures to theirs (the spool recorded them and we sign them).
    sign_present: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, text: str) -> UploadRequest:
        """The request as start_writer() sent it (asdict, as JSON)."""
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

    def take_batch(self, text: str) -> None:
        """The entries and sign_present as send() wrote them ("": nothing to write)."""
        if text:
            data = json.loads(text)
            self.entries = [Entry.from_json(e) for e in data["entries"]]
            self.sign_present = data["sign_present"]


@dataclass
class UploadResult:
    """What the child did; `error` when it stopped early: {kind, message[, path, verdict]}."""

    uploaded: list[str] = field(default_factory=list)  # written now
    present: list[str] = field(default_factory=list)  # their narinfo was there already
    bytes: int = 0  # compressed NAR bytes written
    narinfo_files: int = 0  # in the directory when it was listed
    # check_only: the store path hashes whose narinfo is there (what reconciling asks)
    narinfo_hashes: list[str] = field(default_factory=list)
    signed: list[str] = field(default_factory=list)  # present: our signatures added
    notes: list[str] = field(default_factory=list)  # what the place wants said (a warning)
    credentials: str = ""  # a bucket: where boto3 found them (env, shared-credentials-file...)
    # How the paths there were found: "listing", or "asked path by path" (a bucket
    # too large to list for this batch).
    looked_up: str = ""
    error: dict[str, str] | None = None


def directory_of(url: str) -> str:
    """The cache's directory: sftp://pi/srv/cache and file:///srv/cache are /srv/cache."""
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path).rstrip("/") or "/"


# -- the parent: start it, read its answer ---------------------------------------------


def start_writer(
    remote: Remote,
    account: Account,
    *,
    accept_new_host_keys: bool,
    store_dir: str,
    check_only: bool = False,
    probe_write: bool = False,
) -> Running:
    """The writer for `remote`, started as `account`: it reaches the cache at once
    (an SSH login, an S3 client) while this process works out what to send, then
    waits for the batch (send())."""
    s3 = None
    if remote.is_s3_cache:
        from .s3 import Location  # imports no boto3: the child does

        s3 = asdict(Location.of(remote))
    request = UploadRequest(
        login=(SshCommand.of(remote, accept_new_host_keys) if remote.is_sftp_cache else None),
        directory=directory_of(remote.url),
        compression=remote.compression,
        store_dir=store_dir,
        entries=[],
        check_only=check_only,
        probe_write=probe_write,
        s3=s3,
    )
    # The user's AWS_* settings (AWS_PROFILE, AWS_SHARED_CREDENTIALS_FILE, keys a
    # unit's EnvironmentFile gives) reach the writer, which runs as the user.
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")} if s3 else {}
    running = spawn(
        installation.python_module("nixspool.static_cache"),
        input="",
        account=account,
        env=privileges.child_env(account, aws),
        timeout=remote.copy_timeout,
    )
    running.send(json.dumps(asdict(request)) + "\n")
    return running


def send(running: Running, entries: Sequence[Entry], sign_present: Sequence[str] = ()) -> Running:
    """What a started writer is to write: `entries` (references first), and the
    paths among them whose narinfos may be there already, to add our signatures to.
    It reads them when result_of() waits."""
    batch = {"entries": [asdict(e) for e in entries], "sign_present": list(sign_present)}
    running.input = json.dumps(batch)
    return running


def read_cache(
    remote: Remote, account: Account, *, accept_new_host_keys: bool, probe_write: bool = False
) -> UploadResult:
    """The cache read as `account`, nothing left written: its narinfo names
    (`nixspool doctor`, reconciling); with probe_write, a bucket's probe object
    written and deleted. CommandError as result_of() raises it."""
    from .hook.storepath import store_dir

    running = start_writer(
        remote,
        account,
        accept_new_host_keys=accept_new_host_keys,
        store_dir=store_dir(),
        check_only=True,
        probe_write=probe_write,
    )
    return result_of(send(running, []))


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


def _read(chunks: Iterator[bytes], path: str) -> Iterator[bytes]:
    """The NAR's chunks; a part of the path that cannot be read, or a failed dump,
    is the path's failure."""
    try:
        yield from chunks
    except nar.ChangedWhileRead as e:
        raise Stop(Kind.PATH, f"{path}: {e}", path=path) from None
    except OSError as e:
        raise Stop(Kind.PATH, f"{path}: cannot read it: {e}", path=path) from None
    except CommandError as e:
        raise Stop(Kind.PATH, str(e), path=path) from None


class _Cancelled(Exception):
    """Another path's upload stopped this one before it began."""


class _Writer:
    """One upload: WORKERS paths at a time into `files` (cache_files.CacheFiles)."""

    def __init__(self, files: CacheFiles, request: UploadRequest, result: UploadResult):
        self.files = files
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.request = request
        self.result = result

    def prepare(self) -> set[str] | None:
        """Check the cache, create what is missing; the narinfo names there (None:
        the place is asked path by path)."""
        files = self.files
        wanted = EVERY if self.request.check_only else len(self.request.entries)
        names = files.top_names(wanted)
        narinfos = None if names is None else {n for n in names if n.endswith(".narinfo")}
        self.result.looked_up = "listing" if names is not None else "asked path by path"
        if narinfos is not None:
            self.result.narinfo_files = len(narinfos)
            if self.request.check_only:
                self.result.narinfo_hashes = sorted(n[: -len(".narinfo")] for n in narinfos)
        text = None
        if names is None or narinfo.CACHE_INFO in names:
            data = files.read(narinfo.CACHE_INFO)
            text = None if data is None else data.decode(errors="replace")
        theirs = None if text is None else narinfo.store_dir_of(text)
        if theirs not in (None, self.request.store_dir):
            raise Stop(
                Kind.CACHE,
                f"{files.description} is a binary cache for the store {theirs}, not "
                f"{self.request.store_dir}",
            )
        if not self.request.check_only or self.request.probe_write:
            files.make_layout()
        if self.request.check_only:
            return set()
        if text is None:
            with files.step(f"writing {narinfo.CACHE_INFO}"):
                files.put(narinfo.CACHE_INFO, narinfo.cache_info(self.request.store_dir).encode())
        files.clean_up()
        return narinfos

    def upload(self, entry: Entry, references: Sequence[Future[None]]) -> None:
        """The path's NAR, then, once its references' are in place, its narinfo."""
        if self._stopping.is_set():
            raise _Cancelled
        try:
            url, digest, file_size = self.upload_nar(entry)
            for reference in references:
                reference.result()  # failed: raises, and this narinfo is not written
            name = narinfo.narinfo_name(entry.path)
            text = entry.text(url, self.request.compression, digest, file_size)
            with self.files.step(f"writing {name}"):
                self.files.put_narinfo(name, text, entry)
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
            chunks = nar.dump_by_nix(entry.path, CHUNK)
        try:
            return self.write_nar(entry, chunks)
        finally:
            chunks.close()  # a write that failed midway: a nix-store --dump is killed now

    def write_nar(self, entry: Entry, chunks: Iterator[bytes]) -> tuple[str, str, int]:
        compression = self.request.compression
        compress, flush = narinfo.compressor(compression, entry.nar_size)
        nar_hash, file_hash = hashlib.sha256(), hashlib.sha256()
        nar_size = file_size = 0
        with self.files.step(f"uploading {entry.path}"):
            upload = self.files.new_nar(".nar" + narinfo.EXTENSIONS[compression])
            with discarding(upload):
                for chunk in _read(chunks, entry.path):
                    nar_hash.update(chunk)
                    nar_size += len(chunk)
                    out = compress(chunk)
                    file_hash.update(out)
                    file_size += len(out)
                    upload.write(out)
                out = flush()
                file_hash.update(out)
                file_size += len(out)
                upload.write(out)
                got = "sha256:" + nix_base32(nar_hash.digest())
                if (got, nar_size) != (entry.nar_hash, entry.nar_size):
                    raise Stop(
                        Kind.PATH,
                        f"{entry.path}: its contents do not match the local store's record "
                        f"(NAR {got}, {nar_size} bytes; expected {entry.nar_hash}, "
                        f"{entry.nar_size} bytes): run `nix-store --verify --check-contents`",
                        path=entry.path,
                    )
                digest = "sha256:" + nix_base32(file_hash.digest())
                url = narinfo.nar_name(digest, compression)
                upload.commit(url)
        return url, digest, file_size

    def is_there(self, entry: Entry) -> bool:
        """Its narinfo is in the cache, asked of the place (no listing to look in)."""
        name = narinfo.narinfo_name(entry.path)
        with self.files.step(f"looking for {name}"):
            return self.files.has(name)

    def sign_present(self, entry: Entry) -> None:
        """A path another writer put there: our signatures too, where the place can."""
        name = narinfo.narinfo_name(entry.path)
        with self.files.step(f"adding signatures to {name}"):
            if self.files.add_signatures(name, entry):
                with self._lock:
                    self.result.signed.append(entry.path)

    def run(self) -> None:
        present = self.prepare()
        if self.request.check_only:
            return
        sign_present = set(self.request.sign_present)
        uploads: dict[str, Future[None]] = {}
        entries = self.request.entries
        with ThreadPoolExecutor(WORKERS, thread_name_prefix="nixspool-writer") as pool:
            if present is None:  # asked path by path: side by side
                there = pool.map(self.is_there, entries)
            else:
                there = (narinfo.narinfo_name(e.path) in present for e in entries)
            found = dict(zip((e.path for e in entries), there, strict=True))
            signing = []
            for entry in self.request.entries:  # references first: theirs are submitted
                if found[entry.path]:
                    self.result.present.append(entry.path)
                    if entry.path in sign_present:
                        signing.append(pool.submit(self.sign_present, entry))
                    continue
                references = [uploads[r] for r in entry.references if r in uploads]
                uploads[entry.path] = pool.submit(self.upload, entry, references)
        for future in [*uploads.values(), *signing]:  # the first failure, in the order given
            error = future.exception()
            if error is not None and not isinstance(error, _Cancelled):
                raise error


@contextlib.contextmanager
def place(request: UploadRequest) -> Iterator[CacheFiles]:
    """The cache's place, reached as this process's user."""
    if request.s3 is not None:
        from . import s3

        yield s3.BucketFiles(s3.Location(**request.s3))
        return
    with connection(request.login) as (open_files, transport):
        yield DirectoryFiles(open_files, transport, request.directory)


def upload(request: UploadRequest, batch: Callable[[], str]) -> UploadResult:
    """Reach the cache as the user, then write the entries `batch()` gives; what was
    written, and why it stopped."""
    result = UploadResult()
    try:
        with place(request) as files:
            try:
                files.reach()
                request.take_batch(batch())
                if not request.entries and not request.check_only:
                    return result  # nothing to write (send() was not called)
                _Writer(files, request, result).run()
            finally:
                result.notes.extend(files.notes)
                result.credentials = files.credentials
    except LoginFailed as e:
        result.error = {
            "kind": Kind.LOGIN,
            "message": e.result.message,
            "verdict": e.result.verdict.value,
        }
    except Stop as e:
        result.error = e.error
    return result


def main() -> None:
    """`python -m nixspool.static_cache`: one upload, request and result as JSON: the
    request's first line says where, the rest what (see start_writer, send)."""
    request = UploadRequest.from_json(sys.stdin.readline())
    try:
        result = upload(request, sys.stdin.read)
    except Exception:  # a bug: the parent reports it as one, with this traceback
        traceback.print_exc()
        sys.exit(1)
    sys.stdout.write(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
