"""An S3-compatible store for the storage benchmarks and the tests: moto's server on 127.0.0.1 (the dev extra
installs it), started here and stopped by its PID, or the store the AWS_* variables already name."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.benchmarks import free_port

MOTO_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true"}


@dataclass
class Endpoint:
    env: dict[str, str]  # the AWS_* settings that reach it
    pid: int | None  # the server's process, when it is ours

    def cpu_s(self) -> float:
        """CPU seconds the server has used so far (0 for a store that is not ours)."""
        import psutil

        return sum(psutil.Process(self.pid).cpu_times()[:2]) if self.pid else 0.0


@contextlib.contextmanager
def s3_endpoint(bucket: str, *, use_configured: bool = False) -> Iterator[Endpoint]:
    """Yields a store that holds `bucket` (created if missing), whose AWS_* settings are set in this process's
    environment while it lasts, so that pyarrow here and the Ray workers started meanwhile use them. With
    `use_configured` and AWS_ENDPOINT_URL set, that store; otherwise a moto server of our own."""
    if use_configured and os.environ.get("AWS_ENDPOINT_URL"):
        _create_bucket(bucket)
        yield Endpoint({key: value for key, value in os.environ.items() if key.startswith("AWS_")}, None)
        return
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", **MOTO_ENV}
    saved = {key: os.environ.get(key) for key in env}
    try:
        _wait_until_up(env["AWS_ENDPOINT_URL"], server)
        os.environ.update(env)
        _create_bucket(bucket)
        yield Endpoint(env, server.pid)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _wait_until_up(endpoint: str, server: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not start on {endpoint}") from None
            time.sleep(0.2)


def _create_bucket(bucket: str) -> None:
    import pyarrow.fs as pafs

    fs, _ = pafs.FileSystem.from_uri(f"s3://{bucket}?allow_bucket_creation=true")
    if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
        fs.create_dir(bucket)
