"""A real S3-compatible server on this machine for `cluster bench engine-load`'s
streamed-s3 variant: moto's standalone server, started from an interpreter of its own venv
(moto and boto3 pin a botocore whose python-dateutil the project's kubernetes outgrew),
and the model folder uploaded to it with boto3.

boto3 is imported at call time: it lives only in the side venv the streamed-s3 run uses
(`make bench-engine-load-s3`), never in the project's.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

# moto accepts any key pair; the streamer's C++ S3 client still signs, so it needs one.
DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "engine-load", "AWS_SECRET_ACCESS_KEY": "engine-load"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def moto_server(python: str, timeout_s: float = 60.0) -> Iterator[str]:
    """moto's S3 server on a free loopback port for the duration; yields its endpoint and
    sets dummy AWS credentials in this process's environment (children inherit them)."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [python, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    saved = {k: os.environ.get(k) for k in DUMMY_CREDENTIALS}
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {proc.returncode} ({python} -m moto.server)")
            try:
                urllib.request.urlopen(endpoint + "/", timeout=2).close()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server not answering on {endpoint} after {timeout_s:.0f} s") from None
                time.sleep(0.25)
        for k, v in DUMMY_CREDENTIALS.items():
            os.environ.setdefault(k, v)
        yield endpoint
    finally:
        for k, old in saved.items():
            if old is None:
                os.environ.pop(k, None)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def upload_folder(folder: Path, endpoint: str, bucket: str, prefix: str) -> float:
    """Every file of `folder` to s3://bucket/prefix/ (bucket created if missing); seconds taken."""
    boto3 = importlib.import_module("boto3")
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=os.environ.get("AWS_REGION", "us-east-1"))
    started = time.perf_counter()
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        s3.create_bucket(Bucket=bucket)
    for path in sorted(folder.iterdir()):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}/{path.name}")
    return time.perf_counter() - started
