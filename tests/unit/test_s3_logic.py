"""s3:// remotes, the pure parts: the URL, what the store's answers mean, the
signature merge, and when a bucket is listed rather than asked path by path. The
behaviour against a real store is tests/lab/test_s3_cache.py."""

from __future__ import annotations

import contextlib
import http.server
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nixspool.cache_files import Kind, Stop
from nixspool.config import Remote
from nixspool.errors import ConfigError
from nixspool.narinfo import Entry, OtherContents, sigs_of, with_signatures
from nixspool.remote_rules import check_url
from nixspool.s3 import Location
from nixspool.s3.bucket import BucketFiles
from nixspool.s3.connect import stopping

PATH = "/nix/store/" + "a" * 32 + "-hello"


def test_a_url_in_nix_form_says_where_the_bucket_is() -> None:
    where = Location.of(Remote("team", "s3://team-cache/nix/x?endpoint=s3.lan:8333&scheme=http"))
    assert (where.bucket, where.prefix, where.endpoint) == (
        "team-cache",
        "nix/x/",
        "http://s3.lan:8333",
    )
    aws = Location.of(Remote("aws", "s3://team-cache?region=eu-west-1&profile=ci"))
    assert (aws.prefix, aws.endpoint, aws.region, aws.profile) == ("", None, "eu-west-1", "ci")
    full = Location.of(Remote("r", "s3://bkt?endpoint=https://r2.example:444"))
    assert full.endpoint == "https://r2.example:444"


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("s3://UPPER", "bucket must be an S3 bucket name"),
        ("s3://ab", "bucket must be an S3 bucket name"),
        ("s3://a..b", "bucket must be an S3 bucket name"),
        ("s3://bkt?compression=xz", "does not know the parameter 'compression'"),
        ("s3://bkt?region=a&region=b", "give region= once"),
        ("s3://bkt?scheme=ftp", "scheme must be http or https"),
        ("s3://bkt?endpoint=host:99999", "endpoint 'host:99999'"),
        ("s3://bkt?endpoint=ftp://host", "endpoint must be HOST[:PORT]"),
    ],
)
def test_a_url_nixspool_cannot_honour_is_refused_where_it_is_written(url: str, said: str) -> None:
    with pytest.raises(ConfigError, match=r"^cfg:3: ") as refused:
        check_url(url, "cfg:3")
    assert said in str(refused.value)


def test_good_urls_pass() -> None:
    for url in (
        "s3://team-cache",
        "s3://team.cache/a/b?endpoint=10.0.0.2:8333&scheme=http&region=x&profile=p",
    ):
        check_url(url, "cfg:1")


def entry(*sigs: str, nar_hash: str = "sha256:" + "1" * 52) -> Entry:
    return Entry(PATH, nar_hash, 120, (), sigs)


THEIRS = (
    f"StorePath: {PATH}\nURL: nar/x.nar.zst\nCompression: zstd\nNarHash: sha256:{'1' * 52}\n"
    "NarSize: 120\nReferences: \nSig: them-1:AAAA\n"
)


def test_our_signatures_join_theirs_and_nothing_else_changes() -> None:
    merged = with_signatures(THEIRS, entry("them-1:AAAA", "us-1:BBBB"))
    assert merged == THEIRS + "Sig: us-1:BBBB\n"
    assert sigs_of(merged) == ["them-1:AAAA", "us-1:BBBB"]
    assert with_signatures(merged, entry("us-1:BBBB")) is None  # nothing to add


def test_another_build_of_the_path_is_left_alone() -> None:
    with pytest.raises(OtherContents):
        with_signatures(THEIRS, entry("us-1:BBBB", nar_hash="sha256:" + "2" * 52))


def client_error(code: str, status: int, **headers: str) -> Exception:
    from botocore.exceptions import ClientError

    response: Any = {
        "Error": {"Code": code, "Message": "m"},
        "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": headers},
    }
    error: Exception = ClientError(response, "PutObject")
    return error


def kind_of(error: Exception) -> str:
    with pytest.raises(Stop) as stopped, stopping("writing", "s3://bkt/"):
        raise error
    return str(stopped.value.error["kind"])


