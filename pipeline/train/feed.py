"""One rank's training batches across epochs, at shard granularity (pipeline/data/epochs.py), so that a
resumed run continues where it stopped.

The first pass of a run that resumes inside an epoch reads the shards of that epoch it had not finished, in
the epoch's order, from a stream of just those shards. Full epochs follow from one stream over all shards,
made once for the whole run: each epoch is one more execution of it, which reads the next permutation.
Keeping one stream keeps its coordinator and its decode workers warm: a new dataset per epoch cost ~10 s of
start-up at every epoch boundary on 2 cores, a reused split ~1.5 s (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
import torch.distributed as dist

from pipeline.config import DataConfig
from pipeline.data.epochs import EpochPlan, ShardTally, plan_epoch
from pipeline.data.shard_set import ShardSet
from pipeline.data.worker_batches import WorkerBatches

log = logging.getLogger(__name__)


class TrainFeed:
    """Yields (epoch, batch) forever from `epochs()`; `shards_done_collective()` says which shards of the
    epoch in progress all ranks together have consumed."""

    def __init__(self, ctx, shards: ShardSet, cfg: DataConfig, *, batch_size: int, num_classes: int, ledger,
                 device: torch.device):
        self.ctx = ctx
        self.shards = shards
        self.cfg = cfg
        self.batch_size = batch_size
        self.num_classes = num_classes
        self.ledger = ledger
        self.device = device
        self.tally: ShardTally | None = None
        self.worker_batches: WorkerBatches | None = None

    def epochs(self, epoch: int, shards_done: list[str]) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Starts inside `epoch` after `shards_done`."""
        if shards_done:
            plan = self._plan(epoch, shards_done)
            if plan.steps:
                yield from self._run(plan, self._batches(plan.shards, shuffle_files=False))
            else:
                log.info("epoch %d: the samples left are fewer than one global batch; next epoch", epoch)
            epoch += 1
        whole_epochs = None
        while True:
            plan = self._plan(epoch, [])
            if whole_epochs is None:  # executions k = 0, 1, ... read the permutations of epochs epoch + k
                whole_epochs = self._batches(plan.shards, first_epoch=epoch)
            yield from self._run(plan, whole_epochs)
            epoch += 1

    def _plan(self, epoch: int, shards_done: list[str]) -> EpochPlan:
        return plan_epoch(self.shards, epoch, shards_done, seed=self.cfg.shuffle_seed,
                          world_size=self.ctx.world_size, batch_size=self.batch_size)

    def _batches(self, uris: list[str], *, shuffle_files: bool = True, first_epoch: int = 0) -> WorkerBatches:
        """This rank's batches of a stream over `uris` (a collective: rank 0 builds it for all)."""
        shards = self.shards if uris == self.shards.uris else self.shards.subset(uris)
        stream = self.ctx.image_stream(shards, self.cfg, train=True, num_classes=self.num_classes,
                                       ledger=self.ledger, shuffle_files=shuffle_files, first_epoch=first_epoch)
        return WorkerBatches(stream, batch_size=self.batch_size, cfg=self.cfg, train=True, ledger=self.ledger,
                             device=self.device)

    def _run(self, plan: EpochPlan, worker_batches: WorkerBatches):
        self.tally, self.worker_batches = ShardTally(plan), worker_batches
        if self.ctx.rank == 0:
            log.info("epoch %d: %d shards (%d already done), %d samples, %d steps", plan.epoch, len(plan.shards),
                     len(plan.shards_done_before), plan.num_samples, plan.steps)
        for batch, fresh in worker_batches.epoch(plan.steps):
            if fresh:  # replayed batches (a short epoch) are not new rows
                self.tally.add(batch["shard"].cpu().numpy())
            yield plan.epoch, batch

    def shards_done_collective(self) -> list[str]:
        """Shards of the current epoch fully consumed by all ranks together. A collective: call on every rank."""
        consumed = torch.from_numpy(self.tally.consumed.copy())
        if self.ctx.world_size > 1:
            dist.all_reduce(consumed)
        return self.tally.shards_done(consumed.numpy())

    def metrics(self) -> dict[str, float]:
        return self.worker_batches.metrics() if self.worker_batches else {}

