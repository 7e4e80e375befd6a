"""Per-worker batches for Ray Train: exactly `steps_per_epoch` batches per epoch on every rank.

A rank that runs one step fewer than the others hangs the job at the next collective, so the step count is
fixed up front from the manifest (`ImageDataset.steps_per_epoch`: samples // (world_size * batch_size)) and
this iterator holds every rank to it:
- Ray Train hands each worker a `streaming_split(world_size, equal=True)` shard, so all ranks receive the
  same number of rows whatever the shard sizes; `drop_last` then gives them the same number of full batches.
- Bad samples are dropped by the decode stage, so an epoch can come up a few batches short of the manifest's
  count (equally short on every rank, thanks to the equal split). The shortfall is filled by replaying the
  epoch's most recent batches (the same tensors again: do not modify batches in place), and counted in
  `padded_steps`.
- Batches beyond `steps_per_epoch` (a manifest that undercounts) are read and discarded rather than cut off,
  so the split always finishes its epoch and the next epoch starts from a clean execution.

Bad-sample counts come from the dataset's ledger (bad_samples.py) and are returned by `metrics()`.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterator

import torch

from pipeline.config import DataConfig
from pipeline.data.bad_samples import read_ledger

log = logging.getLogger(__name__)

REPLAY_BATCHES = 8  # recent batches kept to fill a short epoch


class WorkerBatches:
    """Wraps one worker's dataset shard (`ray.train.get_dataset_shard(name)`); call `epoch()` once per epoch."""

    def __init__(self, shard, *, batch_size: int, steps_per_epoch: int, cfg: DataConfig, train: bool = True,
                 ledger_name: str | None = None, device: str | torch.device = "auto"):
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch is {steps_per_epoch}: the dataset holds fewer samples than one "
                             f"batch of {batch_size} per worker")
        self.shard = shard
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.ledger_name = ledger_name
        self.device = device
        self.prefetch_batches = cfg.prefetch_batches
        # Ray requires the buffer to hold at least one batch.
        self.shuffle_buffer = max(cfg.local_shuffle_buffer, batch_size) if train and cfg.local_shuffle_buffer else None
        self.epochs_done = 0
        self.padded_steps = 0
        self.discarded_batches = 0

    def epoch(self) -> Iterator[dict[str, torch.Tensor]]:
        """Yields exactly steps_per_epoch batches of {"image": uint8 (B, 3, S, S), "label": int64 (B,)}."""
        recent: collections.deque = collections.deque(maxlen=REPLAY_BATCHES)
        yielded = 0
        batches = self.shard.iter_torch_batches(
            batch_size=self.batch_size, drop_last=True, local_shuffle_buffer_size=self.shuffle_buffer,
            prefetch_batches=self.prefetch_batches, device=self.device)
        for batch in batches:
            if yielded < self.steps_per_epoch:
                recent.append(batch)
                yielded += 1
                yield batch
            else:
                self.discarded_batches += 1
        if yielded < self.steps_per_epoch:
            if not recent:
                raise RuntimeError(f"epoch {self.epochs_done}: this worker received no full batch of "
                                   f"{self.batch_size}; are all samples bad? {self.bad_sample_summary()}")
            short = self.steps_per_epoch - yielded
            log.warning("epoch %d: %d of %d steps replay recent batches (bad samples were dropped); %s",
                        self.epochs_done, short, self.steps_per_epoch, self.bad_sample_summary())
            for i in range(short):
                self.padded_steps += 1
                yield recent[i % len(recent)]
        self.epochs_done += 1

    def bad_sample_summary(self) -> str:
        return read_ledger(self.ledger_name).describe() if self.ledger_name else "no ledger"

    def metrics(self, prefix: str = "data/") -> dict[str, float]:
        """Bad-sample counts of the whole dataset (all workers) plus this worker's padding, for reporting."""
        out = read_ledger(self.ledger_name).metrics(prefix) if self.ledger_name else {}
        out[f"{prefix}padded_steps"] = self.padded_steps
        out[f"{prefix}discarded_batches"] = self.discarded_batches
        return out
