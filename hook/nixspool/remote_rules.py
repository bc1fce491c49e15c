"""What a remote's url may say, and which keys go with which kind of remote.

Nix hands an ssh:// or ssh-ng:// URL's host to `ssh` and its remote-program to the
remote's shell, so what would reach them as anything but a host, user or path is
refused where it is written (FILE:LINE); and every URL is split once here as every
later step splits it, so that no command meets a URL Python's parser refuses.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import ConfigError

SSH_SCHEMES = ("ssh://", "ssh-ng://")  # a Nix store at the end of an ssh login
SFTP_SCHEME = "sftp://"  # a static binary cache (a directory) written over SFTP
S3_SCHEME = "s3://"  # a binary cache in an S3-compatible bucket, written by nixspool
# Nix's own s3:// parameters, as its manual lists them; nixspool writes the cache
# itself, so those that tune Nix's writer (compression, ...) are its own keys.
S3_PARAMETERS = ("endpoint", "scheme", "region", "profile")
S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
COMPRESSIONS = ("xz", "zstd", "none")

# ssh:// and ssh-ng:// reach `ssh HOST` and, for remote-program, the remote's shell:
# a host or user starting with '-' is an ssh option (-oProxyCommand=...), and a
# remote program is one absolute path, never a command line.
SSH_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
SSH_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*|\[[0-9A-Fa-f:.]+\]")
SAFE_PATH = re.compile(r"/[A-Za-z0-9_./+-]*")


def nixspool_writes(url: str, skip_signed_by: Sequence[str]) -> bool:
    """nixspool writes the cache's files itself (static_cache.py): over SFTP, to an
    S3 bucket (Debian's Nix has no S3; Nix's own needs the AWS SDK), and for a
    file:// cache that leaves paths to upstream (Nix's own writer refuses a path
    whose references the cache lacks)."""
    return url.startswith((SFTP_SCHEME, S3_SCHEME)) or (
        url.startswith("file://") and bool(skip_signed_by)
    )


def check_url(url: str, where: str) -> None:
    """Refuse what would reach ssh or a shell as anything but a host, user or path,
    and what no URL parser can read (every later step parses it again)."""
    if any(not c.isprintable() or c.isspace() for c in url):
        raise ConfigError(f"{where}: url {url!r} has a space or control character")
    parsed = parsed_url(url, where)
    if url.startswith(S3_SCHEME):
        check_s3_url(url, parsed, where)
    if not url.startswith(SSH_SCHEMES):
        return
    user, _, host = parsed.netloc.rpartition("@")
    if ":" in host and not host.startswith("["):
        host, _, port = host.rpartition(":")
        if not port.isdigit():
            raise ConfigError(f"{where}: url {url!r}: the port must be a number")
    if not SSH_HOST.fullmatch(host) or (user and not SSH_USER.fullmatch(user)):
        raise ConfigError(
            f"{where}: url {url!r}: the host (and user) must be names like pi, nas.lan, "
            "user@10.0.0.2, starting with a letter or digit"
        )
    for key, value in urllib.parse.parse_qsl(parsed.query, keep_blank_values=True):
        if key == "remote-program" and not SAFE_PATH.fullmatch(value):
            raise ConfigError(
                f"{where}: url {url!r}: remote-program must be an absolute path to a "
                "program, e.g. /nix/var/nix/profiles/default/bin/nix-daemon"
            )


def check_s3_url(url: str, parsed: urllib.parse.SplitResult, where: str) -> None:
    """s3://BUCKET[/PREFIX]?endpoint=HOST[:PORT]&scheme=http|https&region=R&profile=P."""
    shape = "s3://BUCKET[/PREFIX]?endpoint=HOST[:PORT]&scheme=http|https&region=R&profile=P"
    if not S3_BUCKET.fullmatch(parsed.netloc) or ".." in parsed.netloc:
        raise ConfigError(
            f"{where}: url {url!r}: the bucket must be an S3 bucket name (3 to 63 "
            f"lower-case letters, digits, '.' and '-'): {shape}"
        )
    query = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
    for key, values in query.items():
        if key not in S3_PARAMETERS:
            raise ConfigError(
                f"{where}: url {url!r}: nixspool does not know the parameter {key!r} "
                f"(it takes {', '.join(S3_PARAMETERS)}; compression is a key of its own)"
            )
        if len(values) > 1 or not values[0]:
            raise ConfigError(f"{where}: url {url!r}: give {key}= once, with a value")
    scheme = query.get("scheme", ["https"])[0]
    if scheme not in ("http", "https"):
        raise ConfigError(f"{where}: url {url!r}: scheme must be http or https, not {scheme!r}")
    endpoint = query.get("endpoint", [""])[0]
    if endpoint:
        full = endpoint if "://" in endpoint else f"{scheme}://{endpoint}"
        try:
            split = urllib.parse.urlsplit(full)
            split.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as e:
            raise ConfigError(f"{where}: url {url!r}: endpoint {endpoint!r}: {e}") from None
        if split.scheme not in ("http", "https") or not split.hostname:
            raise ConfigError(
                f"{where}: url {url!r}: endpoint must be HOST[:PORT] or http(s)://HOST[:PORT], "
                f"not {endpoint!r}"
            )


