"""Read webdataset tar shards into a Ray Dataset of raw bytes, tolerating truncated and broken tars.

Why not `ray.data.read_webdataset` itself: it parses each tar with `tarfile` inside the read task, so a
truncated tar raises `tarfile.ReadError` and fails the task, and with it every good sample that task already
read (`DataContext.max_errored_blocks` drops them as well). `WebDatasetShards` below is a small
`FileBasedDatasource`, so listing, pyarrow filesystems, file-level shuffling and read-task sizing stay Ray's.
Its stream reader only differs in what it does at the break: it keeps every sample read before it and emits
one marker row (`read_error` set) that the decode stage counts as a bad sample.

Rows have one fixed schema whatever the members are (see `ROW_SCHEMA`), so that blocks from shards with
`.jpg` and shards with `.png` concatenate without column surprises. Decoding happens later, per sample, in
`map_batches` (decode.py), where one bad image costs one sample, not a read task.
"""

from __future__ import annotations

import fnmatch
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import braceexpand
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray
from ray.data.datasource import FileBasedDatasource, FileShuffleConfig

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
ROWS_PER_BLOCK = 64  # default rows per block, which is also rows per decode call (see datasets.py)
ROW_SCHEMA = pa.schema([
    ("__key__", pa.string()),  # sample key: member name up to the first dot of its base name
    ("__url__", pa.string()),  # shard path
    ("image", pa.binary()),  # raw image bytes, null when the key has no image member
    ("image_ext", pa.string()),
    ("cls", pa.binary()),  # raw `.cls` member, null when absent
    ("json", pa.binary()),  # raw `.json` member, null when absent
    ("read_error", pa.string()),  # set only on the marker row of a truncated or unreadable tar
])


@dataclass
class EpochShardOrder(FileShuffleConfig):
    """Shard files of epoch e are read in the permutation seeded with `seed + first_epoch + e`.

    Ray calls `get_seed` with the dataset's execution index, which advances once per completed epoch;
    `first_epoch` lets a resumed run continue the sequence instead of repeating epoch 0's order.
    """

    first_epoch: int = 0

    def get_seed(self, execution_idx: int = 0) -> int | None:
        if self.seed is None:
            return None
        return self.seed + self.first_epoch + execution_idx


def shard_order(paths: list[str], seed: int, epoch: int) -> list[str]:
    """The order in which epoch `epoch` reads `paths` under `EpochShardOrder(seed)` (same draws as Ray's)."""
    order = list(paths)
    np.random.default_rng(seed + epoch).shuffle(order)
    return order


def expand_shards(spec: str | list[str], filesystem: pafs.FileSystem | None = None
                  ) -> tuple[list[str], pafs.FileSystem]:
    """Paths, globs, brace patterns, folders or URIs -> (sorted-per-pattern list of tar paths, filesystem)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    specs = [s for pattern in specs for s in braceexpand.braceexpand(pattern)]
    if not specs:
        raise ValueError("no shards given")
    paths: list[str] = []
    for s in specs:
        fs, path = _resolve(s, filesystem)
        filesystem = filesystem or fs
        if any(ch in path for ch in "*?["):
            folder, pattern = posixpath.split(path)
            found = sorted(i.path for i in filesystem.get_file_info(pafs.FileSelector(folder))
                           if i.type == pafs.FileType.File and fnmatch.fnmatch(posixpath.basename(i.path), pattern))
            if not found:
                raise ValueError(f"no files match {s!r}")
            paths.extend(found)
        elif filesystem.get_file_info(path).type == pafs.FileType.Directory:
            paths.extend(sorted(i.path for i in filesystem.get_file_info(pafs.FileSelector(path))
                                if i.type == pafs.FileType.File and i.path.endswith(".tar")))
        else:
            paths.append(path)
    return paths, filesystem


def _resolve(spec: str, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    if filesystem is not None:
        return filesystem, spec.split("://", 1)[-1] if "://" in spec else spec
    if "://" in spec:
        return pafs.FileSystem.from_uri(spec)
    return pafs.LocalFileSystem(), posixpath.abspath(spec)


def split_member_name(name: str) -> tuple[str | None, str]:
    """`dir/000012.seg.png` -> (`dir/000012`, `seg.png`), as webdataset groups members into samples."""
    folder, base = posixpath.split(name)
    if "." not in base:
        return None, ""
    stem, suffix = base.split(".", 1)
    return posixpath.join(folder, stem) if folder else stem, suffix


TAR_BLOCK = 512
_ZERO_BLOCK = bytes(TAR_BLOCK)
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)


def iter_tar_members(fileobj) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file in a tar stream, in order; raises tarfile.ReadError where it breaks.

    A lean reader of the ustar/GNU/pax formats that webdataset writers produce, three times faster than
    `tarfile`'s stream mode here (0.1 against 0.3 ms per three-member sample): the header checksum,
    size and name are all a shard reader needs. Long names come from GNU `L` or pax `path` records.
    Unlike `tarfile`, a stream that stops at a member boundary is an error, not a clean end: only the
    end-of-archive block says a tar is complete, and a tar truncated between two members looks like that.
    """
    long_name: str | None = None
    while True:
        header = fileobj.read(TAR_BLOCK)
        if len(header) < TAR_BLOCK:
            raise tarfile.ReadError("unexpected end of data" if header else
                                    "archive ends without its end-of-archive block")
        if header == _ZERO_BLOCK:
            return
        if not _is_header(header):
            raise tarfile.ReadError("gzip data: shards must be uncompressed tars" if header[:2] == b"\x1f\x8b"
                                    else "not a tar header (bad checksum)")
        size = tarfile.nti(header[124:136])
        data = fileobj.read(size)
        if len(data) < size:
            raise tarfile.ReadError("unexpected end of data")
        padding = -size % TAR_BLOCK
        if padding and len(fileobj.read(padding)) < padding:
            raise tarfile.ReadError("unexpected end of data")
        kind = header[156:157]
        if kind == tarfile.GNUTYPE_LONGNAME:
            long_name = _text(data)
        elif kind == tarfile.XHDTYPE:
            long_name = _pax_path(data) or long_name
        elif kind in _FILE_TYPES:
            name = long_name
            if name is None:
                name = _text(header[:100])
                if header[257:265] == tarfile.POSIX_MAGIC and header[345]:  # GNU headers use these bytes otherwise
                    name = f"{_text(header[345:500])}/{name}"
            long_name = None
            yield name, data
        elif kind not in (tarfile.XGLTYPE, tarfile.GNUTYPE_LONGLINK):
            long_name = None  # directories, links, devices: nothing a sample needs


