"""Where shard samples come from: scikit-learn's digits, or an ImageFolder tree on local disk.

A source is a list of classes plus, per split, a lazy iterator of `Sample`s in a seeded random order, so that
each shard holds a mix of classes (epochs shuffle shard files and rows inside a local buffer, not globally).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# Formats stored as they are; anything else is re-encoded losslessly as PNG.
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass
class Sample:
    key: str  # unique within the split, no dots (webdataset groups members by the name up to the first dot)
    image: bytes
    image_ext: str  # jpg, png or webp
    label: int
    source: str  # where the image came from, stored in the sample's .json
    width: int
    height: int


@dataclass
class Source:
    classes: list[str]
    splits: dict[str, Callable[[], Iterator[Sample | Skipped]]]  # split name -> lazy iterator over its samples
    sizes: dict[str, int]  # split name -> number of candidate samples, for the progress bar


@dataclass
class Skipped:
    """A source file left out of the shards, with the reason."""

    source: str
    reason: str


class UnreadableImage(ValueError):
    """A source file that is not an image Pillow can open."""


def build_source(spec: str, *, img_size: int = 32, val_fraction: float = 0.2, split: str = "train",
                 seed: int = 0) -> Source:
    """`digits` or `imagefolder:PATH` (one sub-folder per class; PATH becomes the single split `split`)."""
    if spec == "digits":
        return digits_source(img_size=img_size, val_fraction=val_fraction, seed=seed)
    if spec.startswith("imagefolder:"):
        return imagefolder_source(spec.split(":", 1)[1], split=split, seed=seed)
    raise ValueError(f"unknown source {spec!r}: use 'digits' or 'imagefolder:PATH'")


def digits_source(*, img_size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> Source:
    """scikit-learn's 1,797 8x8 digits, upscaled to img_size and stored as RGB JPEG, split per class."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = digits.target.astype(int)
    rng = np.random.default_rng(seed)
    val_idx: list[int] = []
    for c in range(10):
        members = rng.permutation(np.flatnonzero(labels == c))
        val_idx.extend(members[: round(len(members) * val_fraction)].tolist())
    val_set = set(val_idx)
    order = {
        "train": rng.permutation([i for i in range(len(labels)) if i not in val_set]).tolist(),
        "val": rng.permutation(sorted(val_set)).tolist(),
    }

    def encode(i: int) -> bytes:
        gray = np.clip(digits.images[i] * (255.0 / 16.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(gray, mode="L").resize((img_size, img_size), Image.BICUBIC).convert("RGB")
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=95)
        return out.getvalue()

    def samples(split: str) -> Callable[[], Iterator[Sample]]:
        def it() -> Iterator[Sample]:
            for n, i in enumerate(order[split]):
                yield Sample(key=f"{n:08d}", image=encode(i), image_ext="jpg", label=int(labels[i]),
                             source=f"sklearn.datasets.load_digits[{i}]", width=img_size, height=img_size)
        return it

    return Source(classes=[str(c) for c in range(10)], splits={s: samples(s) for s in order},
                  sizes={s: len(v) for s, v in order.items()})


def imagefolder_source(root: str, *, split: str = "train", seed: int = 0) -> Source:
    """`root/<class>/**/<image>.{jpg,jpeg,png,webp}`; class indices follow the sorted folder names."""
    base = Path(root)
    if not base.is_dir():
        raise ValueError(f"imagefolder root {root!r} is not a directory")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"imagefolder root {root!r} has no class sub-folders")
    files = [(str(p), label) for label, name in enumerate(classes)
             for p in sorted((base / name).rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    if not files:
        raise ValueError(f"imagefolder root {root!r} holds no {'/'.join(IMAGE_EXTENSIONS)} files")
    order = np.random.default_rng(seed).permutation(len(files)).tolist()

    def it() -> Iterator[Sample | Skipped]:
        n = 0
        for i in order:
            path, label = files[i]
            try:
                yield read_image_file(path, key=f"{n:08d}", label=label)
                n += 1
            except UnreadableImage as e:
                yield Skipped(source=path, reason=str(e))

    return Source(classes=classes, splits={split: it}, sizes={split: len(files)})


def read_image_file(path: str, *, key: str, label: int) -> Sample:
    """Read one file as stored bytes; raises UnreadableImage if Pillow cannot identify it."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height, fmt = image.width, image.height, image.format
            ext = KEPT_FORMATS.get(fmt)
            if ext is None:  # e.g. a GIF named .jpg: keep the pixels, not the odd container
                out = io.BytesIO()
                image.save(out, format="PNG")
                data, ext = out.getvalue(), "png"
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UnreadableImage(f"{path}: {e}") from e
    return Sample(key=key, image=data, image_ext=ext, label=label, source=os.path.abspath(path),
                  width=width, height=height)
