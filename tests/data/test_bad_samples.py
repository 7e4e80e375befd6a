"""Bad samples are skipped and counted exactly, the good ones all arrive, and too many stop the job."""

import os
from collections import Counter

import pytest

from pipeline.config import DataConfig
from pipeline.data.bad_samples import REASONS, BadSampleReport
from pipeline.data.datasets import build_image_dataset
from pipeline.data.ledger import start_ledger
from pipeline.data.shard_set import read_shard_set

GOOD_A = 10  # good samples in shard a (labels i % 3), then the bad ones
GOOD_B = 5  # good samples in shard b (label 1)


def bad_records(tars, kind: str) -> list[dict]:
    """Three bad samples of one kind, keys bad0..bad2."""
    records = []
    for i in range(3):
        record = tars.good_record(f"bad{i}", label=2, seed=100 + i)
        if kind == "undecodable":
            record["jpg"] = b"\xff\xd8\xff\xe0 definitely not JPEG data" * (i + 1)
        elif kind == "bad_label":
            record["cls"] = [None, b"10", b"-3"][i]  # missing, out of range, negative
            if record["cls"] is None:
                del record["cls"]
        elif kind == "too_many_pixels":
            record["jpg"] = tars.image_bytes(200, 100, seed=i)  # 20,000 px > max_image_pixels below
        elif kind == "no_image":
            del record["jpg"]
        records.append(record)
    return records


def run(spec, cfg: DataConfig) -> tuple[Counter, BadSampleReport, int]:
    shards = read_shard_set(spec)
    ledger = start_ledger(cfg.max_bad_fraction, cfg.min_samples_for_bad_check)
    dataset = build_image_dataset(shards, cfg, train=False, num_classes=cfg.num_classes or len(shards.classes),
                                  ledger=ledger)
    labels = Counter()
    images = 0
    for batch in dataset.iter_batches(batch_size=8, batch_format="numpy"):
        labels.update(batch["label"].tolist())
        images += len(batch["image"])
    return labels, ledger.report(), images


def write_shards(tars, bad: list[dict]) -> str:
    good_a = [tars.good_record(f"{i:04d}", label=i % 3, seed=i) for i in range(GOOD_A)]
    tars.write("bad/a-000000.tar", good_a[:6] + bad + good_a[6:])  # bad ones in the middle of the shard
    tars.write("bad/a-000001.tar", [tars.good_record(f"{i:04d}", label=1, seed=50 + i) for i in range(GOOD_B)])
    return str(tars.folder / "bad" / "a-*.tar")


EXPECTED_LABELS = Counter([i % 3 for i in range(GOOD_A)] + [1] * GOOD_B)
CFG = DataConfig(img_size=16, num_classes=3, max_image_pixels=10_000, max_bad_fraction=0.5,
                 min_samples_for_bad_check=1)


@pytest.mark.parametrize("kind", ["undecodable", "bad_label", "too_many_pixels", "no_image"])
def test_bad_samples_of_each_kind_are_counted_and_the_rest_arrive(ray_local, tars, kind):
    labels, report, images = run(write_shards(tars, bad_records(tars, kind)), CFG)
    assert labels == EXPECTED_LABELS and images == GOOD_A + GOOD_B
    assert report.seen == GOOD_A + GOOD_B + 3
    assert report.bad == {reason: (3 if reason == kind else 0) for reason in REASONS}
    assert sorted(e.split(" ")[0] for e in report.examples) == [f"a-000000.tar/bad{i}" for i in range(3)]
    assert all(f"({kind}: " in e for e in report.examples)


def test_truncated_tar_is_counted_once_and_its_earlier_samples_arrive(ray_local, tars):
    path = write_shards(tars, [])
    shard = str(tars.folder / "bad" / "a-000000.tar")
    data = open(shard, "rb").read()
    with open(shard, "wb") as f:  # cut inside the image of the 8th key: keys 0..6 survive
        f.write(data[: data.index(b"test:0007") - 2000])
    labels, report, images = run(path, CFG)
    assert images == 7 + GOOD_B and labels == Counter([i % 3 for i in range(7)] + [1] * GOOD_B)
    assert report.bad["truncated_tar"] == 1 and report.num_bad == 1 and report.seen == 7 + GOOD_B + 1
    assert report.examples[0].startswith("a-000000.tar/0007 (truncated_tar: ReadError")


def test_label_from_a_json_key_as_img2dataset_writes_it(ray_local, tars):
    records = [{"__key__": f"{i:09d}", "jpg": tars.image_bytes(32, 24, seed=i), "txt": f"caption {i}",
                "json": {"key": f"{i:09d}", "status": "success", "class_id": i % 4}} for i in range(9)]
    records[4]["json"] = {"key": "000000004", "status": "success"}  # no label: skipped and counted
    tars.write("i2d/00000.tar", records)
    cfg = DataConfig(img_size=16, label_key="class_id", max_bad_fraction=0.5, min_samples_for_bad_check=1)
    labels, report, images = run(str(tars.folder / "i2d" / "00000.tar"), cfg)
    assert labels == Counter(i % 4 for i in range(9) if i != 4) and images == 8
    assert report.bad["bad_label"] == 1 and "no key 'class_id'" in report.examples[0]


def test_too_many_bad_samples_stop_the_job_with_counts_and_examples(ray_local, tars):
    records = [tars.good_record(f"{i:04d}", label=0, seed=i) for i in range(4)]
    records += [dict(tars.good_record(f"junk{i}", label=0), jpg=b"junk") for i in range(6)]
    tars.write("many/m-000000.tar", records)
    cfg = DataConfig(img_size=16, max_bad_fraction=0.2, min_samples_for_bad_check=5)
    with pytest.raises(Exception, match="too many bad samples") as stopped:
        run(str(tars.folder / "many" / "m-000000.tar"), cfg)
    message = str(stopped.value)
    assert "6 of 10 samples were bad (60.00%): undecodable 6" in message
    assert message.count("m-000000.tar/junk") == 5  # at most five examples
    assert "max_bad_fraction=0.2" in message


def test_below_the_threshold_or_before_the_minimum_the_job_goes_on(ray_local, tars):
    records = [tars.good_record(f"{i:04d}", label=0, seed=i) for i in range(20)]
    records[3]["jpg"] = b"junk"
    tars.write("few/f-000000.tar", records)
    spec = str(tars.folder / "few" / "f-000000.tar")
    under = DataConfig(img_size=16, max_bad_fraction=0.1, min_samples_for_bad_check=1)  # 5% bad
    _, report, images = run(spec, under)
    assert (images, report.num_bad, report.seen) == (19, 1, 20)
    early = DataConfig(img_size=16, max_bad_fraction=0.01, min_samples_for_bad_check=1000)  # too few to judge
    _, report, images = run(spec, early)
    assert (images, report.num_bad) == (19, 1)
    assert os.path.basename(spec) in report.examples[0]