def test_each_answer_of_the_store_is_told_apart() -> None:
    from botocore import exceptions as bx

    assert kind_of(bx.EndpointConnectionError(endpoint_url="http://x")) == Kind.AWAY
    assert kind_of(bx.ConnectTimeoutError(endpoint_url="http://x")) == Kind.AWAY
    assert kind_of(bx.ReadTimeoutError(endpoint_url="http://x")) == Kind.LINK
    assert kind_of(bx.NoCredentialsError()) == Kind.CACHE
    for code in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "NoSuchBucket"):
        assert kind_of(client_error(code, 403)) == Kind.CACHE, code
    assert kind_of(client_error("SlowDown", 503)) == Kind.WRITE
    assert kind_of(client_error("InternalError", 500)) == Kind.WRITE
    assert kind_of(client_error("Weird", 400)) == Kind.CACHE


class Pages:
    """A client that answers list_objects_v2 with `pages` pages of 1,000 names."""

    def __init__(self, pages: int) -> None:
        self.pages, self.asked = pages, 0

    def list_objects_v2(self, **request: Any) -> dict[str, Any]:
        self.asked += 1
        page = [{"Key": f"p/{self.asked:04}{i:04}.narinfo"} for i in range(1000)]
        more = self.asked < self.pages
        return {"Contents": page, "IsTruncated": more, "NextContinuationToken": "t"}


def bucket_over(pages: Pages) -> BucketFiles:
    files = BucketFiles.__new__(BucketFiles)
    files.location = Location.of(Remote("r", "s3://bkt/p"))
    files.bucket, files.description, files.s3 = "bkt", "s3://bkt/p/", pages
    return files


def test_a_bucket_is_listed_while_that_is_cheaper_than_asking_path_by_path() -> None:
    small = Pages(3)
    names = bucket_over(small).top_names(wanted=300)  # 3 pages < 300 HEADs
    assert names is not None and len(names) == 3000 and small.asked == 3
    huge = Pages(10_000)
    assert bucket_over(huge).top_names(wanted=50) is None  # 50 HEADs, not 10,000 pages
    assert huge.asked == 1
    assert bucket_over(Pages(10_000)).top_names(wanted=1_000) is None


def test_without_boto3_an_s3_cache_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # `import boto3` fails as if absent
    with pytest.raises(Stop) as stopped:
        BucketFiles(Location.of(Remote("r", "s3://bkt")))
    assert stopped.value.error["kind"] == Kind.CACHE
    assert "pip install 'nixspool[s3]'" in stopped.value.error["message"]


def test_a_missing_object_is_told_from_a_missing_bucket() -> None:
    from nixspool.s3.bucket import _absent

    assert _absent(client_error("NoSuchKey", 404))  # GET
    assert _absent(client_error("404", 404))  # HEAD: no body, named by its status
    assert not _absent(client_error("NoSuchBucket", 404))  # a person must look
    assert not _absent(client_error("AccessDenied", 403))


def test_the_place_is_named_once_in_a_refusal() -> None:
    with pytest.raises(Stop) as stopped, stopping("listing s3://bkt/", "s3://bkt/"):
        raise client_error("SignatureDoesNotMatch", 403)
    said = stopped.value.error["message"]
    assert said == "listing s3://bkt/: the secret key is wrong for this access key " + (
        "(SignatureDoesNotMatch)"
    )
    with pytest.raises(Stop) as stopped, stopping("writing a probe object", "s3://bkt/"):
        raise client_error("NoSuchBucket", 404)
    assert stopped.value.error["message"].startswith("writing a probe object: s3://bkt/: ")


def s3_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, config: str) -> None:
    """The user's AWS settings: `config` as ~/.aws/config, nothing else."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    (tmp_path / "aws-config").write_text(config)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_credentials_that_cannot_be_had_need_a_person_not_a_retry(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A credential_process that fails (an expired SSO login, a locked vault) is
    not a broken link: exit 1 with the profile and the reason, not 75 for ever."""
    s3_env(monkeypatch, tmp_path, "[profile team]\ncredential_process = /bin/false\n")
    location = Location.of(Remote("r", "s3://bkt?profile=team&endpoint=127.0.0.1:9"))
    with pytest.raises(Stop) as stopped:
        BucketFiles(location)
    assert stopped.value.error["kind"] == Kind.CACHE
    said = stopped.value.error["message"]
    assert said.startswith("reading the S3 credentials of profile team: the credentials ")
    assert "custom-process" in said and "aws sso login" in said


