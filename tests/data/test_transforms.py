"""Train and eval transforms: shapes, dtypes, determinism, and agreement with torchvision's own ops."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from pipeline.config import DataConfig
from pipeline.data.transforms import ImageTransform, center_box, decode_batch, random_resized_crop_box


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
        crops[p] = transform(data, np.random.default_rng(5))
    assert np.array_equal(crops[1.0], crops[0.0][:, ::-1])


def test_crop_box_respects_rrc_scale(tars):
    transform = ImageTransform(DataConfig(img_size=32, rrc_scale=(0.25, 0.25), rrc_ratio=(1.0, 1.0)), train=True)
    image = Image.open(io.BytesIO(tars.image_bytes(200, 100)))
    (top, left, height, width), flip = transform.plan(image, np.random.default_rng(0))
    assert (height, width) == (71, 71)  # sqrt(0.25 * 200 * 100) rounded
    assert 0 <= top <= 100 - 71 and 0 <= left <= 200 - 71


def test_crop_boxes_follow_torchvisions_random_resized_crop():
    """The numpy port draws from the same distribution as torchvision's, and falls back the same way."""
    rng = np.random.default_rng(0)
    boxes = np.array([random_resized_crop_box(500, 375, (0.08, 1.0), (3 / 4, 4 / 3), rng) for _ in range(4000)])
    theirs = np.array([list(v2.RandomResizedCrop.get_params(torch.empty(3, 375, 500), [0.08, 1.0], [3 / 4, 4 / 3]))
                       for _ in range(4000)])
    columns = {"area": lambda b: b[:, 2] * b[:, 3] / (500 * 375), "ratio": lambda b: b[:, 3] / b[:, 2],
               "top": lambda b: b[:, 0] / (375 - b[:, 2] + 1), "left": lambda b: b[:, 1] / (500 - b[:, 3] + 1)}
    for name, column in columns.items():
        ours_q, theirs_q = np.quantile(column(boxes), [0.1, 0.5, 0.9]), np.quantile(column(theirs), [0.1, 0.5, 0.9])
        assert np.allclose(ours_q, theirs_q, rtol=0.08, atol=0.02), (name, ours_q, theirs_q)
    assert ((boxes[:, 0] >= 0) & (boxes[:, 0] + boxes[:, 2] <= 375) & (boxes[:, 1] + boxes[:, 3] <= 500)).all()
    # no draw fits a 1000 x 10 strip at a square ratio: both take the centred square of its height
    fallback = random_resized_crop_box(1000, 10, (0.9, 1.0), (1.0, 1.0), rng)
    assert fallback == tuple(v2.RandomResizedCrop.get_params(torch.empty(3, 10, 1000), [0.9, 1.0], [1.0, 1.0]))
    assert fallback == (0, 495, 10, 10)


def test_decode_stage_imports_no_torch_unless_randaugment_needs_it(tars):
    """A decode worker's imports: numpy, Pillow, simplejpeg and OpenCV, not torch (about 470 MiB a worker)."""
    import subprocess
    import sys

    data = tars.image_bytes(120, 90)
    code = (f"import sys, numpy as np; from pipeline.config import DataConfig; import pipeline.data.datasets; "
            f"from pipeline.data.transforms import decode_batch; "
            f"batch = {{'__key__': np.array(['a'], dtype=object), '__url__': np.array(['x.tar'], dtype=object), "
            f"'__index__': np.array([0]), 'image': np.array([{data!r}], dtype=object), "
            f"'cls': np.array([b'1'], dtype=object), 'json': np.array([None], dtype=object), "
            f"'read_error': np.array([None], dtype=object)}}; "
            f"out = decode_batch(batch, cfg=DataConfig(img_size=32, randaugment_num_ops=int(sys.argv[1])), "
            f"train=True, num_classes=3); print(out['image'].shape, 'torch' in sys.modules)")
    for ops, imported in ((0, False), (2, True)):
        printed = subprocess.run([sys.executable, "-c", code, str(ops)], capture_output=True, text=True, check=True)
        assert printed.stdout.split() == ["(1,", "3,", "32,", "32)", str(imported)], printed.stdout + printed.stderr


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
