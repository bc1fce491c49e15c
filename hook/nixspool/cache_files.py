"""What the cache writer (static_cache.py) asks of the place a binary cache lives,
and how a place says why it stopped.

The writer decides what to write and in which order (a NAR before its narinfo, a
path's references before the path); a place only stores files: a directory over
SFTP or on this machine (sftp.py), a bucket of an S3-compatible object store
(s3.py). Each puts a file so that a reader sees all of it or nothing, lists the
narinfos there, and cleans up what an interrupted writer left.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

from .narinfo import Entry

PARTIAL_MAX_AGE = 24 * 3600  # a partial upload this old has no writer any more


class Kind:
    """Why an upload stopped (UploadResult.error["kind"])."""

    LOGIN = "login"  # the SSH login failed: `verdict` says how, as the probe's
    AWAY = "away"  # the endpoint did not answer at all (no route, refused, no name)
    LINK = "link"  # the connection broke or stalled mid-transfer
    CACHE = "cache"  # the place refuses us (missing, permission, credentials): a person
    WRITE = "write"  # a write failed there (a full disk, throttled past our patience)
    PATH = "path"  # one path cannot be written (gone from the local store, corrupt)
    LOCAL = "local"  # this machine failed the writer (no room for a NAR on its way)


class Stop(Exception):
    """The upload stops here; `error` is what the parent reads."""

    def __init__(self, kind: str, message: str, **detail: str) -> None:
        super().__init__(message)
        self.error = {"kind": kind, "message": message, **detail}


class NarUpload(Protocol):
    """One NAR on its way: its bytes, then its name once they are all hashed."""

    def write(self, data: bytes) -> None: ...

    def commit(self, name: str) -> None:
        """Into place under `name` (nar/<file hash>.nar.zst), whole or not at all."""

    def discard(self) -> None:
        """Forget it (a failed write); never raises."""


class CacheFiles(Protocol):
    """A binary cache's place. Every method may raise Stop; `step` turns what the
    place's own library raises into one."""

    description: str  # where, for messages: /srv/cache, s3://bucket/prefix
    notes: list[str]  # what the parent should say as warnings
    credentials: str  # where the place's credentials came from, if it has any

    def step(self, what: str) -> contextlib.AbstractContextManager[None]: ...

    def reach(self) -> None:
        """Log in, connect: what takes time before the first request, done while
        the parent still works out what to write."""

    def top_names(self, wanted: int) -> set[str] | None:
        """The names at the cache's top (narinfos, nix-cache-info), or None where
        listing them would cost more than asking about the `wanted` paths one by
        one (`has`)."""

    def has(self, name: str) -> bool: ...

    def read(self, name: str) -> bytes | None:
        """A small file's contents (nix-cache-info), None if there is none."""

    def make_layout(self) -> None:
        """What must exist before files go in (directories); nothing for a bucket."""

    def clean_up(self) -> None:
        """Remove what interrupted writers left, once it is PARTIAL_MAX_AGE old
        (another writer may be writing now)."""

    def put(self, name: str, data: bytes) -> None:
        """A small file into place, whole, replacing what is there."""

    def new_nar(self, suffix: str) -> NarUpload: ...

    def put_narinfo(self, name: str, text: str, entry: Entry) -> None:
        """The path's narinfo into place; where another writer's is there (with
        other signatures), keep theirs and add our signatures where the place can
        do that safely."""

    def add_signatures(self, name: str, entry: Entry) -> bool:
        """Add the entry's signatures to the narinfo there; False where this place
        cannot do it without risking another writer's."""


@contextlib.contextmanager
def discarding(upload: NarUpload) -> Iterator[NarUpload]:
    """`upload`, discarded if what runs with it fails."""
    try:
        yield upload
    except BaseException:
        upload.discard()
        raise
