"""The per-split manifest: which shards a split has, how many samples each holds, and the class names.

`{split}.manifest.json` sits beside `{split}-000000.tar …`. The shard writer writes it last and atomically
(temporary name, then rename), so a folder with shards but no manifest is a dataset still being written,
never a whole one. Readers use it to size an epoch: `steps_per_epoch` comes from the sample counts here,
not from the stream, so every Train worker knows the step count before the first batch.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import asdict, dataclass, field

import pyarrow.fs as pafs

MANIFEST_FORMAT = "vit-pipeline-shards/1"


@dataclass
class ShardInfo:
    name: str  # file name relative to the manifest's folder
    num_samples: int
    num_bytes: int


@dataclass
class Manifest:
    split: str
    classes: list[str]
    shards: list[ShardInfo]
    writer: str  # what wrote the shards, with versions
    created_at: str = ""  # ISO 8601, UTC
    skipped: int = 0  # source files that could not be read and were left out
    image_stats: dict = field(default_factory=dict)  # mean/max width and height of the stored images
    format: str = MANIFEST_FORMAT

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.num_bytes for s in self.shards)

    def to_json(self) -> str:
        body = asdict(self)
        body.update(num_samples=self.num_samples, num_bytes=self.num_bytes, num_shards=len(self.shards),
                    num_classes=len(self.classes))
        return json.dumps(body, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        body = json.loads(text)
        if body.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"not a shard manifest of format {MANIFEST_FORMAT!r}: format={body.get('format')!r}")
        shards = [ShardInfo(**s) for s in body["shards"]]
        keep = {"split", "classes", "writer", "created_at", "skipped", "image_stats", "format"}
        return cls(shards=shards, **{k: v for k, v in body.items() if k in keep})

    def samples_in(self, shard_paths: list[str]) -> int:
        """Samples held by the given shards, which must all be listed in this manifest."""
        counts = {s.name: s.num_samples for s in self.shards}
        missing = [p for p in shard_paths if posixpath.basename(p) not in counts]
        if missing:
            raise ValueError(f"{len(missing)} shard(s) are not in the {self.split!r} manifest, e.g. {missing[0]}; "
                             "rewrite the manifest with `jobs/make_shards.py --source shards:PATTERN`")
        return sum(counts[posixpath.basename(p)] for p in shard_paths)


def manifest_name(split: str) -> str:
    return f"{split}.manifest.json"


def split_of(shard_path: str) -> str:
    """`…/train-000012.tar` -> `train`: the split is the file name up to the last dash."""
    stem = posixpath.basename(shard_path).rsplit(".", 1)[0]
    return stem.rsplit("-", 1)[0] if "-" in stem else stem


def write_manifest(manifest: Manifest, fs: pafs.FileSystem, folder: str) -> str:
    """Write `{folder}/{split}.manifest.json` atomically and return its path."""
    final = posixpath.join(folder, manifest_name(manifest.split))
    partial = final + ".partial"
    with fs.open_output_stream(partial) as out:
        out.write(manifest.to_json().encode())
    # A rename is atomic on local and POSIX filesystems; object stores publish a whole object anyway.
    fs.move(partial, final)
    return final


def read_manifest(fs: pafs.FileSystem, path: str) -> Manifest:
    with fs.open_input_stream(path) as f:
        return Manifest.from_json(f.read().decode())


def find_manifest(fs: pafs.FileSystem, shard_paths: list[str]) -> Manifest | None:
    """The manifest beside the first shard, or None when there is none (e.g. img2dataset output)."""
    if not shard_paths:
        return None
    first = shard_paths[0]
    path = posixpath.join(posixpath.dirname(first), manifest_name(split_of(first)))
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    return read_manifest(fs, path)


def steps_per_epoch(num_samples: int, world_size: int, batch_size: int) -> int:
    """Full batches each worker runs per epoch; the remainder is dropped so that every rank runs the same count."""
    if world_size < 1 or batch_size < 1:
        raise ValueError(f"world_size ({world_size}) and batch_size ({batch_size}) must be >= 1")
    return num_samples // (world_size * batch_size)
