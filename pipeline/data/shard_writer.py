"""Write a source's splits as `{split}-{000000}.tar` webdataset shards plus `{split}.manifest.json`.

Each key holds the image under its own format's suffix (`.jpg`, `.png`, `.webp`: the original bytes, never
re-encoded), `.cls` (the integer label) and `.json` (source, width, height). Shards are cut by
`webdataset.ShardWriter` at `max_count` samples or once `max_size` bytes of member data (tar headers not
counted) are written. The output may be a local folder or any
pyarrow filesystem URI: remote shards are written to a local staging folder and uploaded as each one closes,
so local disk holds at most one shard. The manifest is written last (see manifest.py).

Shards written by another tool (img2dataset's `00000.tar …`) are indexed in place by `index_shards`.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import posixpath
import random
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from importlib import metadata

import pyarrow.fs as pafs
import webdataset as wds
from tqdm import tqdm

from pipeline import storage
from pipeline.data.manifest import Manifest, ShardInfo, manifest_name, split_of, write_manifest
from pipeline.data.shard_specs import list_shards
from pipeline.data.sources import Sample, Skipped, Source
from pipeline.data.tar_reader import count_samples, first_sample_members

log = logging.getLogger(__name__)

SHARD_PATTERN = "{split}-%06d.tar"


def writer_version() -> str:
    try:
        ours = metadata.version("vit-pipeline")
    except metadata.PackageNotFoundError:  # running from a checkout that was never installed
        ours = "unknown"
    return f"vit-pipeline {ours} make_shards; webdataset {wds.__version__}"


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
        fs, folder = storage.resolve(out)
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
    first: dict = {}
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
            record = sample_record(item)
            first = first or record
            writer.write(record)
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
        skipped=len(skipped), image_stats=_image_stats(sizes, sum(s.num_samples for s in shards)),
        sample_members=sorted(key for key in first if key != "__key__"), json_keys=sorted(first.get("json", {})))
    path = storage.to_uri(out, write_manifest(manifest, fs, folder))
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


STATS_SUFFIX = "_stats.json"  # img2dataset writes NNNNN_stats.json beside NNNNN.tar when a shard is done
INDEX_THREADS = 32  # shards counted at once: the work is waiting on storage requests


@dataclass
class IndexReport:
    manifest: Manifest
    path: str  # where the manifest was written (a URI for remote shards)
    from_stats: int  # shards counted from img2dataset's _stats.json
    from_tars: int  # shards counted from their tar headers
    verified: int  # shards with stats that were also counted from their tars, and agreed


def index_shards(spec: str | list[str], classes: list[str] | None = None, *, split: str | None = None,
                 verify: int = 0, threads: int = INDEX_THREADS, progress: bool = True) -> IndexReport:
    """Count the samples of existing shards (img2dataset output, or any webdataset writer's) and write their
    manifest beside them.

    The shards must sit in one folder and be one split: their common name prefix (`train-000000.tar` ->
    `train`), or, for names that are a bare number (img2dataset's `00000.tar`), `split` (default `train`),
    which also names the manifest. A shard's count is the `successes` of its img2dataset `NNNNN_stats.json`
    when one sits beside it, else what its tar headers list (member data are not read); `verify` shards with
    stats, chosen at random, are counted from their tars too and must agree. Shards are counted by `threads`
    threads at once, since the time goes into waiting on storage requests.
    """
    files = list_shards(spec)
    fs, paths = storage.resolve_many([shard.uri for shard in files])
    folders = sorted({posixpath.dirname(path) for path in paths})
    if len(folders) != 1:
        raise ValueError(f"the shards must sit in one folder, got {len(folders)}: "
                         f"{', '.join(storage.to_uri(files[0].uri, f) for f in folders[:3])}")
    prefixes = sorted({split_of(path) or "" for path in paths})
    if len(prefixes) != 1:
        names = ", ".join(prefix or "<numbered>" for prefix in prefixes)
        raise ValueError(f"the shards are of {len(prefixes)} splits ({names}); index one split at a time, e.g. "
                         "--source 'shards:DIR/train-*.tar'")
    split = split or prefixes[0] or "train"
    folder = folders[0]
    stats = {info.path for info in fs.get_file_info(pafs.FileSelector(folder)) if info.path.endswith(STATS_SUFFIX)}
    stats_of = {path: stats_path for path in paths
                if (stats_path := path[: -len(".tar")] + STATS_SUFFIX) in stats and path.endswith(".tar")}
    members = first_sample_members(fs, paths[0])

    def count(path: str) -> tuple[int, bool]:
        if path in stats_of:
            return stats_successes(fs, stats_of[path]), True
        return count_samples(fs, path), False

    counts: dict[str, int] = {}
    from_stats = 0
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool, \
            tqdm(total=len(paths), unit="shard", desc=f"indexing {split}", disable=not progress) as bar:
        futures = {pool.submit(count, path): path for path in paths}
        for future in as_completed(futures):
            counts[futures[future]], stat = future.result()
            from_stats += stat
            bar.update(1)
        checked = random.Random(0).sample(sorted(stats_of), min(verify, len(stats_of)))
        tar_counts = dict(zip(checked, pool.map(lambda path: count_samples(fs, path), checked), strict=True))
    wrong = [f"{posixpath.basename(path)}: {counts[path]} in its stats, {n} in the tar"
             for path, n in tar_counts.items() if n != counts[path]]
    if wrong:
        raise ValueError(f"{len(wrong)} of {len(checked)} checked shards disagree with their {STATS_SUFFIX}: "
                         + "; ".join(wrong[:5]))
    manifest = Manifest(split=split, classes=list(classes or []),
                        shards=[ShardInfo(name=posixpath.basename(path), num_samples=counts[path],
                                          num_bytes=shard.num_bytes) for path, shard in zip(paths, files, strict=True)],
                        writer=writer_version() + " (index of existing shards)",
                        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        sample_members=members.suffixes, json_keys=members.json_keys)
    path = write_manifest(manifest, fs, folder)
    return IndexReport(manifest=manifest, path=storage.to_uri(files[0].uri, path), from_stats=from_stats,
                       from_tars=len(paths) - from_stats, verified=len(checked))


def stats_successes(fs: pafs.FileSystem, path: str) -> int:
    """Samples img2dataset wrote into a shard, from its `NNNNN_stats.json`."""
    with fs.open_input_stream(path) as f:
        try:
            successes = json.loads(f.read())["successes"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{posixpath.basename(path)} is not an img2dataset stats file: {err}") from err
    if not isinstance(successes, int) or successes < 0:
        raise ValueError(f"{posixpath.basename(path)}: successes {successes!r} is not a count")
    return successes


def _image_stats(sizes: dict, count: int) -> dict:
    if not count:
        return {}
    return {"mean_width": round(sizes["sum_width"] / count, 1), "mean_height": round(sizes["sum_height"] / count, 1),
            "max_width": sizes["max_width"], "max_height": sizes["max_height"]}


DIGITS_SHARD_SIZE = 200  # 8 train shards: decode runs in parallel, and a resume meets partly read shards


def ensure_digits_shards(train_spec: str, *, img_size: int) -> None:
    """The embedded demo's data: write the digits shards into the folder of `train_spec` unless its train
    manifest is already there (a folder without one is a split still being written, so it is rewritten)."""
    from pipeline.data.sources import digits_source

    folder = posixpath.dirname(os.path.abspath(train_spec))
    if os.path.exists(posixpath.join(folder, manifest_name("train"))):
        return
    log.info("writing the digits demo shards to %s", folder)
    write_source(digits_source(img_size=img_size), folder, max_count=DIGITS_SHARD_SIZE, max_size=1 << 30)
