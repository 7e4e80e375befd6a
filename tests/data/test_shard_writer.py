"""Sources to shards and back: digits and ImageFolder round trips, manifests, sizes, remote outputs."""

import io
import itertools
import json
import os
import tarfile
from collections import Counter

import numpy as np
import pyarrow.fs as pafs
import pytest
from PIL import Image

from pipeline import storage
from pipeline.config import DataConfig
from pipeline.data.datasets import build_image_dataset, read_shards
from pipeline.data.epochs import steps_per_epoch
from pipeline.data.ledger import start_ledger
from pipeline.data.manifest import Manifest, find_manifest
from pipeline.data.shard_set import read_shard_set
from pipeline.data.shard_specs import expand_shards
from pipeline.data.shard_writer import index_shards, write_source, write_split
from pipeline.data.sources import digits_source, imagefolder_source, read_image_file
from pipeline.data.tar_reader import iter_tar_samples


def tar_rows(path: str) -> list[dict]:
    with open(path, "rb") as f:
        return list(iter_tar_samples(f, path))


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    manifests = write_source(digits_source(img_size=32), str(out), max_count=400, max_size=1 << 30, progress=False)
    return out, manifests


def test_digits_shards_hold_every_digit_once_with_its_label(digits_dir):
    from sklearn.datasets import load_digits

    out, manifests = digits_dir
    assert manifests["train"].num_samples + manifests["val"].num_samples == 1797
    assert manifests["val"].num_samples == 359  # 20% of each class, rounded per class
    assert [s.num_samples for s in manifests["train"].shards] == [400, 400, 400, 238]
    expected = load_digits().target
    seen = Counter()
    for manifest in manifests.values():
        for shard in manifest.shards:
            rows = tar_rows(str(out / shard.name))
            assert len(rows) == shard.num_samples and shard.num_bytes == os.path.getsize(out / shard.name)
            for row in rows:
                meta = json.loads(row["json"])
                index = int(meta["source"].split("[")[1].rstrip("]"))
                assert int(row["cls"]) == expected[index]
                assert (meta["width"], meta["height"]) == (32, 32) and row["image_ext"] == "jpg"
                assert Image.open(io.BytesIO(row["image"])).mode == "RGB"
                seen[index] += 1
    assert sorted(seen) == list(range(1797)) and set(seen.values()) == {1}


def test_manifest_is_complete_and_alone(digits_dir):
    out, manifests = digits_dir
    assert sorted(os.listdir(out)) == ["train-000000.tar", "train-000001.tar", "train-000002.tar",
                                       "train-000003.tar", "train.manifest.json", "val-000000.tar",
                                       "val.manifest.json"]
    body = json.loads((out / "train.manifest.json").read_text())
    assert body["num_samples"] == 1438 and body["num_shards"] == 4 and body["num_classes"] == 10
    assert body["classes"] == [str(c) for c in range(10)] and "webdataset 1.0.2" in body["writer"]
    assert body["num_bytes"] == sum(os.path.getsize(out / s["name"]) for s in body["shards"])
    assert body["image_stats"] == {"mean_width": 32.0, "mean_height": 32.0, "max_width": 32, "max_height": 32}
    paths = expand_shards(str(out / "train-{000000..000003}.tar"))
    manifest = find_manifest(paths)
    assert sum(manifest.sample_counts(paths[:2])) == 800
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert steps_per_epoch(manifest.num_samples, world_size=2, batch_size=64) == 11


