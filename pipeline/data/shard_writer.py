"""Write a source's splits as `{split}-{000000}.tar` webdataset shards plus `{split}.manifest.json`.

Each key holds the image under its own format's suffix (`.jpg`, `.png`, `.webp`: the original bytes, never
re-encoded), `.cls` (the integer label) and `.json` (source, width, height). Shards are cut by
`webdataset.ShardWriter` at `max_count` samples or once `max_size` bytes of member data (tar headers not
counted) are written. The output may be a local folder or any
pyarrow filesystem URI: remote shards are written to a local staging folder and uploaded as each one closes,
so local disk holds at most one shard. The manifest is written last (see manifest.py).
"""

from __future__ import annotations

import datetime
import logging
import os
import posixpath
import tarfile
import tempfile
import time
from importlib import metadata

import pyarrow.fs as pafs
import webdataset as wds
from tqdm import tqdm

from pipeline.data.manifest import Manifest, ShardInfo, manifest_name, split_of, write_manifest
from pipeline.data.sources import Sample, Skipped, Source
from pipeline.data.tar_reader import count_samples, expand_shards

log = logging.getLogger(__name__)

SHARD_PATTERN = "{split}-%06d.tar"


def writer_version() -> str:
    try:
        ours = metadata.version("vit-pipeline")
    except metadata.PackageNotFoundError:  # running from a checkout that was never installed
        ours = "unknown"
    return f"vit-pipeline {ours} make_shards; webdataset {wds.__version__}"


def resolve_output(out: str) -> tuple[pafs.FileSystem, str]:
    """A folder path or URI -> (filesystem, folder path inside it)."""
    if "://" in out:
        return pafs.FileSystem.from_uri(out)
    return pafs.LocalFileSystem(), os.path.abspath(out)


def write_source(source: Source, out: str, *, max_count: int, max_size: int, progress: bool = True,
                 fs: pafs.FileSystem | None = None) -> dict[str, Manifest]:
    """Write every split of `source` under `out`; returns the manifests by split."""
    return {split: write_split(samples(), source.classes, out, split=split, total=source.sizes[split],
                               max_count=max_count, max_size=max_size, progress=progress, fs=fs)
            for split, samples in source.splits.items()}


def write_split(samples, classes: list[str], out: str, *, split: str, total: int | None = None,
                max_count: int = 10_000, max_size: int = 1 << 30, progress: bool = True,
                fs: pafs.FileSystem | None = None) -> Manifest:
    """Write one split's samples (an iterable of Sample | Skipped) as shards, then its manifest."""
    if fs is None:
        fs, folder = resolve_output(out)
    else:
        folder = out
    local = isinstance(fs, pafs.LocalFileSystem)
    fs.create_dir(folder, recursive=True)
    # An older manifest beside shards being rewritten would vouch for a half-written split.
    old_manifest = posixpath.join(folder, manifest_name(split))
    if fs.get_file_info(old_manifest).type == pafs.FileType.File:
        fs.delete_file(old_manifest)
    staging = None if local else tempfile.TemporaryDirectory(prefix="shards-")
    write_dir = folder if local else staging.name
    shards: list[ShardInfo] = []
    skipped: list[Skipped] = []
    sizes = {"sum_width": 0, "sum_height": 0, "max_width": 0, "max_height": 0}

    def on_shard_closed(fname: str) -> None:
        # ShardWriter calls this before it resets its per-shard counter, so writer.count is this shard's.
        name = os.path.basename(fname)
        if writer.count == 0:  # ShardWriter opens a first shard before any sample; drop it if none came
            os.remove(fname)
            return
        shards.append(ShardInfo(name=name, num_samples=writer.count, num_bytes=os.path.getsize(fname)))
        if not local:
            pafs.copy_files(fname, posixpath.join(folder, name), source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=fs)
            os.remove(fname)

    pattern = os.path.join(write_dir, SHARD_PATTERN.format(split=split))
    bar = tqdm(total=total, unit="img", desc=f"{split} shards", disable=not progress, dynamic_ncols=True)
    # A whole-second mtime and plain ustar headers: a float mtime makes tarfile add a 1 KiB PAX header per member.
    writer = wds.ShardWriter(pattern, maxcount=max_count, maxsize=max_size, post=on_shard_closed, verbose=0,
                             mtime=int(time.time()), format=tarfile.USTAR_FORMAT)
    try:
        for item in samples:
            bar.update(1)
            if isinstance(item, Skipped):
                skipped.append(item)
                continue
            writer.write(sample_record(item))
            sizes["sum_width"] += item.width
            sizes["sum_height"] += item.height
            sizes["max_width"] = max(sizes["max_width"], item.width)
            sizes["max_height"] = max(sizes["max_height"], item.height)
            bar.set_postfix(shards=len(shards) + 1, skipped=len(skipped), refresh=False)
    finally:
        writer.close()
        bar.close()
        if staging is not None:
            staging.cleanup()
    for s in skipped[:5]:
        log.warning("skipped %s: %s", s.source, s.reason)
    manifest = Manifest(
        split=split, classes=list(classes), shards=shards, writer=writer_version(),
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        skipped=len(skipped), image_stats=_image_stats(sizes, sum(s.num_samples for s in shards)))
    path = write_manifest(manifest, fs, folder)
    log.info("%s: %d samples in %d shards (%.1f MiB), %d skipped; manifest %s", split, manifest.num_samples,
             len(shards), manifest.num_bytes / 2**20, len(skipped), path)
    return manifest


