import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pipeline.train.loop import use_cpu_deepspeed

# DeepSpeed picks its accelerator at import time; on a CPU-only host it must be told before any test imports it.
if not torch.cuda.is_available():
    use_cpu_deepspeed()


@dataclass
class S3Store:
    """An S3-compatible server on 127.0.0.1 and a bucket in it."""

    endpoint: str
    bucket: str
    env: dict  # the standard AWS_* settings that reach it

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])


@pytest.fixture(scope="session")
def s3_store():
    """A real S3-compatible server (moto's) on 127.0.0.1 for the whole session, started and stopped by PID.

    This process's environment gets the standard AWS_* settings for it before the session's Ray starts
    (`ray_local` depends on this fixture), so the Ray workers, decode tasks and in-process jobs reach it the way
    a user's do: through the variables pyarrow reads."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"moto_server did not start on {endpoint}") from None
            time.sleep(0.2)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        import pyarrow.fs as pafs

        store = S3Store(endpoint=endpoint, bucket="vit-test", env=env)
        fs, _ = pafs.FileSystem.from_uri(f"s3://{store.bucket}?allow_bucket_creation=true")
        fs.create_dir(store.bucket)
        yield store
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


@pytest.fixture(scope="session")
def ray_local(s3_store):
    """One local Ray instance for the whole test session, with spare logical CPUs so Ray Data never starves; its
    workers see the session's S3 endpoint (`s3_store`)."""
    import ray

    # the dashboard serves Ray's state API, which the fault tests use to find worker processes
    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory):
    """scikit-learn's digits as 32 px shards, written once per test session at an absolute path (jobs submitted to
    a Ray head run in another working dir)."""
    from pipeline.data.shard_writer import DIGITS_SHARD_SIZE, write_source
    from pipeline.data.sources import digits_source

    folder = tmp_path_factory.mktemp("digits")
    write_source(digits_source(img_size=32), str(folder), max_count=DIGITS_SHARD_SIZE, max_size=1 << 30,
                 progress=False)
    return folder