def parsed_url(url: str, where: str) -> urllib.parse.SplitResult:
    """The URL split as every module later splits it; ConfigError where Python's
    parser refuses it (an unclosed IPv6 bracket, a port that is not a number or
    past 65535), so that no command meets it as a ValueError."""
    try:
        parsed = urllib.parse.urlsplit(url)
        parsed.port, parsed.hostname  # noqa: B018 - each raises ValueError on its own
    except ValueError as e:
        raise ConfigError(
            f"{where}: url {url!r} is not a URL Nix or nixspool can read: {e}"
        ) from None
    return parsed


def check_binary_cache_keys(remote: dict[str, Any], name: str, sources: Mapping[str, str]) -> None:
    """The keys that only a binary cache, or only an sftp:// one, can honour."""
    url = remote["url"]
    parsed = urllib.parse.urlsplit(url)
    if url.startswith(SFTP_SCHEME) and (
        not parsed.hostname or not parsed.path.startswith("/") or parsed.query
    ):
        raise ConfigError(
            f"{sources[f'remotes.{name}.url']}: an sftp:// remote is "
            f"sftp://[user@]host[:port]/absolute/directory, without ?parameters (got {url!r})"
        )
    ours = nixspool_writes(url, remote.get("skip_signed_by") or ())
    if url.startswith("file://") and ours and (parsed.query or parsed.netloc):
        raise ConfigError(
            f"{sources[f'remotes.{name}.url']}: with skip_signed_by nixspool writes this cache "
            "itself: give file:///absolute/directory without ?parameters (compression is "
            "its own key)"
        )
    if remote.get("skip_signed_by") and not url.startswith((SFTP_SCHEME, S3_SCHEME, "file://")):
        raise ConfigError(
            f"{sources[f'remotes.{name}.skip_signed_by']}: skip_signed_by is for binary "
            "caches (sftp://, s3://, file://): a Nix store must hold every path's whole "
            "closure, so it cannot leave out what an upstream cache serves"
        )
    for key in ("multipart_threshold", "part_size"):
        if key in remote and not url.startswith(S3_SCHEME):
            raise ConfigError(f"{sources[f'remotes.{name}.{key}']}: {key} is for s3:// caches")
    if remote.get("part_size", 5 << 20) < 5 << 20:
        raise ConfigError(
            f"{sources[f'remotes.{name}.part_size']}: part_size must be 5M or more (S3 "
            "refuses smaller parts)"
        )
    if ours and remote.get("verify"):
        raise ConfigError(
            f"{sources[f'remotes.{name}.verify']}: verify does not apply to a cache nixspool "
            "writes itself (sftp://, s3://, file:// with skip_signed_by): it writes each "
            "narinfo, signature and all"
        )
    if "compression" in remote:
        where = sources[f"remotes.{name}.compression"]
        if not ours:
            raise ConfigError(
                f"{where}: compression is for caches nixspool writes (sftp://, s3://, file:// "
                "with skip_signed_by); Nix's own take it in the URL "
                "(file:///srv/cache?compression=zstd)"
            )
        if remote["compression"] not in COMPRESSIONS:
            raise ConfigError(
                f"{where}: compression must be one of {', '.join(COMPRESSIONS)}, "
                f"not {remote['compression']!r}"
            )