def sample_record(sample: Sample) -> dict:
    return {
        "__key__": sample.key,
        sample.image_ext: sample.image,
        "cls": str(sample.label).encode(),
        "json": {"source": sample.source, "width": sample.width, "height": sample.height},
    }


def index_shards(spec: str | list[str], classes: list[str] | None = None) -> Manifest:
    """Count the samples of existing shards (e.g. img2dataset output) and write their manifest beside them.

    All shards must sit in one folder and share one split prefix (`train-000000.tar` -> split `train`).
    """
    paths, fs = expand_shards(spec)
    folders = {posixpath.dirname(p) for p in paths}
    splits = {split_of(p) for p in paths}
    if len(folders) != 1 or len(splits) != 1:
        raise ValueError(f"index_shards needs shards of one split in one folder, got splits {sorted(splits)} "
                         f"in {len(folders)} folder(s)")
    shards = []
    for path in tqdm(paths, unit="shard", desc="indexing"):
        num_samples = count_samples(fs, path)
        shards.append(ShardInfo(name=posixpath.basename(path), num_samples=num_samples,
                                num_bytes=fs.get_file_info(path).size))
    manifest = Manifest(split=splits.pop(), classes=list(classes or []), shards=shards,
                        writer=writer_version() + " (index of existing shards)",
                        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    write_manifest(manifest, fs, folders.pop())
    return manifest


def _image_stats(sizes: dict, count: int) -> dict:
    if not count:
        return {}
    return {"mean_width": round(sizes["sum_width"] / count, 1), "mean_height": round(sizes["sum_height"] / count, 1),
            "max_width": sizes["max_width"], "max_height": sizes["max_height"]}


DIGITS_SHARD_SIZE = 200  # 8 train shards: decode runs in parallel and resumes at shard granularity


def ensure_digits_shards(train_spec: str, *, img_size: int) -> None:
    """The embedded demo's data: write the digits shards into the folder of `train_spec` unless its train
    manifest is already there (a folder without one is a split still being written, so it is rewritten)."""
    from pipeline.data.sources import digits_source

    folder = posixpath.dirname(os.path.abspath(train_spec))
    if os.path.exists(posixpath.join(folder, manifest_name("train"))):
        return
    log.info("writing the digits demo shards to %s", folder)
    write_source(digits_source(img_size=img_size), folder, max_count=DIGITS_SHARD_SIZE, max_size=1 << 30)
