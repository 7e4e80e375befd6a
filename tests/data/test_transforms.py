"""Train and eval transforms: shapes, dtypes, determinism, and agreement with torchvision's own ops."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from pipeline.config import DataConfig
from pipeline.data.transforms import ImageTransform, center_box, decode_batch


def batch_of(records: list[dict]) -> dict[str, np.ndarray]:
    """Raw rows as the tar reader hands them to map_batches (numpy batch format)."""
    columns = ("__key__", "__url__", "__index__", "image", "image_ext", "cls", "json", "read_error")
    rows = [{"__key__": r["__key__"], "__url__": "/shards/train-000000.tar", "__index__": i, "image": r.get("jpg"),
             "image_ext": "jpg", "cls": r.get("cls"), "json": None, "read_error": None} for i, r in enumerate(records)]
    return {c: np.array([row[c] for row in rows], dtype=object) for c in columns}


@pytest.fixture
def batch(tars):
    return batch_of([tars.good_record(f"{i:04d}", label=i % 3, seed=i, size=(120, 90)) for i in range(6)])


def test_train_and_eval_give_uint8_nchw_and_int64_labels(batch):
    cfg = DataConfig(img_size=48)
    for train in (True, False):
        out = decode_batch(batch, cfg=cfg, train=train, num_classes=3, seed=0)
        assert out["image"].shape == (6, 3, 48, 48) and out["image"].dtype == np.uint8
        assert out["label"].dtype == np.int64 and out["label"].tolist() == [0, 1, 2, 0, 1, 2]


def test_eval_is_deterministic_and_matches_resize_then_center_crop(batch):
    cfg = DataConfig(img_size=64, crop_pct=0.875)
    first = decode_batch(batch, cfg=cfg, train=False, num_classes=3)
    second = decode_batch(batch, cfg=cfg, train=False, num_classes=3, seed=123)
    assert np.array_equal(first["image"], second["image"])
    reference = v2.Compose([v2.Resize(round(64 / 0.875), antialias=True), v2.CenterCrop(64)])
    expected = reference(torch.from_numpy(np.array(Image.open(io.BytesIO(batch["image"][0])))).permute(2, 0, 1))
    assert np.abs(first["image"][0].astype(int) - expected.numpy().astype(int)).mean() < 4.0


def test_center_box_is_the_centred_square_of_crop_pct_of_the_shorter_side():
    assert center_box(500, 375, 0.875) == (23, 86, 328, 328)
    assert center_box(100, 100, 1.0) == (0, 0, 100, 100)


def test_train_with_a_fixed_seed_is_deterministic(batch):
    cfg = DataConfig(img_size=48, randaugment_num_ops=2)
    a = decode_batch(batch, cfg=cfg, train=True, num_classes=3, seed=7)
    b = decode_batch(batch, cfg=cfg, train=True, num_classes=3, seed=7)
    c = decode_batch(batch, cfg=cfg, train=True, num_classes=3, seed=8)
    assert np.array_equal(a["image"], b["image"])
    assert not np.array_equal(a["image"], c["image"])


def test_unseeded_train_batches_differ_between_calls(batch):
    cfg = DataConfig(img_size=48)
    a = decode_batch(batch, cfg=cfg, train=True, num_classes=3)
    b = decode_batch(batch, cfg=cfg, train=True, num_classes=3)
    assert not np.array_equal(a["image"], b["image"])


def test_flip_mirrors_the_same_crop(tars):
    data = tars.image_bytes(120, 90, seed=3)
    crops = {}
    for p in (0.0, 1.0):
        transform = ImageTransform(DataConfig(img_size=40, hflip=p), train=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(5)
            crops[p] = transform(data)
    assert torch.equal(crops[1.0], crops[0.0].flip(-1))


def test_crop_box_respects_rrc_scale(tars):
    transform = ImageTransform(DataConfig(img_size=32, rrc_scale=(0.25, 0.25), rrc_ratio=(1.0, 1.0)), train=True)
    image = Image.open(io.BytesIO(tars.image_bytes(200, 100)))
    top, left, height, width = transform.box(image)
    assert (height, width) == (71, 71)  # sqrt(0.25 * 200 * 100) rounded
    assert 0 <= top <= 100 - 71 and 0 <= left <= 200 - 71


def test_rows_carry_their_shard_and_position_and_a_resume_skips_what_was_accounted_for(batch):
    from pipeline.data.bad_samples import LocalLedger

    batch["image"][4] = b"not a jpeg"
    ledger = LocalLedger(1.0, 1)
    url = batch["__url__"][0]
    out = decode_batch(batch, cfg=DataConfig(img_size=16), train=True, num_classes=3, ledger=ledger,
                       shard_ids={url: 7}, skip={url: np.array([True, False, True, False, False])})
    # rows 0 and 2 skipped unseen; row 4 bad, known by its shard and position; row 5 is past the bitmap
    assert out["index"].tolist() == [1, 3, 5] and out["shard"].tolist() == [7, 7, 7]
    assert out["label"].tolist() == [1, 0, 2]
    snapshot = ledger.snapshot()
    assert (snapshot.totals.seen, snapshot.totals.num_bad, snapshot.pass_bad) == (4, 1, [(7, 4)])
