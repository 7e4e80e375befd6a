"""Train and eval transforms, and the `map_batches` functions that turn a batch of raw rows into training rows.

Train: RandomResizedCrop (scale and ratio from the config; the box is drawn from the header size, before any
pixel is decoded, by torchvision's algorithm in numpy), horizontal flip, and optionally torchvision v2
`RandAugment` on the uint8 crop (the only transform that imports torch in a decode worker).
Eval: resize the shorter side to img_size / crop_pct, then centre crop img_size. Both are one crop box in
source pixels (a centred square of side crop_pct * shorter side) resized to img_size, which matches
`Resize(img_size / crop_pct)` + `CenterCrop(img_size)` up to sub-pixel rounding.

Two stages, by `data.decode_device`:
- `decode_batch` ("cpu"): the task decodes, crops, resizes and flips. The output is uint8 (N, 3, H, W) images
  and int64 labels: four times fewer bytes through the object store than float32; normalisation happens on
  the training device.
- `prepare_batch` ("gpu"): the task only reads each image's header and draws its crop box and flip; the
  Train worker decodes the JPEG bytes on its GPU (device_decode.py). Images nvJPEG does not take (PNG, WebP,
  CMYK) are decoded here and travel as pixels.
Both draw a row's box, then its flip, from one numpy generator per batch, so that with the same seed they
choose the same crops.
"""

from __future__ import annotations

import math
import os
import posixpath
from collections import Counter
from collections.abc import Callable

import numpy as np
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data.bad_samples import MAX_EXAMPLES, NO_IMAGE, TRUNCATED_TAR, BadSample
from pipeline.data.decode import Box, decode_resized_crop, is_plain_jpeg, open_image, parse_label

# `kind` of a prepared row: JPEG bytes for the device to decode, or the decoded crop's (S, S, 3) pixels
ENCODED_JPEG, DECODED_PIXELS = 0, 1


class ImageTransform:
    """Bytes -> (img_size, img_size, 3) uint8 crop, train or eval; random draws come from `rng`."""

    def __init__(self, cfg: DataConfig, train: bool):
        self.train = train
        self.img_size = cfg.img_size
        self.crop_pct = cfg.crop_pct
        self.hflip = cfg.hflip
        self.scale = tuple(cfg.rrc_scale)
        self.ratio = tuple(cfg.rrc_ratio)
        self.max_image_pixels = cfg.max_image_pixels
        self.randaugment = RandAugment(cfg) if train and cfg.randaugment_num_ops > 0 else None

    def plan(self, image: Image.Image, rng: np.random.Generator) -> tuple[Box, bool]:
        """The crop box in source pixels and whether to flip it, from the header size only."""
        if not self.train:
            return center_box(image.width, image.height, self.crop_pct), False
        box = random_resized_crop_box(image.width, image.height, self.scale, self.ratio, rng)
        return box, self.hflip > 0 and rng.random() < self.hflip

    def __call__(self, data: bytes | None, rng: np.random.Generator) -> np.ndarray:
        image = open_image(data, self.max_image_pixels)
        box, flip = self.plan(image, rng)
        crop = decode_resized_crop(data, image, box, self.img_size)
        return crop[:, ::-1] if flip else crop


class RandAugment:
    """torchvision v2 `RandAugment` on an (H, W, 3) uint8 crop; imports torch when first built."""

    def __init__(self, cfg: DataConfig):
        from torchvision.transforms import v2

        self.op = v2.RandAugment(num_ops=cfg.randaugment_num_ops, magnitude=cfg.randaugment_magnitude)

    def __call__(self, crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        import torch

        chw = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)
        return self.on_tensor(chw, rng).permute(1, 2, 0).numpy()

    def on_tensor(self, chw, rng: np.random.Generator):
        """A (3, H, W) uint8 tensor, on any device. The ops draw from torch's generator: a fork of it, seeded
        from `rng`, so that the caller's torch random state (a training process's) is left as it was."""
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(2**63)))
            return self.op(chw)


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                            rng: np.random.Generator) -> Box:
    """torchvision's `RandomResizedCrop.get_params`: up to 10 draws of an area fraction in `scale` and a
    log-uniform aspect ratio in `ratio` that fit the image, else the whole image clamped to `ratio`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def center_box(width: int, height: int, crop_pct: float) -> Box:
    side = max(1, round(min(width, height) * crop_pct))
    return (height - side) // 2, (width - side) // 2, side, side


def decode_batch(batch: dict[str, np.ndarray], *, cfg: DataConfig, train: bool, num_classes: int | None, ledger=None,
                 seed: int | None = None, shard_ids: dict[str, int] | None = None,
                 skip: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Raw rows (tar_reader.ROW_SCHEMA) -> {"image": uint8 (N, 3, S, S), "label": int64 (N,)} of the good rows
    (labels in [0, num_classes); with `num_classes` None no label is read, and every row's is -1), plus "shard"
    int32 (N,), the index of each row's shard in `shard_ids`, and "index" int32 (N,), its position in the shard,
    when `shard_ids` is given.

    Bad rows are dropped and reported to `ledger` (bad_samples.py; it raises once too many are bad), with their
    (shard, index) when `shard_ids` is given. Rows that `skip` marks (shard path -> bitmap by position: samples a
    resumed epoch has accounted for already) are dropped unseen. `seed` fixes the augmentation draws of this
    batch; without it each call draws fresh entropy.
    """
    transform = ImageTransform(cfg, train)
    crops: list[np.ndarray] = []

    def decode(data: bytes, rng: np.random.Generator) -> None:
        crop = transform(data, rng)
        crops.append(transform.randaugment(crop, rng) if transform.randaugment is not None else crop)

    out = _good_rows(batch, decode, batch_rng(seed), cfg=cfg, num_classes=num_classes, ledger=ledger,
                     shard_ids=shard_ids, skip=skip)
    images = np.empty((len(crops), 3, cfg.img_size, cfg.img_size), dtype=np.uint8)
    for row, crop in zip(images, crops, strict=True):
        row[...] = crop.transpose(2, 0, 1)
    return {"image": images, **out}


