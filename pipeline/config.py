"""Typed configuration for the pipeline's parts.

Each part receives only its own config object. Configs are plain dataclasses so that they serialise into
`train_loop_config`, YAML and MLflow params unchanged; `validate()` raises `ValueError` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    """Where the shards are and how images are decoded, augmented and fed to the trainer.

    Shard specs (`train`, `val`) accept a list of paths, a glob (`/data/train-*.tar`) or a brace pattern
    (`s3://bucket/in1k/train-{000000..001023}.tar`), local or any pyarrow filesystem URI.
    """

    train: str | list[str] = ""  # training shards; empty means none
    val: str | list[str] = ""  # evaluation shards; empty means none
    img_size: int = 224  # output side in pixels, square
    crop_pct: float = 0.875  # eval: resize shorter side to img_size / crop_pct, then centre crop img_size
    rrc_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area fraction range
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratio range
    hflip: float = 0.5  # probability of a horizontal flip (train)
    randaugment_num_ops: int = 0  # RandAugment ops per image (train); 0 turns RandAugment off
    randaugment_magnitude: int = 9  # RandAugment magnitude, 0..30
    label_key: str = ""  # empty: label from the `.cls` member; otherwise this key of the `.json` member
    num_classes: int = 0  # labels must be in [0, num_classes); 0 takes the count from the shard manifest
    max_image_pixels: int = 89_478_485  # width*height above this is skipped as a decompression bomb
    max_bad_fraction: float = 0.01  # stop the job when bad / seen samples exceeds this ...
    min_samples_for_bad_check: int = 1000  # ... once this many samples have been seen
    decode_batch_size: int = 64  # rows per read block and per decode call
    decode_concurrency: int = 0  # max concurrent decode tasks; 0 lets Ray Data decide
    decode_num_cpus: float = 1.0  # CPUs reserved by each decode task
    shuffle_seed: int = 0  # epoch e reads the shard files in a permutation seeded with shuffle_seed + e
    local_shuffle_buffer: int = 1024  # rows in each worker's local shuffle buffer (train); 0 turns it off
    prefetch_batches: int = 2  # batches each worker prefetches

    def validate(self) -> DataConfig:
        """Raise ValueError naming the first field that is out of range; return self for chaining."""
        checks = [
            (self.img_size > 0, "img_size must be > 0"),
            (0.0 < self.crop_pct <= 1.0, "crop_pct must be in (0, 1]"),
            (_is_range(self.rrc_scale) and 0.0 < self.rrc_scale[0] and self.rrc_scale[1] <= 1.0,
             "rrc_scale must be (low, high) with 0 < low <= high <= 1"),
            (_is_range(self.rrc_ratio) and self.rrc_ratio[0] > 0.0,
             "rrc_ratio must be (low, high) with 0 < low <= high"),
            (0.0 <= self.hflip <= 1.0, "hflip must be a probability in [0, 1]"),
            (self.randaugment_num_ops >= 0, "randaugment_num_ops must be >= 0"),
            (0 <= self.randaugment_magnitude <= 30, "randaugment_magnitude must be in [0, 30]"),
            (self.num_classes >= 0, "num_classes must be >= 0 (0 reads it from the manifest)"),
            (self.max_image_pixels > 0, "max_image_pixels must be > 0"),
            (0.0 <= self.max_bad_fraction <= 1.0, "max_bad_fraction must be in [0, 1]"),
            (self.min_samples_for_bad_check >= 1, "min_samples_for_bad_check must be >= 1"),
            (self.decode_batch_size >= 1, "decode_batch_size must be >= 1"),
            (self.decode_concurrency >= 0, "decode_concurrency must be >= 0 (0 lets Ray Data decide)"),
            (self.decode_num_cpus > 0, "decode_num_cpus must be > 0"),
            (self.local_shuffle_buffer >= 0, "local_shuffle_buffer must be >= 0"),
            (self.prefetch_batches >= 0, "prefetch_batches must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"data.{message}")
        return self


def _is_range(pair) -> bool:
    return len(pair) == 2 and pair[0] <= pair[1]
