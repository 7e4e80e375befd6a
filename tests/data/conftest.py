"""Fixtures of the data tests: real images and real tar shards, built on the fly.

Helpers reach test modules through the `tars` fixture (the suite runs with --import-mode=importlib).
"""

import io
import os

import numpy as np
import pytest
import webdataset as wds
from PIL import Image


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
