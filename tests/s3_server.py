"""A real S3 server for the tests and the remote benchmark: moto's standalone ``moto_server``
(as s3fs's own test suite uses it), started as a subprocess on a free port, and uploads to it
through boto3, not through the converter's own code."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# moto accepts any key pair; a region is needed by boto3. The config files point nowhere, so
# a developer's ~/.aws cannot change what the tests see; no instance-metadata lookups either.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
_PART = 8 << 20  # multipart uploads above this, as boto3 does by default


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Server:
    endpoint: str  # http://127.0.0.1:<port>
    pid: int

    def cpu_seconds(self) -> float:
        """CPU time the server has used so far (user + system), from /proc."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def moto_server(timeout: float = 60.0) -> Iterator[Server]:
    """Runs ``moto_server`` until the block ends."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    exe = shutil.which("moto_server") or shutil.which(
        "moto_server", path=str(Path(sys.executable).parent)
    )
    cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen(
        [*cmd, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **S3_ENV},
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {proc.returncode} before serving")
            try:
                with urllib.request.urlopen(endpoint + "/moto-api/", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"moto_server did not answer on {endpoint}") from None
                time.sleep(0.1)
        yield Server(endpoint, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def client(endpoint: str):  # noqa: ANN201 (a boto3 S3 client)
    import boto3

    return boto3.session.Session(
        aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=S3_ENV["AWS_DEFAULT_REGION"],
    ).client("s3", endpoint_url=endpoint)


def upload_folder(endpoint: str, folder: Path, bucket: str, prefix: str) -> int:
    """Uploads every file under ``folder`` to ``s3://bucket/prefix/...`` (the bucket is made
    if missing); returns the bytes uploaded."""
    from boto3.s3.transfer import TransferConfig

    s3 = client(endpoint)
    if bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
        s3.create_bucket(Bucket=bucket)
    config = TransferConfig(multipart_threshold=_PART, multipart_chunksize=_PART)
    total = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = f"{prefix}/{path.relative_to(folder).as_posix()}".lstrip("/")
        s3.upload_file(str(path), bucket, key, Config=config)
        total += path.stat().st_size
    return total
