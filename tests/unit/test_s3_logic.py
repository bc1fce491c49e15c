"""s3:// remotes, the pure parts: the URL, what the store's answers mean, the
signature merge, and when a bucket is listed rather than asked path by path. The
behaviour against a real store is tests/lab/test_s3_cache.py."""

from __future__ import annotations

import sys
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
