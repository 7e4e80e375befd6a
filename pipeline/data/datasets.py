"""The Ray Data side of reading: a `ShardSet` + DataConfig -> a Ray Dataset of uint8 images and int64 labels.

    ShardSet ─ WebDatasetShards (raw rows; per-epoch seeded shard order) ─ map_batches(decode_batch) ─► rows
                                                                          CPU tasks, anywhere in the cluster, or
                                                                          only on nodes with data.decode_resources

Why not `ray.data.read_webdataset` itself: it parses each tar with `tarfile` inside the read task, so a
truncated tar raises `tarfile.ReadError` and fails the task, and with it every good sample that task already
read (`DataContext.max_errored_blocks` drops them as well). `WebDatasetShards` is a small
`FileBasedDatasource` over our tar reader (tar_reader.py), which keeps every sample read before a break and
emits one marker row that the decode stage counts as a bad sample. Listing, pyarrow filesystems, file-level
shuffling and read-task sizing stay Ray's.

The same rows and the same `decode_batch` run without Ray in `local_stream.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
from ray.data.datasource import FileBasedDatasource, FileShuffleConfig

from pipeline.config import DataConfig
from pipeline.data.shard_set import ShardSet
from pipeline.data.tar_reader import ROWS_PER_BLOCK, iter_tar_samples, rows_to_block
from pipeline.internals import start_epochs_at_full_width

log = logging.getLogger(__name__)

start_epochs_at_full_width()


@dataclass
class EpochShardOrder(FileShuffleConfig):
    """Shard files of epoch e are read in the permutation seeded with `seed + first_epoch + e`
    (epochs.shard_order draws the same).

    Ray calls `get_seed` with the dataset's execution index, which advances once per completed epoch;
    `first_epoch` lets a resumed run continue the sequence instead of repeating epoch 0's order.
    """

    first_epoch: int = 0

    def get_seed(self, execution_idx: int = 0) -> int | None:
        if self.seed is None:
            return None
        return self.seed + self.first_epoch + execution_idx


class WebDatasetShards(FileBasedDatasource):
    """Webdataset tars -> blocks of `rows_per_block` rows of ROW_SCHEMA, never failing on a broken tar."""

    def __init__(self, paths, *, rows_per_block: int = ROWS_PER_BLOCK, **file_based_datasource_kwargs):
        super().__init__(paths, **file_based_datasource_kwargs)
        self.rows_per_block = rows_per_block

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        rows: list[dict] = []
        for row in iter_tar_samples(f, path):
            rows.append(row)
            if len(rows) >= self.rows_per_block:
                yield rows_to_block(rows)
                rows = []
        if rows:
            yield rows_to_block(rows)


def read_shards(paths: list[str], filesystem, *, seed: int | None, first_epoch: int = 0,
                rows_per_block: int = ROWS_PER_BLOCK, override_num_blocks: int | None = None,
                num_cpus: float | None = None, resources: dict[str, float] | None = None,
                concurrency: int | None = None) -> ray.data.Dataset:
    """A dataset of raw rows; with `seed`, each epoch reads the shard files in a new seeded order.
    `resources`: Ray custom resources each read task requests (to place it on data nodes)."""
    shuffle = EpochShardOrder(seed=seed, first_epoch=first_epoch) if seed is not None else None
    source = WebDatasetShards(paths, rows_per_block=rows_per_block, filesystem=filesystem, shuffle=shuffle,
                              file_extensions=["tar"])
    return ray.data.read_datasource(source, override_num_blocks=override_num_blocks, num_cpus=num_cpus,
                                    resources=resources, concurrency=concurrency)


def decode_batch(batch: dict, **kwargs) -> dict:
    """The `map_batches` function: `transforms.decode_batch`, or `transforms.prepare_batch` when the Train
    workers decode (data.decode_device=gpu), imported only where a batch is decoded. The driver and Ray Data's
    coordinator actors unpickle this function too, and need none of the decoders."""
    from pipeline.data import transforms

    return (transforms.prepare_batch if kwargs["cfg"].decode_device == "gpu" else transforms.decode_batch)(
        batch, **kwargs)


def build_image_dataset(shards: ShardSet, cfg: DataConfig, *, train: bool, num_classes: int | None, ledger=None,
                        shuffle_files: bool | None = None, first_epoch: int = 0,
                        skip: dict[str, np.ndarray] | None = None) -> ray.data.Dataset:
    """Columns `image` uint8 (3, S, S) (with data.decode_device=gpu, `transforms.prepare_batch`'s columns in
    its place, which device_decode.py decodes on the Train worker), `label` int64, `shard` int32, the index of
    the row's shard in `shards.uris`, and `index` int32, the row's position in its shard. `skip` (uri -> bitmap
    by position) names samples a resumed epoch has accounted for already, which are dropped before decoding.
    Train datasets read the shards in a seeded permutation per epoch (seed cfg.shuffle_seed + epoch) and
    augment; eval datasets read them in the set's order with the deterministic centre crop.
    `shuffle_files=False` reads a train dataset's shards in the set's order (the trainer plans a resumed
    epoch's order itself). Bad samples are reported to `ledger` (ledger.RayLedger). The filesystem is resolved
    here, from the locations, in whichever process builds the dataset."""
    fs, paths = shards.filesystem()
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
    log.debug("%s data: %d shards, %s samples, %d classes", "train" if train else "eval", len(paths),
              shards.num_samples, num_classes)
    return raw.map_batches(
        decode_batch,
        fn_kwargs={"cfg": cfg, "train": train, "num_classes": num_classes, "ledger": ledger,
                   "shard_ids": {path: i for i, path in enumerate(paths)},
                   "skip": {path: skip[uri] for uri, path in zip(shards.uris, paths, strict=True) if uri in skip}
                   if skip else None},
        batch_size=None,
        batch_format="numpy",
        num_cpus=cfg.decode_num_cpus,
        resources=cfg.decode_resources or None,  # data.decode_resources: only nodes that carry them decode
        concurrency=cfg.decode_concurrency or None,
    )
