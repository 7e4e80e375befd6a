"""Dataset builders: shard spec + DataConfig -> a Ray Dataset of uint8 images and int64 labels.

    shards ─ WebDatasetShards (raw bytes; per-epoch seeded shard order) ─ map_batches(decode_batch) ─► rows
                                                                          CPU tasks, anywhere in the cluster, or
                                                                          only on nodes with data.decode_resources

The result also carries what a driver needs to start training: the sample count from the manifest (for
`steps_per_epoch`), the class names, and the bad-sample policy whose ledger name the Train workers use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ray

from pipeline import storage
from pipeline.config import DataConfig
from pipeline.data.bad_samples import BadSamplePolicy, BadSampleReport, build_ledger, read_ledger
from pipeline.data.manifest import find_manifest, steps_per_epoch
from pipeline.data.shard_specs import expand_shards
from pipeline.data.tar_reader import read_shards

log = logging.getLogger(__name__)

LIMITS_REFRESH_S = 0.1


def start_epochs_at_full_width() -> None:
    """Let every execution of a dataset (every epoch) start as many decode tasks as the cluster holds at once.

    Ray Data 2.60 learns an execution's resource limits from its autoscaling coordinator actor, with a
    non-blocking poll that it repeats once a second. The first poll of each execution has no reply yet, so for
    its first second the executor runs a single task, however many CPUs there are. Polling every 0.1 s ends
    that after 0.1 s: +4-7 % images/s on the data benchmark's 4,000 images (docs/benchmarks.md, "Data
    loading"). Ray offers no setting for it, so this lowers the interval on Ray Data's resource manager class. It runs
    where datasets execute: on import of this module, which the driver and Ray Data's split coordinators (they
    unpickle `decode_batch`) both do. On a Ray without that class or attribute it does nothing.
    """
    try:
        from ray.data._internal.execution.resource_manager import ResourceManager
    except ImportError:  # pragma: no cover - depends on the Ray release
        return
    if getattr(ResourceManager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S", 0) > LIMITS_REFRESH_S:
        ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S = LIMITS_REFRESH_S


start_epochs_at_full_width()


@dataclass
class ImageDataset:
    dataset: ray.data.Dataset  # columns: image uint8 (3, S, S), label int64
    shard_paths: list[str]  # locations: URIs with their scheme, or absolute local paths
    num_samples: int | None  # samples in the shards per the manifest; None without a manifest
    classes: list[str]
    num_classes: int
    policy: BadSamplePolicy

    @property
    def ledger_name(self) -> str:
        return self.policy.ledger_name

    def bad_samples(self) -> BadSampleReport:
        return read_ledger(self.policy.ledger_name)

    def steps_per_epoch(self, world_size: int, batch_size: int) -> int:
        if self.num_samples is None:
            raise ValueError(f"no manifest beside {self.shard_paths[0]}, so the epoch size is unknown; write one "
                             "with `python jobs/make_shards.py --source shards:PATTERN`")
        return steps_per_epoch(self.num_samples, world_size, batch_size)


def decode_batch(batch: dict, **kwargs) -> dict:
    """The `map_batches` function: `transforms.decode_batch`, imported only where a batch is decoded. The
    driver and Ray Data's coordinator actors unpickle this function too, and would otherwise pay for
    importing torch and torchvision (about 6 s of CPU each) without decoding anything."""
    from pipeline.data import transforms

    return transforms.decode_batch(batch, **kwargs)


def build_image_dataset(spec: str | list[str], cfg: DataConfig, *, train: bool, first_epoch: int = 0,
                        shuffle_files: bool | None = None, num_classes: int | None = None,
                        policy: BadSamplePolicy | None = None) -> ImageDataset:
    """Train datasets shuffle shard files per epoch (seed cfg.shuffle_seed + epoch) and augment; eval
    datasets read the shards in listing order with the deterministic centre crop.

    `shuffle_files=False` reads a train dataset's shards in the given order (the trainer plans each epoch's
    order itself); `num_classes` and `policy` replace the manifest's class count and a new ledger. Rows carry
    `shard`, the index of their shard in `shard_paths`. The filesystem is resolved here, from the locations,
    in whichever process builds the dataset.
    """
    cfg.validate()
    uris = expand_shards(spec)
    fs, paths = storage.resolve_many(uris)
    manifest = find_manifest(uris)
    num_samples = manifest.samples_in(uris) if manifest is not None else None
    classes = manifest.classes if manifest is not None else []
    num_classes = num_classes or cfg.num_classes or len(classes)
    if manifest is None:
        log.warning("no manifest beside %s: epoch size unknown, labels only checked to be >= 0 unless "
                    "data.num_classes is set", uris[0])
    policy = policy or build_ledger(cfg.max_bad_fraction, cfg.min_samples_for_bad_check)
    shuffle = train if shuffle_files is None else shuffle_files
    # Ray fuses the read and the decode into one task per shard only if the read's blocks are not split
    # further (one read task per shard) and the decode takes whole blocks (batch_size=None; the reader's
    # blocks already hold decode_batch_size rows). Fused, raw bytes never enter the object store, and no CPU
    # is held by a separate reader operator: on 2 CPUs, 279 -> 480 images/s (docs/benchmarks.md).
    # Read tasks see pyarrow paths (rows' __url__), so the shard index is keyed by those.
    raw = read_shards(paths, fs, seed=cfg.shuffle_seed if shuffle else None, first_epoch=first_epoch,
                      rows_per_block=cfg.decode_batch_size, override_num_blocks=len(paths),
                      # equal resource requests and concurrency caps are conditions of fusion too
                      num_cpus=cfg.decode_num_cpus, resources=cfg.decode_resources or None,
                      concurrency=cfg.decode_concurrency or None)
    dataset = raw.map_batches(
        decode_batch,
        fn_kwargs={"cfg": cfg, "train": train, "num_classes": num_classes, "policy": policy,
                   "shard_ids": {path: i for i, path in enumerate(paths)}},
        batch_size=None,
        batch_format="numpy",
        num_cpus=cfg.decode_num_cpus,
        resources=cfg.decode_resources or None,  # data.decode_resources: only nodes that carry them decode
        concurrency=cfg.decode_concurrency or None,
    )
    log.info("%s data: %d shards, %s samples, %d classes", "train" if train else "eval", len(paths),
             num_samples if num_samples is not None else "unknown", num_classes)
    return ImageDataset(dataset=dataset, shard_paths=uris, num_samples=num_samples, classes=classes,
                        num_classes=num_classes, policy=policy)


def build_train_dataset(cfg: DataConfig, *, first_epoch: int = 0) -> ImageDataset:
    if not cfg.train:
        raise ValueError("data.train is empty: give the training shards (list, glob or brace pattern)")
    return build_image_dataset(cfg.train, cfg, train=True, first_epoch=first_epoch)


def build_eval_dataset(cfg: DataConfig) -> ImageDataset:
    if not cfg.val:
        raise ValueError("data.val is empty: give the evaluation shards (list, glob or brace pattern)")
    return build_image_dataset(cfg.val, cfg, train=False)
