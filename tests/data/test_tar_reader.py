"""Tolerant tar reading, header-only sample counts and the per-epoch shard order."""

import gzip
import io
import os
import tarfile

import pyarrow.fs as pafs
import pytest
import ray

from pipeline.data import tar_reader
from pipeline.data.datasets import read_shards
from pipeline.data.epochs import shard_order
from pipeline.data.tar_reader import count_samples, iter_tar_samples


@pytest.fixture
def shards(tars):
    """Five shards of two samples each: shard i holds keys i0, i1 with label i."""
    return [tars.write(f"s/train-{i:06d}.tar", [tars.good_record(f"{i}{j}", label=i, seed=j) for j in range(2)])
            for i in range(5)]


def tar_bytes(tars, n: int) -> tuple[bytes, list[tarfile.TarInfo]]:
    path = tars.write("t.tar", [tars.good_record(f"{i:04d}", label=i, seed=i) for i in range(n)])
    with tarfile.open(path) as t:
        return open(path, "rb").read(), t.getmembers()


def test_truncated_inside_a_member_keeps_every_sample_before_the_break(tars):
    data, members = tar_bytes(tars, 10)
    jpg6 = next(m for m in members if m.name == "0006.jpg")  # members per key: cls, jpg, json
    rows = list(iter_tar_samples(io.BytesIO(data[: jpg6.offset_data + 100]), "t.tar"))
    assert [r["__key__"] for r in rows[:-1]] == [f"{i:04d}" for i in range(6)]
    assert all(r["read_error"] is None and r["image"] is not None for r in rows[:-1])
    assert rows[-1]["__key__"] == "0006" and "unexpected end of data" in rows[-1]["read_error"]


def test_truncated_between_members_is_detected(tars):
    data, members = tar_bytes(tars, 10)
    cls4 = next(m for m in members if m.name == "0004.cls")
    rows = list(iter_tar_samples(io.BytesIO(data[: cls4.offset]), "t.tar"))
    assert [r["__key__"] for r in rows[:-1]] == [f"{i:04d}" for i in range(4)]
    assert rows[-1]["__key__"] == "" and "end-of-archive" in rows[-1]["read_error"]
    assert "after key 0003" in rows[-1]["read_error"]


def test_complete_tar_has_no_marker_and_garbage_empty_or_compressed_files_give_one(tars):
    data, _ = tar_bytes(tars, 3)
    assert [r["read_error"] for r in iter_tar_samples(io.BytesIO(data), "t.tar")] == [None] * 3
    for junk in (b"", b"this is not a tar archive" * 50):
        rows = list(iter_tar_samples(io.BytesIO(junk), "junk.tar"))
        assert len(rows) == 1 and rows[0]["read_error"] and rows[0]["image"] is None
    rows = list(iter_tar_samples(io.BytesIO(gzip.compress(data)), "t.tar"))
    assert len(rows) == 1 and "shards must be uncompressed tars" in rows[0]["read_error"]


def test_members_out_of_key_order_do_not_raise(tars):
    path = str(tars.folder / "mixed.tar")
    with tarfile.open(path, "w") as t:
        for name, payload in [("a.jpg", b"1"), ("b.jpg", b"2"), ("a.cls", b"0")]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            t.addfile(info, io.BytesIO(payload))
    with open(path, "rb") as f:
        rows = list(iter_tar_samples(f, path))
    assert [(r["__key__"], r["image"] is not None, r["cls"]) for r in rows] == [
        ("a", True, None), ("b", True, None), ("a", False, b"0")]


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_member_names_and_non_file_members_in_each_tar_format(tmp_path, tar_format):
    folder = "d" * 90 + "/" + "e" * 60  # ustar splits it into prefix + name; GNU and pax write a long-name record
    ustar = tar_format == tarfile.USTAR_FORMAT
    key = f"{folder}/sample" if ustar else f"{folder}/{'k' * 120}"
    path = str(tmp_path / "long.tar")
    with tarfile.open(path, "w", format=tar_format) as t:
        t.addfile(_member(folder, tarfile.DIRTYPE))
        # a long link target: GNU writes a long-link record for it, pax a linkpath record
        t.addfile(_member("link.jpg", tarfile.SYMTYPE, linkname="x" * (50 if ustar else 150)))
        for suffix, payload in [("jpg", b"jpeg bytes"), ("cls", b"3")]:
            info = _member(f"{key}.{suffix}", tarfile.REGTYPE, len(payload))
            t.addfile(info, io.BytesIO(payload))
    with open(path, "rb") as f:
        rows = list(iter_tar_samples(f, path))
    assert [(r["__key__"], r["image"], r["cls"], r["read_error"]) for r in rows] == [(key, b"jpeg bytes", b"3", None)]
    assert count_samples(pafs.LocalFileSystem(), path) == 1


@pytest.mark.parametrize("scan_block", [512, 1500, 1 << 22])  # header and data reads across block edges, or none
def test_header_only_counts_equal_the_samples_the_stream_reader_yields(tars, tmp_path, monkeypatch, scan_block):
    monkeypatch.setattr(tar_reader, "SCAN_BLOCK", scan_block)
    data, members = tar_bytes(tars, 10)
    offset = {m.name: m for m in members}
    cases = {"whole": (data, 10),
             "cut inside an image": (data[: offset["0006.jpg"].offset_data + 100], 6),
             "cut inside the json after image and label": (data[: offset["0006.json"].offset_data + 10], 7),
             "cut between two samples": (data[: offset["0004.cls"].offset], 4),
             "cut in the end-of-archive blocks": (data[: offset["0009.json"].offset_data + 512 + 100], 10)}
    for name, (blob, expected) in cases.items():
        path = tmp_path / "x.tar"
        path.write_bytes(blob)
        streamed = [r for r in iter_tar_samples(io.BytesIO(blob), "x.tar") if r["read_error"] is None]
        assert count_samples(pafs.LocalFileSystem(), str(path)) == len(streamed) == expected, name


def _member(name: str, kind: bytes, size: int = 0, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, linkname
    return info


def shard_sequence(dataset: ray.data.Dataset) -> list[str]:
    urls = [r["__url__"] for r in dataset.select_columns(["__url__"]).take_all()]
    return list(dict.fromkeys(urls))


def test_each_epoch_reads_shards_in_the_permutation_seeded_with_seed_plus_epoch(ray_local, shards):
    paths, fs = [os.path.abspath(p) for p in shards], pafs.LocalFileSystem()
    dataset = read_shards(paths, fs, seed=11, override_num_blocks=len(paths))
    dataset.context.execution_options.preserve_order = True  # row order = read-task order
    epochs = [shard_sequence(dataset) for _ in range(3)]
    assert epochs == [shard_order(paths, 11, e) for e in range(3)]
    assert len({tuple(e) for e in epochs}) == 3
    resumed = read_shards(paths, fs, seed=11, first_epoch=2, override_num_blocks=len(paths))
    resumed.context.execution_options.preserve_order = True
    assert shard_sequence(resumed) == epochs[2]
    unshuffled = read_shards(paths, fs, seed=None, override_num_blocks=len(paths))
    unshuffled.context.execution_options.preserve_order = True
    assert shard_sequence(unshuffled) == paths
