"""The per-split manifest: which shards a split has, how many samples each holds, and the class names.

`{split}.manifest.json` sits beside `{split}-000000.tar …`, or beside img2dataset's `00000.tar …`, whose names
carry no split (the indexer names the split). The shard writer writes it last and atomically (temporary name,
then rename), so a folder with shards but no manifest is a dataset still being written, never a whole one.
Readers use it to size an epoch (pipeline/data/epochs.py): the step count comes from the sample counts here,
not from the stream, so every Train worker knows it before the first batch. It also records which members a
sample has (`.cls`, `.json` and the `.json`'s keys), so that a job whose labels are not where it looks is
stopped before it starts (`ShardSet.label_problem`).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from dataclasses import asdict, dataclass, field

import pyarrow.fs as pafs

from pipeline import storage

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
    sample_members: list[str] = field(default_factory=list)  # member suffixes of the first sample, e.g. jpg, json
    json_keys: list[str] = field(default_factory=list)  # keys of the first sample's .json member
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
        keep = {"split", "classes", "writer", "created_at", "skipped", "image_stats", "sample_members", "json_keys",
                "format"}
        return cls(shards=shards, **{k: v for k, v in body.items() if k in keep})

    def sample_counts(self, shard_paths: list[str]) -> list[int]:
        """The sample count of each given shard (local path or URI), which must all be listed in this manifest."""
        counts = {s.name: s.num_samples for s in self.shards}
        missing = [p for p in shard_paths if storage.basename(p) not in counts]
        if missing:
            raise ValueError(f"{len(missing)} shard(s) are not in the {self.split!r} manifest, e.g. {missing[0]}; "
                             "rewrite the manifest with `jobs/make_shards.py --source shards:PATTERN`")
        return [counts[storage.basename(p)] for p in shard_paths]

    def digest(self, shard_paths: list[str]) -> str:
        """A fingerprint of the given shards' content as the manifest records it (names, sample and byte counts,
        classes), not of where they are: the same shards copied to another store have the same digest."""
        shards = {s.name: s for s in self.shards}
        listed = [(s.name, s.num_samples, s.num_bytes) for s in (shards[storage.basename(p)] for p in shard_paths)]
        return content_digest({"split": self.split, "classes": self.classes, "shards": listed})


def content_digest(body) -> str:
    """16 hex digits of the SHA-256 of `body` as canonical JSON."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def manifest_name(split: str) -> str:
    return f"{split}.manifest.json"


UNNAMED_SPLIT = re.compile(r"\d+")  # img2dataset's 00000.tar: a shard number, no split in the name


def split_of(shard_path: str) -> str | None:
    """`…/train-000012.tar` -> `train`: the file name up to the last dash; None for a bare number (`00012.tar`,
    as img2dataset names its shards), whose split the indexer is told."""
    stem = posixpath.basename(shard_path).rsplit(".", 1)[0]
    if UNNAMED_SPLIT.fullmatch(stem):
        return None
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


def find_manifest(shard_uris: list[str]) -> Manifest | None:
    """The manifest beside the first shard, or None when there is none. It is `{split}.manifest.json` for
    `{split}-NNNNNN.tar` shards; for shards without a split in their names, the manifest of that folder
    that lists the shard."""
    if not shard_uris:
        return None
    fs, first = storage.resolve(shard_uris[0])
    folder, name = posixpath.split(first)
    split = split_of(first)
    if split is not None:
        path = posixpath.join(folder, manifest_name(split))
        return read_manifest(fs, path) if fs.get_file_info(path).type == pafs.FileType.File else None
    candidates = sorted(info.path for info in fs.get_file_info(pafs.FileSelector(folder))
                        if info.type == pafs.FileType.File and info.path.endswith(".manifest.json"))
    for path in candidates:
        manifest = read_manifest(fs, path)
        if any(shard.name == name for shard in manifest.shards):
            return manifest
    return None