def test_digits_read_back_through_ray_yields_every_key_once(ray_local, digits_dir):
    out, manifests = digits_dir
    raw = read_shards(expand_shards(str(out / "train-*.tar")), pafs.LocalFileSystem(), seed=None)
    rows = raw.select_columns(["__url__", "__key__"]).take_all()
    keys = Counter((os.path.basename(r["__url__"]), r["__key__"]) for r in rows)
    assert len(keys) == 1438 and set(keys.values()) == {1}
    val = read_shard_set(str(out / "val-*.tar"))
    ledger = start_ledger(0.01, 1000)
    decoded = build_image_dataset(val, DataConfig(img_size=32), train=False, num_classes=10, ledger=ledger)
    labels = Counter()
    for batch in decoded.iter_batches(batch_size=100, batch_format="numpy"):
        assert batch["image"].shape[1:] == (3, 32, 32) and batch["image"].dtype == np.uint8
        labels.update(batch["label"].tolist())
    val_labels = Counter(int(r["cls"]) for r in tar_rows(str(out / "val-000000.tar")))
    assert labels == val_labels and sum(labels.values()) == val.num_samples == 359
    assert ledger.report().seen == 359 and ledger.report().num_bad == 0


@pytest.fixture
def image_folder(tmp_path, tars):
    root = tmp_path / "folder"
    files = {"cat": [("a.jpg", "JPEG"), ("b.JPEG", "JPEG"), ("c.png", "PNG")],
             "dog": [("d.webp", "WEBP"), ("e.jpg", "PNG")],  # e.jpg is really a PNG
             "emu": [("f.png", "PNG")]}
    for i, (cls, names) in enumerate(files.items()):
        (root / cls / "nested").mkdir(parents=True)
        for j, (name, fmt) in enumerate(names):
            folder = root / cls / ("nested" if j == 0 else "")
            (folder / name).write_bytes(tars.image_bytes(30 + i, 20 + j, fmt=fmt, seed=i * 10 + j))
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "emu" / "notes.txt").write_text("ignored: not an image extension")
    return root


def test_imagefolder_keeps_original_bytes_and_counts_skipped_files(image_folder, tmp_path):
    manifest = write_split(imagefolder_source(str(image_folder)).splits["train"](), ["cat", "dog", "emu"],
                           str(tmp_path / "out"), split="train", max_count=4, progress=False)
    assert manifest.num_samples == 6 and manifest.skipped == 1
    assert [s.num_samples for s in manifest.shards] == [4, 2]
    rows = [r for s in manifest.shards for r in tar_rows(str(tmp_path / "out" / s.name))]
    by_source = {json.loads(r["json"])["source"]: r for r in rows}
    for path in image_folder.rglob("*"):
        if path.suffix in (".txt", "") or path.name == "broken.jpg" or path.is_dir():
            continue
        row = by_source[str(path)]
        assert row["image"] == path.read_bytes()  # stored as-is, never re-encoded
        assert row["image_ext"] == {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[Image.open(path).format]
        assert int(row["cls"]) == ["cat", "dog", "emu"].index(path.relative_to(image_folder).parts[0])
        meta = json.loads(row["json"])
        assert (meta["width"], meta["height"]) == Image.open(path).size
    assert sorted(int(r["__key__"]) for r in rows) == list(range(6))


def test_rewriting_a_split_removes_its_old_manifest_first(tmp_path):
    source = digits_source(img_size=8)
    out = str(tmp_path / "d")
    write_split(source.splits["val"](), source.classes, out, split="val", max_count=100, progress=False)

    def failing():
        yield from itertools.islice(source.splits["val"](), 150)
        raise RuntimeError("source went away")

    with pytest.raises(RuntimeError, match="went away"):
        write_split(failing(), source.classes, out, split="val", max_count=100, progress=False)
    assert not (tmp_path / "d" / "val.manifest.json").exists()  # no manifest vouches for the partial rewrite


def test_max_size_cuts_shards_and_remote_outputs_are_uploaded(tmp_path):
    source = digits_source(img_size=16)
    remote = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())  # not a LocalFileSystem: staged upload
    manifest = write_split(source.splits["val"](), source.classes, "bucket/digits", split="val", max_count=10**6,
                           max_size=50_000, progress=False, fs=remote)
    assert len(manifest.shards) >= 3 and manifest.num_samples == 359
    names = sorted(os.listdir(tmp_path / "bucket" / "digits"))
    assert names == [s.name for s in manifest.shards] + ["val.manifest.json"]
    # cut after the sample whose member data crosses the limit; ustar headers add 512 bytes per member
    assert all(s.num_bytes <= 50_000 + 3 * 1024 * s.num_samples + 10_240 for s in manifest.shards)


