"""Reaching an S3-compatible store: where (Location, from the remote's URL), with
which credentials (boto3's chain, as the user), and what its answers mean."""

from __future__ import annotations

import contextlib
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from ..cache_files import Kind, Stop

T = TypeVar("T")

THROTTLE_ATTEMPTS = 6  # tries of one request the store throttles (SlowDown, 429)
PART_ATTEMPTS = 3  # tries of one part of a NAR the store fails (a 500, a reset link)
THROTTLE_WAIT_MAX = 30.0  # seconds: the longest wait honoured, Retry-After included
# What the store says when a person must act: the credentials, the bucket, the policy.
NEEDS_A_PERSON = {
    "AccessDenied": "access denied: the credentials may not write this bucket",
    "AllAccessDisabled": "all access to this bucket is disabled",
    "InvalidAccessKeyId": "the access key is not known to the store",
    "SignatureDoesNotMatch": "the secret key is wrong for this access key",
    "ExpiredToken": "the credentials have expired",
    "TokenRefreshRequired": "the credentials have expired",
    "InvalidToken": "the session token is not valid",
    "NoSuchBucket": "the bucket does not exist",
    "InvalidBucketName": "the bucket's name is not valid",
    "PermanentRedirect": "the bucket is in another region (set region=)",
    "AuthorizationHeaderMalformed": "the region is wrong for this bucket (set region=)",
    "AccountProblem": "the store reports a problem with the account",
}
# Credentials boto3 could not get (an expired SSO login, a credential_process that
# fails, a locked vault): botocore calls them BotoCoreErrors, like a broken link,
# but no retry brings them back; a person must act. By name: older botocores lack some.
CREDENTIALS_UNAVAILABLE = (
    "CredentialRetrievalError",
    "SSOError",
    "SSOTokenLoadError",
    "UnauthorizedSSOTokenError",
    "TokenRetrievalError",
    "InvalidConfigError",
)
THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded"}
CONDITION_FAILED = {"PreconditionFailed", "ConditionalRequestConflict"}