def prepare_batch(batch: dict[str, np.ndarray], *, cfg: DataConfig, train: bool, num_classes: int | None, ledger=None,
                  seed: int | None = None, shard_ids: dict[str, int] | None = None,
                  skip: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Raw rows -> rows for the Train worker to decode (`data.decode_device=gpu`): "data" (the JPEG bytes, or
    the (S, S, 3) pixels of an image nvJPEG does not take), "kind" uint8 (ENCODED_JPEG or DECODED_PIXELS),
    "box" int32 (N, 4) top/left/height/width in source pixels, "flip" bool, "label" int64, and "shard"/"index"
    as `decode_batch` gives them. Bad rows found here (labels, headers, pixel limits, undecodable non-JPEGs)
    are reported to `ledger`; the worker reports the JPEGs that fail on the device."""
    transform = ImageTransform(cfg, train)
    datas, kinds, boxes, flips = [], [], [], []

    def prepare(data: bytes, rng: np.random.Generator) -> None:
        image = open_image(data, transform.max_image_pixels)
        box, flip = transform.plan(image, rng)
        if is_plain_jpeg(image):
            datas.append(data)
            kinds.append(ENCODED_JPEG)
        else:
            datas.append(decode_resized_crop(data, image, box, cfg.img_size).tobytes())
            kinds.append(DECODED_PIXELS)
            box = (0, 0, cfg.img_size, cfg.img_size)
        boxes.append(box)
        flips.append(flip)

    out = _good_rows(batch, prepare, batch_rng(seed), cfg=cfg, num_classes=num_classes, ledger=ledger,
                     shard_ids=shard_ids, skip=skip)
    payload = np.empty(len(datas), dtype=object)
    payload[:] = datas
    return {"data": payload, "kind": np.asarray(kinds, dtype=np.uint8),
            "box": np.asarray(boxes, dtype=np.int32).reshape(-1, 4), "flip": np.asarray(flips, dtype=bool), **out}


def batch_rng(seed: int | None) -> np.random.Generator:
    """The generator of one batch's draws: seeded, or from fresh entropy."""
    return np.random.default_rng(seed if seed is not None else int.from_bytes(os.urandom(8), "little"))


def _good_rows(batch: dict[str, np.ndarray], handle: Callable[[bytes, np.random.Generator], None],
               rng: np.random.Generator, *, cfg: DataConfig, num_classes: int | None, ledger,
               shard_ids: dict[str, int] | None, skip: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Calls `handle(image bytes, rng)` on each row that is not skipped and has a good label; a BadSample from
    either drops the row and is counted. Returns the good rows' "label" (and "shard", "index")."""
    keys, urls, positions = batch["__key__"], batch["__url__"], batch["__index__"]
    rows = range(len(keys))
    if skip:
        rows = [i for i in rows if not _skipped(skip.get(urls[i]), int(positions[i]))]
    labels: list[int] = []
    good_rows: list[int] = []  # batch row of each good sample, to look up its shard
    bad: Counter[str] = Counter()
    bad_ids: list[tuple[int, int]] = []
    examples: list[str] = []
    for i in rows:
        try:
            if batch["read_error"][i] is not None:
                raise BadSample(TRUNCATED_TAR, batch["read_error"][i])
            if batch["image"][i] is None:
                raise BadSample(NO_IMAGE, "the key has no image member")
            label = -1 if num_classes is None else parse_label(batch["cls"][i], batch["json"][i], cfg.label_key,
                                                               num_classes)
            handle(batch["image"][i], rng)
            labels.append(label)
            good_rows.append(i)
        except BadSample as e:
            bad[e.reason] += 1
            if shard_ids is not None:
                bad_ids.append((shard_ids[urls[i]], int(positions[i])))
            if len(examples) < MAX_EXAMPLES:
                examples.append(f"{posixpath.basename(urls[i])}/{keys[i]} ({e})")
    if ledger is not None:
        ledger.record(len(rows), dict(bad), examples, bad_ids)
    out = {"label": np.asarray(labels, dtype=np.int64)}
    if shard_ids is not None:
        out["shard"] = np.asarray([shard_ids[urls[i]] for i in good_rows], dtype=np.int32)
        out["index"] = np.asarray([positions[i] for i in good_rows], dtype=np.int32)
    return out


def _skipped(bits: np.ndarray | None, position: int) -> bool:
    return bits is not None and position < len(bits) and bool(bits[position])
