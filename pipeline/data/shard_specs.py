"""Shard specs -> shard locations: a list, a glob (`train-*.tar`), a brace pattern (`{00000..00099}.tar`) or a
folder, on local disk or any pyarrow filesystem URI.

Locations come back as URIs with their scheme (`s3://bucket/in1k/train-000000.tar`), or absolute paths for
local files, so that any process can open them (see pipeline/storage.py). Every shard is checked to exist, and
the check costs one listing per folder, not one request per shard: a brace pattern of 2,000 shards on S3 is
two LIST calls (1,000 keys each), not 2,000 HEADs.
"""

from __future__ import annotations

import fnmatch
import posixpath
from dataclasses import dataclass

import braceexpand
import pyarrow.fs as pafs

from pipeline import storage

WILDCARDS = "*?["
LIST_FOLDER_ABOVE = 8  # more named shards than this in one folder: list the folder instead of asking per file


@dataclass(frozen=True)
class ShardFile:
    uri: str
    num_bytes: int


def expand_shards(spec: str | list[str]) -> list[str]:
    """The shard locations a spec names, sorted within each glob or folder, in the order given otherwise."""
    return [shard.uri for shard in list_shards(spec)]


def list_shards(spec: str | list[str]) -> list[ShardFile]:
    """Like `expand_shards`, with each shard's size. Raises FileNotFoundError for a shard, folder or pattern
    that finds nothing, ValueError for a spec that mixes stores or puts wildcards in a folder name."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    specs = [s for pattern in specs for s in braceexpand.braceexpand(str(pattern))]
    if not specs:
        raise ValueError("no shards given")
    fs, paths = storage.resolve_many(specs)
    listings: dict[str, dict[str, pafs.FileInfo]] = {}

    def listing(folder: str) -> dict[str, pafs.FileInfo]:
        if folder not in listings:
            try:
                infos = fs.get_file_info(pafs.FileSelector(folder))
            except FileNotFoundError:
                raise FileNotFoundError(f"folder {storage.to_uri(specs[0], folder)} does not exist") from None
            listings[folder] = {posixpath.basename(info.path): info for info in infos}
        return listings[folder]

    # named shards: one listing for a folder with many, single lookups for a few
    named = [path for path in paths if not any(ch in path for ch in WILDCARDS)]
    per_folder: dict[str, int] = {}
    for path in named:
        per_folder[posixpath.dirname(path)] = per_folder.get(posixpath.dirname(path), 0) + 1
    lookups = [path for path in named if per_folder[posixpath.dirname(path)] <= LIST_FOLDER_ABOVE]
    found = dict(zip(lookups, fs.get_file_info(lookups), strict=True)) if lookups else {}

    shards: list[ShardFile] = []
    missing: list[str] = []
    for spec_uri, path in zip(specs, paths, strict=True):
        folder, name = posixpath.split(path)
        if any(ch in folder for ch in WILDCARDS):
            raise ValueError(f"{spec_uri}: wildcards may only appear in the file name")
        if any(ch in name for ch in WILDCARDS):
            matches = sorted(info.path for key, info in listing(folder).items()
                             if info.type == pafs.FileType.File and fnmatch.fnmatch(key, name))
            if not matches:
                raise FileNotFoundError(f"no files match {spec_uri}")
            shards += [ShardFile(storage.to_uri(spec_uri, p), listing(folder)[posixpath.basename(p)].size)
                       for p in matches]
            continue
        info = found.get(path) or listing(folder).get(name) or pafs.FileInfo(path, pafs.FileType.NotFound)
        if info.type == pafs.FileType.Directory:
            tars = sorted((i for i in listing(path).values() if i.type == pafs.FileType.File
                           and i.path.endswith(".tar")), key=lambda i: i.path)
            if not tars:
                raise FileNotFoundError(f"folder {spec_uri} holds no .tar shards")
            shards += [ShardFile(storage.to_uri(spec_uri, i.path), i.size) for i in tars]
        elif info.type == pafs.FileType.File:
            shards.append(ShardFile(storage.to_uri(spec_uri, path), info.size))
        else:
            missing.append(spec_uri)
    if len(missing) == 1:
        raise FileNotFoundError(f"shard {missing[0]} does not exist")
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(specs)} shards do not exist: {', '.join(missing[:3])}"
                                + (", …" if len(missing) > 3 else ""))
    return shards
