import io
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.train.engine import use_cpu_deepspeed

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
    from pipeline.benchmarks.s3_endpoint import s3_endpoint

    with s3_endpoint("vit-test") as endpoint:
        yield S3Store(endpoint=endpoint.env["AWS_ENDPOINT_URL"], bucket="vit-test", env=endpoint.env)


@pytest.fixture(scope="session")
def ray_local(s3_store):
    """One local Ray instance for the whole test session, with spare logical CPUs so Ray Data never starves; its
    workers see the session's S3 endpoint (`s3_store`)."""
    import ray

    # the dashboard serves Ray's state API, which the fault tests use to find worker processes
    from pipeline.train.launch import own_dashboard

    ray.init(num_cpus=4, configure_logging=False, **own_dashboard())
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


# Real images and real tar shards, built on the fly; helpers reach test modules through the `tars` fixture
# (the suite runs with --import-mode=importlib).


def image_bytes(width: int = 64, height: int = 48, fmt: str = "JPEG", mode: str = "RGB", seed: int = 0,
                **save_args) -> bytes:
    """A smooth random image (JPEG-friendly) in the given Pillow mode and format."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BILINEAR)
    if mode != "RGB":
        image = image.convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt, **save_args)
    return out.getvalue()


def write_tar(path: str, records: list[dict]) -> str:
    """Write records ({"__key__", suffix: bytes|str|int|dict}) with webdataset's own TarWriter."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with wds.TarWriter(path) as writer:
        for record in records:
            writer.write(record)
    return path


def good_record(key: str, label: int, seed: int = 0, size: tuple[int, int] = (40, 30)) -> dict:
    return {"__key__": key, "jpg": image_bytes(*size, seed=seed), "cls": str(label).encode(),
            "json": {"source": f"test:{key}", "width": size[0], "height": size[1]}}


class Tars:
    """What the data tests use to make inputs; `folder` is the test's tmp_path."""

    image_bytes = staticmethod(image_bytes)
    good_record = staticmethod(good_record)

    def __init__(self, folder):
        self.folder = folder

    def write(self, name: str, records: list[dict]) -> str:
        return write_tar(str(self.folder / name), records)


@pytest.fixture
def tars(tmp_path) -> Tars:
    return Tars(tmp_path)


ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDER = re.compile(r"<[^<>\n]+>")  # <run id>, <pretrain run id>: what the reader fills in


def run_results_script(code: str) -> object:
    """Run `code` in a fresh interpreter (its own process group, DeepSpeed and compile caches) with a free port
    as argv[1]; the JSON it printed after "RESULTS "."""
    import json
    import subprocess
    import sys

    from pipeline.benchmarks import free_port

    done = subprocess.run([sys.executable, "-c", code, str(free_port())], capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    [line] = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    return json.loads(line[len("RESULTS "):])


@pytest.fixture
def results_script():
    return run_results_script


def documented_commands(*docs: str) -> list[list[str]]:
    """The `python jobs/…` commands of the bash blocks of `docs` (README.md by default), the entry points of
    their `ray job submit … -- python jobs/…` lines included, as argument lists from `jobs/…` on, split as a
    shell splits them. A placeholder such as `<run id>` becomes RUN_ID; variables are left as written."""
    commands = []
    for doc in docs or ("README.md",):
        for block in re.findall(r"```bash\n(.*?)```", (ROOT / doc).read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(PLACEHOLDER.sub("RUN_ID", line), comments=True)
                if words[:3] == ["ray", "job", "submit"] and "--" in words:
                    words = words[words.index("--") + 1:]
                if words[:1] == ["python"] and len(words) > 1 and words[1].startswith("jobs/"):
                    commands.append(words[1:])
    return commands


@pytest.fixture(scope="session")
def readme_commands():
    return documented_commands
