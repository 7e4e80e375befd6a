"""The training and eval input path in one process, without Ray: the same tar reader, the same
`transforms.decode_batch` (or `prepare_batch`, for data.decode_device=gpu), the same per-epoch shard order
and bad-sample counting as the Ray Data tasks (datasets.py), for `LocalContext` (pipeline/train/context.py)
and so for tests and debugging.

It reads the shards one after the other and decodes one block of `data.decode_batch_size` rows at a time;
`iter_batches` and `iter_torch_batches` have the arguments of Ray Data's that the trainer uses.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from pipeline.config import DataConfig
from pipeline.data.epochs import shard_order
from pipeline.data.shard_set import ShardSet
from pipeline.data.tar_reader import iter_tar_samples


class LocalImageStream:
    """One rank's rows of `shards`: each `iter_torch_batches` call is one execution (one epoch). A shuffled
    train stream reads its shards in the permutation of epoch `first_epoch + execution`, as Ray Data's reader
    does; `orders` records each execution's shard order."""

    def __init__(self, shards: ShardSet, cfg: DataConfig, *, train: bool, num_classes: int | None, ledger=None,
                 shuffle_files: bool | None = None, first_epoch: int = 0, skip: dict[str, np.ndarray] | None = None):
        self.shards = shards
        self.cfg = cfg
        self.train = train
        self.num_classes = num_classes
        self.ledger = ledger
        self.shuffle = train if shuffle_files is None else shuffle_files
        self.first_epoch = first_epoch
        self.skip = skip or {}
        self.orders: list[list[str]] = []

    def _blocks(self) -> Iterator[dict[str, np.ndarray]]:
        from pipeline.data.transforms import decode_batch, prepare_batch

        stage = prepare_batch if self.cfg.decode_device == "gpu" else decode_batch

        fs, paths = self.shards.filesystem()
        order = list(range(len(paths)))
        if self.shuffle:
            order = shard_order(order, self.cfg.shuffle_seed, self.first_epoch + len(self.orders))
        self.orders.append([self.shards.uris[i] for i in order])
        shard_ids = {path: i for i, path in enumerate(paths)}
        skip = {path: self.skip[uri] for uri, path in zip(self.shards.uris, paths, strict=True) if uri in self.skip}
        decode = {"cfg": self.cfg, "train": self.train, "num_classes": self.num_classes, "ledger": self.ledger,
                  "shard_ids": shard_ids, "skip": skip or None}
        for i in order:
            with fs.open_input_stream(paths[i]) as f:
                rows: list[dict] = []
                for row in iter_tar_samples(f, paths[i]):
                    rows.append(row)
                    if len(rows) == self.cfg.decode_batch_size:
                        yield stage(_columns(rows), **decode)
                        rows = []
                if rows:
                    yield stage(_columns(rows), **decode)

    def iter_batches(self, *, batch_size: int, batch_format: str = "numpy", drop_last: bool = False,
                     local_shuffle_buffer_size: int | None = None,
                     prefetch_batches: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Batches of `batch_size` rows as numpy arrays; with a shuffle buffer, each batch is drawn at random
        from the buffered rows (seeded per execution). `prefetch_batches` is accepted and unused: one process."""
        if batch_format != "numpy":
            raise ValueError(f"a local stream gives numpy batches, not {batch_format!r}")
        rng = np.random.default_rng(self.cfg.shuffle_seed + self.first_epoch + len(self.orders))
        keep = max(local_shuffle_buffer_size or 0, batch_size)
        buffered: dict[str, list[np.ndarray]] = {}
        held = 0
        for block in self._blocks():
            for name, column in block.items():
                buffered.setdefault(name, []).append(column)
            held += len(block["label"])
            while held >= keep + (batch_size if local_shuffle_buffer_size else 0):
                rows = _merge(buffered)
                take = rng.choice(held, batch_size, replace=False) if local_shuffle_buffer_size else \
                    np.arange(batch_size)
                rest = np.setdiff1d(np.arange(held), take)
                yield {name: column[take] for name, column in rows.items()}
                buffered = {name: [column[rest]] for name, column in rows.items()}
                held -= batch_size
        rows = _merge(buffered)
        rest = rng.permutation(held) if local_shuffle_buffer_size else np.arange(held)
        for start in range(0, held, batch_size):
            take = rest[start:start + batch_size]
            if len(take) < batch_size and drop_last:
                break
            yield {name: column[take] for name, column in rows.items()}

    def iter_torch_batches(self, *, batch_size: int, drop_last: bool = False,
                           local_shuffle_buffer_size: int | None = None, prefetch_batches: int = 0,
                           device: str | torch.device = "auto") -> Iterator[dict[str, torch.Tensor]]:
        """`iter_batches` as tensors, on `device` unless it is "auto"."""
        for rows in self.iter_batches(batch_size=batch_size, drop_last=drop_last,
                                      local_shuffle_buffer_size=local_shuffle_buffer_size):
            batch = {name: torch.from_numpy(np.ascontiguousarray(column)) for name, column in rows.items()}
            yield batch if device == "auto" else {name: value.to(device) for name, value in batch.items()}


def _columns(rows: list[dict]) -> dict[str, list]:
    return {name: [row[name] for row in rows] for name in rows[0]}


def _merge(buffered: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate(parts) for name, parts in buffered.items()}