def _is_header(block: bytes) -> bool:
    try:
        return tarfile.nti(block[148:156]) in tarfile.calc_chksums(block)
    except tarfile.HeaderError:  # the checksum field is not a number
        return False


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_path(records: bytes) -> str | None:
    """The `path` of a pax extended header: records of the form b"<length> <key>=<value>\\n"."""
    pos = 0
    while pos < len(records):
        space = records.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(records[pos:space])
        except ValueError:
            raise tarfile.ReadError("malformed pax header") from None
        key, _, value = records[space + 1: pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        pos += length
    return None


def iter_tar_samples(fileobj, url: str) -> Iterator[dict]:
    """Rows of ROW_SCHEMA, one per key, in tar order; a final marker row if the tar breaks or is truncated."""
    current: dict | None = None
    try:
        for name, data in iter_tar_members(fileobj):
            key, suffix = split_member_name(name)
            if key is None:
                continue
            if current is None or key != current["__key__"]:
                if current is not None:
                    yield current
                current = _empty_row(key, url)
            _add_member(current, suffix.lower(), data)
    except tarfile.TarError as e:  # data errors; I/O errors propagate to Ray's retries
        # The key being read at the break goes down with the marker row, unless it already has its image and label.
        kept = current is not None and _has_image_and_label(current)
        if kept:
            yield current
        marker = _empty_row(current["__key__"] if current is not None and not kept else "", url)
        marker["read_error"] = f"{type(e).__name__}: {e}" + (f" after key {current['__key__']}" if kept else "")
        yield marker
        return
    if current is not None:
        yield current


def _has_image_and_label(row: dict) -> bool:
    return row["image"] is not None and (row["cls"] is not None or row["json"] is not None)


def _empty_row(key: str, url: str) -> dict:
    return {"__key__": key, "__url__": url, "image": None, "image_ext": None, "cls": None, "json": None,
            "read_error": None}


def _add_member(row: dict, suffix: str, data: bytes) -> None:
    if suffix in IMAGE_SUFFIXES:
        if row["image"] is None:  # a second image member of one key is ignored
            row["image"], row["image_ext"] = data, suffix
    elif suffix in ("cls", "json"):
        row[suffix] = data


def rows_to_block(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def count_samples(fs: pafs.FileSystem, path: str) -> int:
    """Keys in one shard (marker rows of a broken tar not counted)."""
    with fs.open_input_stream(path) as f:
        return sum(1 for row in iter_tar_samples(f, path) if row["read_error"] is None)


class WebDatasetShards(FileBasedDatasource):
    """Webdataset tars -> blocks of `rows_per_block` rows of ROW_SCHEMA, never failing on a broken tar."""

    def __init__(self, paths, *, rows_per_block: int = ROWS_PER_BLOCK, **file_based_datasource_kwargs):
        super().__init__(paths, **file_based_datasource_kwargs)
        self.rows_per_block = rows_per_block

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        rows: list[dict] = []
        for row in iter_tar_samples(f, path):
            rows.append(row)
            if len(rows) >= self.rows_per_block:
                yield rows_to_block(rows)
                rows = []
        if rows:
            yield rows_to_block(rows)


def read_shards(paths: list[str], filesystem: pafs.FileSystem, *, seed: int | None, first_epoch: int = 0,
                rows_per_block: int = ROWS_PER_BLOCK, override_num_blocks: int | None = None,
                num_cpus: float | None = None, resources: dict[str, float] | None = None,
                concurrency: int | None = None) -> ray.data.Dataset:
    """A dataset of raw rows; with `seed`, each epoch reads the shard files in a new seeded order.
    `resources`: Ray custom resources each read task requests (to place it on data nodes)."""
    shuffle = EpochShardOrder(seed=seed, first_epoch=first_epoch) if seed is not None else None
    source = WebDatasetShards(paths, rows_per_block=rows_per_block, filesystem=filesystem, shuffle=shuffle,
                              file_extensions=["tar"])
    return ray.data.read_datasource(source, override_num_blocks=override_num_blocks, num_cpus=num_cpus,
                                    resources=resources, concurrency=concurrency)
