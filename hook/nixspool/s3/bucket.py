"""The cache's files in a bucket (BucketFiles, a cache_files.CacheFiles); the
package's docstring says how they stay whole."""

from __future__ import annotations

import contextlib
import functools
import os
import random
import tempfile
import threading
import time
import uuid
from typing import Any

from .. import narinfo
from ..cache_files import PARTIAL_MAX_AGE, Kind, Stop
from ..narinfo import Entry
from .connect import CONDITION_FAILED, Location, client, error_code, patiently, stopping

PAGE = 1000  # names per listing request (S3's own maximum)
PATHS_PER_PAGE = 100  # list while a page serves this many paths; else HEAD per path
MERGE_ATTEMPTS = 8  # read-modify-writes of one narinfo that other writers may race
SPOOL_IN_MEMORY = 8 << 20  # a NAR up to this size is made in memory, larger on disk


class BucketFiles:
    """A cache in a bucket (cache_files.CacheFiles). boto3's client is shared by
    the writer's threads (it is thread-safe)."""

    def __init__(self, location: Location) -> None:
        try:
            import boto3  # noqa: F401 - the optional extra: here, or a clear word
        except ImportError:
            raise Stop(
                Kind.CACHE,
                "s3:// caches need boto3, which this nixspool was installed without: "
                "pip install 'nixspool[s3]' (the NixOS package has it)",
            ) from None
        self.location = location
        self.bucket = location.bucket
        self.description = location.description
        self.notes: list[str] = []  # said by the parent as warnings
        self._lock = threading.Lock()
        self.conditional = True  # until make_layout() finds otherwise
        profile = location.profile or os.environ.get("AWS_PROFILE")
        with self.step(f"reading the S3 credentials{f' of profile {profile}' if profile else ''}"):
            self.s3, self.s3_parts, self.credentials = client(location)

    def reach(self) -> None:
        pass  # the client was made with the credentials; it connects on the first request

    def key(self, name: str) -> str:
        return self.location.prefix + name

    def step(self, what: str) -> contextlib.AbstractContextManager[None]:
        """Turn what boto3 raises into why the upload stopped."""
        return stopping(what, self.description)

    # -- reading ----------------------------------------------------------------

    def top_names(self, wanted: int) -> set[str] | None:
        """The names at the prefix, one request per PAGE; None once the pages would
        outnumber what HEADs for `wanted` paths cost (a page per PATHS_PER_PAGE)."""
        budget = 1 + wanted // PATHS_PER_PAGE
        names: set[str] = set()
        token: dict[str, str] = {}
        start = len(self.location.prefix)
        with self.step(f"listing {self.description}"):
            for _ in range(budget):
                page = patiently(functools.partial(self._list_page, token))
                names.update(o["Key"][start:] for o in page.get("Contents", ()))
                for directory in page.get("CommonPrefixes", ()):
                    names.add(directory["Prefix"][start:].rstrip("/"))
                if not page.get("IsTruncated"):
                    return names
                token = {"ContinuationToken": page["NextContinuationToken"]}
        return None

    def _list_page(self, token: dict[str, str]) -> Any:
        return self.s3.list_objects_v2(
            Bucket=self.bucket, Prefix=self.location.prefix, Delimiter="/", MaxKeys=PAGE, **token
        )

    def has(self, name: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            patiently(lambda: self.s3.head_object(Bucket=self.bucket, Key=self.key(name)))
        except ClientError as e:
            if _absent(e):
                return False
            raise
        return True

    def _get(self, name: str) -> tuple[bytes, str] | None:
        """(contents, ETag), None if there is no such object."""
        from botocore.exceptions import ClientError

        try:
            got = patiently(lambda: self.s3.get_object(Bucket=self.bucket, Key=self.key(name)))
        except ClientError as e:
            if _absent(e):
                return None
            raise
        return got["Body"].read(), got["ETag"]

    def read(self, name: str) -> bytes | None:
        with self.step(f"reading {self.key(name)}"):
            got = self._get(name)
        return None if got is None else got[0]

    # -- writing ------------------------------------------------------------------

    def make_layout(self) -> None:
        """Nothing to create; find out once whether the store honours conditional
        writes (the same probe object PUT twice with If-None-Match: *)."""
        from botocore.exceptions import ClientError

        probe = self.key(f".nixspool-probe-{uuid.uuid4().hex}")
        with self.step("writing a probe object"):
            try:
                for _ in range(2):
                    patiently(
                        lambda: self.s3.put_object(
                            Bucket=self.bucket, Key=probe, Body=b"", IfNoneMatch="*"
                        )
                    )
                self.conditional = False
            except ClientError as e:
                code, status = error_code(e)
                if code not in CONDITION_FAILED and status not in (412, 501):
                    raise
                self.conditional = code in CONDITION_FAILED or status == 412
            finally:
                with contextlib.suppress(ClientError):
                    self.s3.delete_object(Bucket=self.bucket, Key=probe)
        if not self.conditional:
            self.notes.append(
                f"{self.description}: the store ignores conditional writes (If-None-Match); "
                "two builders that write one path at the same moment may keep only one "
                "builder's signature"
            )

    def clean_up(self) -> None:
        """Abort the multipart uploads that writers killed mid-way left, once a day
        old (another builder may be uploading now): the store bills for their parts."""
        from botocore.exceptions import ClientError

        with self.step("cleaning interrupted multipart uploads"):
            try:
                uploads = self.s3.list_multipart_uploads(
                    Bucket=self.bucket, Prefix=self.location.prefix
                ).get("Uploads", ())
            except ClientError as e:
                if error_code(e)[0] in ("AccessDenied", "NotImplemented"):
                    return  # not every identity may list them; not ours to insist
                raise
            for upload in uploads:
                if upload["Initiated"].timestamp() < time.time() - PARTIAL_MAX_AGE:
                    with contextlib.suppress(ClientError):
                        self.s3.abort_multipart_upload(
                            Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )

    def put(self, name: str, data: bytes, **conditions: str) -> None:
        patiently(
            lambda: self.s3.put_object(
                Bucket=self.bucket, Key=self.key(name), Body=data, **conditions
            )
        )

    def put_narinfo(self, name: str, text: str, entry: Entry) -> None:
        from botocore.exceptions import ClientError

        if not self.conditional:
            if not self.add_signatures(name, entry, absent_ok=True):
                self.put(name, text.encode())
            return
        try:
            self.put(name, text.encode(), IfNoneMatch="*")
        except ClientError as e:
            if error_code(e)[0] not in CONDITION_FAILED:
                raise
            self.add_signatures(name, entry)  # another builder's came first

    def add_signatures(self, name: str, entry: Entry, absent_ok: bool = False) -> bool:
        """Our signatures added to the narinfo there, guarded by its ETag; False if
        there is none (absent_ok) or nothing to add. Raises Stop if other writers
        keep winning the race."""
        from botocore.exceptions import ClientError

        for _ in range(MERGE_ATTEMPTS):
            got = self._get(name)
            if got is None:
                if absent_ok:
                    return False
                raise Stop(Kind.WRITE, f"{self.key(name)} vanished while signatures were added")
            data, etag = got
            try:
                merged = narinfo.with_signatures(data.decode(errors="replace"), entry)
            except narinfo.OtherContents as e:
                with self._lock:
                    self.notes.append(
                        f"{entry.path}: {self.description} has another build of it "
                        f"(NarHash {e}); kept, without our signature"
                    )
                return False
            if merged is None:
                return False
            try:
                self.put(name, merged.encode(), **({"IfMatch": etag} if self.conditional else {}))
                return True
            except ClientError as e:
                if error_code(e)[0] not in CONDITION_FAILED:
                    raise
                # Another writer changed it: read it again, a moment later than they.
                time.sleep(random.uniform(0.01, 0.1))  # noqa: S311 - jitter, not a secret
        raise Stop(
            Kind.WRITE,
            f"{self.key(name)}: other writers kept changing it; our signatures were not added",
        )

    def new_nar(self, suffix: str) -> _BucketNar:
        return _BucketNar(self)


def _absent(e: BaseException) -> bool:
    """The store says there is no such object: GET's NoSuchKey, or HEAD's bare 404
    (a HEAD answer has no body, so botocore names it by its status). A missing
    bucket (NoSuchBucket) is not this: it raises, and the upload stops there."""
    return error_code(e)[0] in ("NoSuchKey", "404")


class _BucketNar:
    """A NAR made into a temporary file (memory while small), PUT once named."""

    def __init__(self, files: BucketFiles) -> None:
        self._files = files
        # Closed by commit() or discard(): the writer holds it across calls.
        self._file = tempfile.SpooledTemporaryFile(  # noqa: SIM115
            SPOOL_IN_MEMORY, prefix="nixspool-nar-"
        )

    def write(self, data: bytes) -> None:
        try:
            self._file.write(data)
        except OSError as e:  # past SPOOL_IN_MEMORY, on disk: full, or not ours to write
            raise Stop(
                Kind.LOCAL,
                f"no room on this machine for a NAR on its way to the bucket "
                f"({tempfile.gettempdir()}: {e.strerror}): free some, or set TMPDIR "
                "for nixspool to a directory on a disk (a unit's Environment=TMPDIR=/var/tmp)",
            ) from None

    def commit(self, name: str) -> None:
        from boto3.s3.transfer import TransferConfig

        files, location = self._files, self._files.location
        config = TransferConfig(
            multipart_threshold=location.multipart_threshold,
            multipart_chunksize=location.part_size,
            max_concurrency=4,
        )

        def send() -> None:
            self._file.seek(0)
            files.s3_parts.upload_fileobj(
                _Lent(self._file),
                files.bucket,
                files.key(name),
                ExtraArgs={"ContentType": "application/x-nix-nar"},
                Config=config,
            )

        try:
            patiently(send)  # a failed multipart upload is aborted by boto3 itself
        finally:
            self._file.close()

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self._file.close()


class _Lent:
    """The NAR's file as boto3 borrows it: boto3 closes what it is given when an
    upload ends, and a throttled upload is sent again from the same file."""

    def __init__(self, file: Any) -> None:
        self._file = file

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._file.read(size)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        position: int = self._file.seek(offset, whence)
        return position

    def tell(self) -> int:
        position: int = self._file.tell()
        return position

    def close(self) -> None:
        pass  # _BucketNar closes it