@dataclass(frozen=True)
class Location:
    """Where the cache is and how to reach it; crosses into the writer as JSON."""

    bucket: str
    prefix: str  # "" or "some/prefix/"
    endpoint: str | None  # http(s)://host[:port], None for AWS itself
    region: str | None
    profile: str | None
    connect_timeout: float
    read_timeout: float  # how long a request may go without an answer
    multipart_threshold: int
    part_size: int

    @classmethod
    def of(cls, remote: Any) -> Location:
        """From a config.Remote whose url remote_rules.check_s3_url accepted."""
        parsed = urllib.parse.urlsplit(remote.url)
        query = dict(urllib.parse.parse_qsl(parsed.query))
        endpoint = query.get("endpoint")
        if endpoint and "://" not in endpoint:
            endpoint = f"{query.get('scheme', 'https')}://{endpoint}"
        prefix = urllib.parse.unquote(parsed.path).strip("/")
        return cls(
            bucket=parsed.netloc,
            prefix=f"{prefix}/" if prefix else "",
            endpoint=endpoint,
            region=query.get("region"),
            profile=query.get("profile"),
            connect_timeout=remote.connect_timeout,
            read_timeout=max(remote.connect_timeout, min(remote.stall_timeout, 120.0)),
            multipart_threshold=int(remote.multipart_threshold),
            part_size=int(remote.part_size),
        )

    @property
    def description(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


class WebPage(Exception):
    """A web page answered where S3 should have: a captive portal, a proxy."""


def refuse_web_pages(response_dict: dict[str, Any], **_: Any) -> None:
    """botocore's before-parse hook: an answer no S3 store gives (an HTML page, a
    302/303 redirect to a login) stops the request there. Parsed, a portal's "200"
    to a HEAD would read as "the object is there" and a redirect is followed until
    Python's recursion limit. nixspool's objects are never text/html."""
    headers = response_dict.get("headers") or {}
    status = int(response_dict.get("status_code") or 0)
    content_type = str(headers.get("content-type", "")).lower()
    if content_type.startswith("text/html"):
        raise WebPage(f"HTTP {status}, text/html")
    if status in (302, 303):
        raise WebPage(f"HTTP {status}, a redirect to {headers.get('location', 'elsewhere')}")


def client(location: Location) -> tuple[Any, Any, str]:
    """Two boto3 S3 clients with the user's credentials and bounded waits, and where
    boto3 found the credentials (its name for the source: env,
    shared-credentials-file, ...). The first makes one try of each request: retries
    are ours (throttled), so that a connect that fails ends the upload within
    connect_timeout, not three times that. The second, for a NAR's parts, tries a
    request PART_ATTEMPTS times where botocore's standard mode would (a 500, a
    reset): one failed part of a multipart upload must not send the whole NAR
    again from byte 0."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import NoCredentialsError

    session = boto3.session.Session(profile_name=location.profile)
    credentials = session.get_credentials()
    if credentials is None:
        raise NoCredentialsError()
    options: dict[str, Any] = dict(
        connect_timeout=location.connect_timeout,
        read_timeout=location.read_timeout,
        max_pool_connections=16,
        # Path-style (endpoint/bucket/key): what self-hosted stores serve without
        # a wildcard DNS name per bucket.
        s3={"addressing_style": "path"} if location.endpoint else None,
    )
    with contextlib.suppress(TypeError):  # botocore < 1.36 has neither
        # The CRC checksums botocore adds since 1.36 are refused by many S3-compatible
        # stores; send them only where an operation requires one.
        Config(request_checksum_calculation="when_required")
        options |= dict(
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
    made = []
    for attempts in (1, PART_ATTEMPTS):
        s3 = session.client(
            "s3",
            endpoint_url=location.endpoint,
            region_name=location.region or ("us-east-1" if location.endpoint else None),
            # total_max_attempts: botocore's `max_attempts` counts retries, not tries.
            config=Config(
                **options | {"retries": {"total_max_attempts": attempts, "mode": "standard"}}
            ),
        )
        s3.meta.events.register("before-parse.s3.*", refuse_web_pages)
        made.append(s3)
    return made[0], made[1], str(credentials.method)


def error_code(e: BaseException) -> tuple[str, int]:
    """(the store's error code, the HTTP status) of a botocore ClientError."""
    response = getattr(e, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def throttled(e: BaseException) -> bool:
    code, status = error_code(e)
    return code in THROTTLED or status in (429, 503)


def _wait(state: Any) -> float:
    """Retry-After where the store sends one; else exponential backoff with jitter."""
    from tenacity import wait_random_exponential

    error = state.outcome.exception()
    headers = (getattr(error, "response", None) or {}).get("ResponseMetadata", {})
    with contextlib.suppress(KeyError, ValueError):
        return min(float(headers.get("HTTPHeaders", {})["retry-after"]), THROTTLE_WAIT_MAX)
    return float(wait_random_exponential(multiplier=0.2, max=THROTTLE_WAIT_MAX)(state))


def patiently(call: Callable[[], T]) -> T:
    """call(), again while the store throttles us (honouring Retry-After), at most
    THROTTLE_ATTEMPTS times."""
    from tenacity import Retrying, retry_if_exception, stop_after_attempt

    retrying = Retrying(
        retry=retry_if_exception(throttled),
        stop=stop_after_attempt(THROTTLE_ATTEMPTS),
        wait=_wait,
        reraise=True,
    )
    return retrying(call)


@contextlib.contextmanager
def stopping(what: str, where: str) -> Iterator[None]:
    """Turn what boto3 raises while doing `what` into why the upload stopped."""
    from botocore import exceptions as bx

    unavailable = tuple(getattr(bx, name) for name in CREDENTIALS_UNAVAILABLE if hasattr(bx, name))
    # `what` names the bucket already ("listing s3://b/"): the place is said once.
    place = "" if where in what else f"{where}: "
    try:
        yield
    except Stop:
        raise
    except WebPage as e:
        raise Stop(
            Kind.AWAY,
            f"{what}: a web page answered, not S3 ({e}): a captive portal or a proxy "
            "between here and the store? Log in to the network, or flush from elsewhere",
        ) from None
    except (bx.NoCredentialsError, bx.PartialCredentialsError, bx.ProfileNotFound) as e:
        raise Stop(
            Kind.CACHE,
            f"{what}: {e} (boto3 looks in the user's ~/.aws/credentials and "
            "~/.aws/config, the profile= of the URL, and AWS_* variables)",
        ) from None
    except unavailable as e:
        raise Stop(
            Kind.CACHE,
            f"{what}: the credentials cannot be had: {str(e).rstrip(': ')} (an expired "
            "SSO login wants `aws sso login`; a credential_process or vault must answer "
            "for the user nixspool runs as)",
        ) from None
    except (bx.EndpointConnectionError, bx.ConnectTimeoutError) as e:
        # No name, no route, refused, no answer to connect: the store is away.
        raise Stop(Kind.AWAY, f"{what}: {e}") from None
    except (bx.ReadTimeoutError, bx.ConnectionClosedError, bx.ResponseStreamingError) as e:
        raise Stop(Kind.LINK, f"the connection broke while {what}: {e}") from None
    except bx.ClientError as e:
        code, status = error_code(e)
        message = e.response.get("Error", {}).get("Message") or code or f"HTTP {status}"
        if code in NEEDS_A_PERSON:
            raise Stop(Kind.CACHE, f"{what}: {place}{NEEDS_A_PERSON[code]} ({code})") from None
        if throttled(e):
            raise Stop(
                Kind.WRITE,
                f"{what}: the store kept asking us to slow down ({code or status}) "
                f"through {THROTTLE_ATTEMPTS} tries",
            ) from None
        if status >= 500 or code in ("InternalError", "RequestTimeout"):
            # "Disk full" only where the store says so: a 500 is more often a hiccup.
            said = f"{code} {message}".lower()
            full = status == 507 or any(w in said for w in ("full", "space", "quota"))
            hint = "; it says it is out of space" if full else "; tried again later"
            raise Stop(Kind.WRITE, f"{what}: the store failed ({code}: {message}){hint}") from None
        refused = f"the store refused ({code}: {message})"
        raise Stop(Kind.CACHE, f"{what}: {place}{refused}") from None
    except bx.BotoCoreError as e:  # another failure of the request on its way
        raise Stop(Kind.LINK, f"{what}: {e}") from None