@contextlib.contextmanager
def store_on_loopback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, handler: type, bucket: str = "b"
) -> Iterator[Location]:
    """An HTTP server answering as `handler` says, and where an s3:// remote of
    `bucket` there is, with keys in the environment and nothing else of AWS's."""
    s3_env(monkeypatch, tmp_path, "")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "K")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "S")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"127.0.0.1:{server.server_address[1]}"
        yield Location.of(Remote("r", f"s3://{bucket}?endpoint={endpoint}&scheme=http"))
    finally:
        server.shutdown()
        server.server_close()


class WebPortal(http.server.BaseHTTPRequestHandler):
    """What a hotel's Wi-Fi answers every request with: a login page, or a redirect."""

    def answer(self) -> None:
        if self.path.startswith("/redirected"):
            self.send_response(302)
            self.send_header("Location", "http://portal.example/login")
            self.end_headers()
            return
        body = b"<html><body>Please log in</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_PUT = answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("bucket", ["page", "redirected"])
def test_a_web_page_where_s3_should_answer_is_named_and_never_taken_for_an_object(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, bucket: str
) -> None:
    """A captive portal: away (75), in words that say what answered; a HEAD it
    answers 200 is not an object that is there; a redirect is not followed."""
    with store_on_loopback(monkeypatch, tmp_path, WebPortal, bucket) as location:
        files = BucketFiles(location)
        for step in (lambda: files.top_names(10), lambda: files.has("x.narinfo")):
            with pytest.raises(Stop) as stopped, files.step("reading the cache"):
                step()
            assert stopped.value.error["kind"] == Kind.AWAY
            assert "a web page answered, not S3" in stopped.value.error["message"]


def test_no_room_for_a_nar_on_its_way_is_this_machines_fault(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A NAR past what is kept in memory goes to TMPDIR; a full or unusable one is a
    local fault named as such (exit 1), never a bug and never "away"."""
    from nixspool.s3 import bucket

    monkeypatch.setattr(bucket, "SPOOL_IN_MEMORY", 16)
    monkeypatch.setattr(tempfile, "tempdir", "/nonexistent/tmp")
    nar = bucket._BucketNar(bucket_over(Pages(0)))
    nar.write(b"x" * 8)  # in memory still
    with pytest.raises(Stop) as stopped:
        nar.write(b"x" * 64)
    assert stopped.value.error["kind"] == Kind.LOCAL
    assert "/nonexistent/tmp" in stopped.value.error["message"]
    assert "TMPDIR" in stopped.value.error["message"]


def test_a_store_failure_says_disk_full_only_in_the_stores_own_words() -> None:
    def said(error: Exception) -> str:
        with pytest.raises(Stop) as stopped, stopping("writing", "s3://bkt/"):
            raise error
        assert stopped.value.error["kind"] == Kind.WRITE
        return str(stopped.value.error["message"])

    assert "out of space" not in said(client_error("InternalError", 500))
    assert "tried again later" in said(client_error("InternalError", 500))
    assert "out of space" in said(client_error("XMinioStorageFull", 507))


class FailsOnce(http.server.BaseHTTPRequestHandler):
    """A store whose first PUT fails with 500 and whose next one goes through."""

    puts = 0
    protocol_version = "HTTP/1.1"

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).puts += 1
        if type(self).puts == 1:
            error = b"<Error><Code>InternalError</Code><Message>hiccup</Message></Error>"
            self.send_response(500)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(error)))
            self.end_headers()
            self.wfile.write(error)
            return
        self.send_response(200)
        self.send_header("ETag", '"0"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_part_the_store_fails_once_is_sent_again_not_the_whole_nar(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Requests for a NAR's bytes are tried PART_ATTEMPTS times (a 500 mid-upload
    cost the whole NAR before); every other request once, our own retries aside."""
    from nixspool.s3.connect import PART_ATTEMPTS, client

    with store_on_loopback(monkeypatch, tmp_path, FailsOnce) as location:
        once, parts, _ = client(location)
        FailsOnce.puts = 0
        with pytest.raises(Exception, match="InternalError"):
            once.put_object(Bucket="b", Key="k", Body=b"x")
        assert FailsOnce.puts == 1
        FailsOnce.puts = 0
        parts.put_object(Bucket="b", Key="k", Body=b"x")
        assert FailsOnce.puts == 2 and PART_ATTEMPTS >= 2
        assert (once.meta.config.retries, parts.meta.config.retries) == (
            {"mode": "standard", "total_max_attempts": 1},
            {"mode": "standard", "total_max_attempts": PART_ATTEMPTS},
        )
