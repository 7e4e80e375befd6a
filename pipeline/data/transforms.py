"""Train and eval transforms, and the `map_batches` function that decodes and augments a batch of raw rows.

Train: RandomResizedCrop (scale and ratio from the config; the box is drawn by torchvision v2's own
`RandomResizedCrop.make_params` from the header size, before any pixel is decoded), horizontal flip, and
optionally torchvision v2 `RandAugment` on the uint8 crop.
Eval: resize the shorter side to img_size / crop_pct, then centre crop img_size. Both are one crop box in
source pixels (a centred square of side crop_pct * shorter side) resized to img_size, which matches
`Resize(img_size / crop_pct)` + `CenterCrop(img_size)` up to sub-pixel rounding.

The output is uint8 (N, 3, H, W) images and int64 labels: four times fewer bytes through the object store than
float32; normalisation happens on the training device.
"""

from __future__ import annotations

import os
import posixpath
from collections import Counter

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from pipeline.config import DataConfig
from pipeline.data.bad_samples import MAX_EXAMPLES, NO_IMAGE, TRUNCATED_TAR, BadSample
from pipeline.data.decode import Box, decode_resized_crop, open_image, parse_label


class ImageTransform:
    """Bytes -> (3, img_size, img_size) uint8 tensor, train or eval; random draws come from torch's RNG."""

    def __init__(self, cfg: DataConfig, train: bool):
        self.train = train
        self.img_size = cfg.img_size
        self.crop_pct = cfg.crop_pct
        self.hflip = cfg.hflip
        self.max_image_pixels = cfg.max_image_pixels
        self.rrc = v2.RandomResizedCrop(cfg.img_size, scale=tuple(cfg.rrc_scale), ratio=tuple(cfg.rrc_ratio))
        self.randaugment = (v2.RandAugment(num_ops=cfg.randaugment_num_ops, magnitude=cfg.randaugment_magnitude)
                            if train and cfg.randaugment_num_ops > 0 else None)

    def box(self, image: Image.Image) -> Box:
        if self.train:
            p = self.rrc.make_params([image])  # reads image.size only
            return p["top"], p["left"], p["height"], p["width"]
        return center_box(image.width, image.height, self.crop_pct)

    def __call__(self, data: bytes | None) -> torch.Tensor:
        image = open_image(data, self.max_image_pixels)
        crop = decode_resized_crop(data, image, self.box(image), self.img_size)
        if self.train:
            if self.hflip > 0 and torch.rand(()) < self.hflip:
                crop = crop.flip(-1)
            if self.randaugment is not None:
                crop = self.randaugment(crop)
        return crop


def center_box(width: int, height: int, crop_pct: float) -> Box:
    side = max(1, round(min(width, height) * crop_pct))
    return (height - side) // 2, (width - side) // 2, side, side


def decode_batch(batch: dict[str, np.ndarray], *, cfg: DataConfig, train: bool, num_classes: int, ledger=None,
                 seed: int | None = None, shard_ids: dict[str, int] | None = None,
                 skip: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Raw rows (tar_reader.ROW_SCHEMA) -> {"image": uint8 (N, 3, S, S), "label": int64 (N,)} of the good rows,
    plus "shard" int32 (N,), the index of each row's shard in `shard_ids`, and "index" int32 (N,), its position
    in the shard, when `shard_ids` is given.

    Bad rows are dropped and reported to `ledger` (bad_samples.py; it raises once too many are bad), with their
    (shard, index) when `shard_ids` is given. Rows that `skip` marks (shard path -> bitmap by position: samples a
    resumed epoch has accounted for already) are dropped unseen. `seed` fixes the augmentation draws of this
    batch; without it each call draws fresh entropy.
    """
    transform = ImageTransform(cfg, train)
    keys, urls, positions = batch["__key__"], batch["__url__"], batch["__index__"]
    rows = range(len(keys))
    if skip:
        rows = [i for i in rows if not _skipped(skip.get(urls[i]), int(positions[i]))]
    # each crop is copied once, straight into its row: no per-image contiguous copy, no stack
    images = torch.empty((len(rows), 3, cfg.img_size, cfg.img_size), dtype=torch.uint8)
    labels: list[int] = []
    good_rows: list[int] = []  # batch row of each good sample, to look up its shard
    bad: Counter[str] = Counter()
    bad_ids: list[tuple[int, int]] = []
    examples: list[str] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        for i in rows:
            try:
                if batch["read_error"][i] is not None:
                    raise BadSample(TRUNCATED_TAR, batch["read_error"][i])
                if batch["image"][i] is None:
                    raise BadSample(NO_IMAGE, "the key has no image member")
                label = parse_label(batch["cls"][i], batch["json"][i], cfg.label_key, num_classes)
                images[len(labels)].copy_(transform(batch["image"][i]))
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
    out = {"image": images[:len(labels)].numpy(), "label": np.asarray(labels, dtype=np.int64)}
    if shard_ids is not None:
        out["shard"] = np.asarray([shard_ids[urls[i]] for i in good_rows], dtype=np.int32)
        out["index"] = np.asarray([positions[i] for i in good_rows], dtype=np.int32)
    return out


def _skipped(bits: np.ndarray | None, position: int) -> bool:
    return bits is not None and position < len(bits) and bool(bits[position])
