"""data.decode_device=gpu on a worker without a GPU: the tasks' prepared rows, decoded by the worker with
TorchCodec's CPU decoder and resized in torch, give the CPU-task path's pixels within rounding, and the images
that fail on the worker are counted as the tasks count theirs."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data.bad_samples import UNDECODABLE, LocalLedger
from pipeline.data.decode import resize_crop as cpu_resize_crop
from pipeline.data.device_decode import DeviceDecoder, resize_crop
from pipeline.data.transforms import DECODED_PIXELS, ENCODED_JPEG, decode_batch, prepare_batch

URL = "/shards/train-000000.tar"


def batch_of(images: list[bytes]) -> dict[str, np.ndarray]:
    """Raw rows as the tar reader hands them to map_batches (numpy batch format)."""
    n = len(images)
    column = lambda values: np.array(values, dtype=object)  # noqa: E731
    return {"__key__": column([f"{i:04d}" for i in range(n)]), "__url__": column([URL] * n),
            "__index__": np.arange(n), "image": column(images), "image_ext": column(["jpg"] * n),
            "cls": column([str(i % 3).encode() for i in range(n)]), "json": column([None] * n),
            "read_error": column([None] * n)}


def saved(image: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kw)
    return out.getvalue()


@pytest.fixture
def mixed(tars) -> list[bytes]:
    """JPEGs of several sizes and shapes (boxes under twice the output: no DCT scaling on the CPU path), a
    grayscale JPEG, and formats the device does not decode: PNG, RGBA PNG, CMYK JPEG."""
    jpegs = [tars.image_bytes(w, h, seed=i, quality=90) for i, (w, h) in
             enumerate([(120, 90), (90, 120), (64, 64), (150, 40), (33, 47), (100, 75)])]
    rgb = Image.open(io.BytesIO(tars.image_bytes(80, 60, seed=9)))
    return jpegs + [saved(rgb.convert("L"), "JPEG", quality=95), saved(rgb, "PNG"),
                    saved(rgb.convert("RGBA"), "PNG"), saved(rgb.convert("CMYK"), "JPEG", quality=95)]


@pytest.mark.parametrize("train", [True, False])
def test_the_worker_decode_gives_the_task_decodes_pixels_within_rounding(mixed, train):
    cfg = DataConfig(img_size=48, decode_device="gpu")
    batch = batch_of(mixed)
    on_cpu = decode_batch(batch, cfg=cfg, train=train, num_classes=3, seed=11, shard_ids={URL: 0})
    prepared = prepare_batch(batch, cfg=cfg, train=train, num_classes=3, seed=11, shard_ids={URL: 0})
    assert prepared["kind"].tolist() == [ENCODED_JPEG] * 7 + [DECODED_PIXELS] * 3
    assert sum(len(d) for d in prepared["data"][:6]) == sum(len(d) for d in mixed[:6])  # the bytes, untouched
    if train:
        assert 0 < prepared["flip"].sum() < len(mixed)  # both kinds of draw happened
    on_worker = DeviceDecoder(cfg, train=train, device=torch.device("cpu"))(prepared)
    assert on_worker["label"].tolist() == on_cpu["label"].tolist()
    assert on_worker["index"].tolist() == list(range(len(mixed)))
    diff = np.abs(on_worker["image"].numpy().astype(int) - on_cpu["image"].astype(int))
    assert on_worker["image"].dtype == torch.uint8 and on_worker["image"].shape == (10, 3, 48, 48)
    assert diff.max() <= 2 and diff.mean() < 0.1, (diff.max(), diff.mean())
    assert diff[7:].max() == 0  # decoded by the task: the very same pixels


@pytest.mark.parametrize(("height", "width"), [(300, 330), (224, 500), (90, 120), (1000, 700), (48, 48)])
def test_the_torch_resize_is_the_opencv_resize_within_rounding(height, width):
    crop = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    ours = resize_crop(torch.from_numpy(crop).permute(2, 0, 1), 48).permute(1, 2, 0).numpy()
    diff = np.abs(ours.astype(int) - cpu_resize_crop(crop, 48).astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.3, (diff.max(), diff.mean())


def test_jpegs_that_fail_on_the_worker_are_dropped_and_counted_by_shard_and_position(tars):
    good = [tars.image_bytes(64, 48, seed=i) for i in range(5)]
    truncated = good[1][: len(good[1]) * 2 // 3]  # the header reads; the scan stops short
    cfg = DataConfig(img_size=32, decode_device="gpu")
    ledger = LocalLedger(1.0, 1)
    prepared = prepare_batch(batch_of([good[0], truncated, good[2], b"not a jpeg", good[4]]), cfg=cfg, train=True,
                             num_classes=3, ledger=ledger, seed=0, shard_ids={URL: 4})
    assert prepared["index"].tolist() == [0, 1, 2, 4]  # the garbage fails at its header, in the task
    out = DeviceDecoder(cfg, train=True, device=torch.device("cpu"), ledger=ledger, shard_uris=["x"] * 4 + [URL])(
        prepared)
    assert out["index"].tolist() == [0, 2, 4] and out["label"].tolist() == [0, 2, 1]
    snapshot = ledger.snapshot()
    assert snapshot.totals.seen == 5 and snapshot.totals.num_bad == snapshot.totals.bad[UNDECODABLE] == 2
    assert sorted(snapshot.pass_bad) == [(4, 1), (4, 3)]
    assert any(e.startswith("train-000000.tar#1 (undecodable: ") and "truncated" in e for e in snapshot.totals.examples)