def img2dataset_records(tars, n: int) -> list[dict]:
    """Samples as img2dataset writes them: an image, a caption, and a .json with the url and extra columns."""
    return [{"__key__": f"{i:09d}", "jpg": tars.image_bytes(20, 20, seed=i), "txt": "a caption",
             "json": {"key": f"{i:09d}", "url": f"http://x/{i}.jpg", "label": i % 3}} for i in range(n)]


def test_index_prefixed_shards_from_their_tars(tars, tmp_path):
    records = img2dataset_records(tars, 7)
    tars.write("laion/part-00000.tar", records[:4])
    tars.write("laion/part-00001.tar", records[4:])
    report = index_shards(str(tmp_path / "laion" / "part-*.tar"), classes=["a", "b", "c"], progress=False)
    manifest = report.manifest
    shards = read_shard_set(str(tmp_path / "laion" / "part-*.tar"))
    assert manifest.split == "part" and [s.num_samples for s in manifest.shards] == [4, 3] == shards.counts
    assert (report.from_stats, report.from_tars) == (0, 2)
    assert report.path == str(tmp_path / "laion" / "part.manifest.json")
    assert manifest.sample_members == ["jpg", "json", "txt"] and manifest.json_keys == ["key", "label", "url"]
    assert "no .cls member" in shards.label_problem("") and shards.label_problem("label") is None
    assert "'cls_id' is not a key" in shards.label_problem("cls_id")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_index_numbered_shards_from_img2dataset_stats_and_check_them(tars, tmp_path, where, request):
    """img2dataset's layout: 00000.tar, 00000_stats.json, 00000.parquet; names without a split."""
    records = img2dataset_records(tars, 9)
    folder = tmp_path / "out"
    for shard, part in enumerate((records[:4], records[4:6], records[6:])):
        tars.write(f"out/{shard:05d}.tar", part)
        if shard != 1:  # a shard whose stats file is missing is counted from its tar
            (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": 5, "successes": len(part)}))
        (folder / f"{shard:05d}.parquet").write_bytes(b"PAR1")
    base = str(folder)
    if where == "s3":
        base = request.getfixturevalue("s3_store").uri("index", tmp_path.name)
        fs, path = storage.resolve(base)
        pafs.copy_files(str(folder), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    report = index_shards(f"{base}/{{00000..00002}}.tar", verify=2, progress=False)
    assert report.manifest.split == "train" and report.path == f"{base}/train.manifest.json"
    assert [s.num_samples for s in report.manifest.shards] == [4, 2, 3]
    assert (report.from_stats, report.from_tars, report.verified) == (2, 1, 2)
    assert find_manifest(expand_shards(f"{base}/*.tar")) == report.manifest  # found for unnamed shards too
    assert index_shards(f"{base}/*.tar", split="val", progress=False).path == f"{base}/val.manifest.json"

    (folder / "00002_stats.json").write_text(json.dumps({"successes": 5}))  # the tar holds 3
    with pytest.raises(ValueError, match=r"1 of 2 checked shards disagree .*00002.tar: 5 in its stats, 3 in the tar"):
        index_shards(f"{folder}/*.tar", verify=5, progress=False)
    with pytest.raises(ValueError, match=r"2 splits \(<numbered>, part\)"):
        tars.write("out/part-00000.tar", records[:1])
        index_shards(f"{folder}/*.tar", progress=False)


def test_read_image_file_reencodes_other_formats_as_png(tmp_path):
    gif = tmp_path / "x.jpg"
    Image.new("RGB", (5, 4), (10, 20, 30)).save(gif, format="GIF")
    sample = read_image_file(str(gif), key="00000000", label=1)
    assert sample.image_ext == "png" and Image.open(io.BytesIO(sample.image)).format == "PNG"
    assert (sample.width, sample.height) == (5, 4)
    assert tarfile.is_tarfile(str(gif)) is False
