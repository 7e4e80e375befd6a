"""Per-worker batches: exactly the epoch's step count of batches on every rank.

A rank that runs one step fewer than the others hangs the job at the next collective, so the step count is
fixed up front from the manifest (epochs.plan_epoch: samples // (world_size * batch_size)) and this iterator
holds every rank to it:
- Each worker reads a `streaming_split(world_size, equal=True)` stream, so all ranks receive the same number
  of rows whatever the shard sizes; `drop_last` then gives them the same number of full batches.
- Bad samples are dropped by the decode stage, so an epoch can come up a few batches short of the manifest's
  count (equally short on every rank, thanks to the equal split). The shortfall is filled by replaying the
  epoch's most recent batches (the same tensors again: do not modify batches in place), yielded as not
  fresh and counted in `padded_steps`.
- Batches beyond the step count (a manifest that undercounts) are read and discarded rather than cut off,
  so the split always finishes its epoch and the next epoch starts from a clean execution.

Bad-sample counts come from the dataset's ledger (bad_samples.py) and are returned by `metrics()`.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterator

import torch

from pipeline.config import DataConfig

log = logging.getLogger(__name__)

REPLAY_BATCHES = 8  # recent batches kept to fill a short epoch


class WorkerBatches:
    """Wraps one worker's stream (Ray Data's split, or a `LocalImageStream`); call `epoch(steps)` once per
    epoch."""

    def __init__(self, stream, *, batch_size: int, cfg: DataConfig, train: bool = True, ledger=None,
                 device: str | torch.device = "auto"):
        self.stream = stream
        self.batch_size = batch_size
        self.ledger = ledger
        self.device = device
        self.prefetch_batches = cfg.prefetch_batches
        # Ray requires the buffer to hold at least one batch.
        self.shuffle_buffer = max(cfg.local_shuffle_buffer, batch_size) if train and cfg.local_shuffle_buffer else None
        self.epochs_done = 0
        self.padded_steps = 0
        self.discarded_batches = 0

    def epoch(self, steps: int) -> Iterator[tuple[dict[str, torch.Tensor], bool]]:
        """Yields exactly `steps` (batch, fresh) pairs, batch = {"image": uint8 (B, 3, S, S), "label": int64
        (B,), "shard": int32 (B,)}; fresh is False for a replayed batch."""
        if steps < 1:
            raise ValueError(f"the epoch has {steps} steps: the shards hold fewer samples than one batch of "
                             f"{self.batch_size} per worker")
        recent: collections.deque = collections.deque(maxlen=REPLAY_BATCHES)
        yielded = 0
        batches = self.stream.iter_torch_batches(
            batch_size=self.batch_size, drop_last=True, local_shuffle_buffer_size=self.shuffle_buffer,
            prefetch_batches=self.prefetch_batches, device=self.device)
        for batch in batches:
            if yielded < steps:
                recent.append(batch)
                yielded += 1
                yield batch, True
            else:
                self.discarded_batches += 1
        if yielded < steps:
            if not recent:
                raise RuntimeError(f"epoch {self.epochs_done}: this worker received no full batch of "
                                   f"{self.batch_size}; are all samples bad? {self.bad_sample_summary()}")
            short = steps - yielded
            log.warning("epoch %d: %d of %d steps replay recent batches (bad samples were dropped); %s",
                        self.epochs_done, short, steps, self.bad_sample_summary())
            for i in range(short):
                self.padded_steps += 1
                yield recent[i % len(recent)], False
        self.epochs_done += 1

    def bad_sample_summary(self) -> str:
        return self.ledger.report().describe() if self.ledger is not None else "no ledger"

    def metrics(self, prefix: str = "data/") -> dict[str, float]:
        """Bad-sample counts of the whole dataset (all workers) plus this worker's padding, for reporting."""
        out = self.ledger.report().metrics(prefix) if self.ledger is not None else {}
        out[f"{prefix}padded_steps"] = self.padded_steps
        out[f"{prefix}discarded_batches"] = self.discarded_batches
        return out
