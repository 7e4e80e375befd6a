"""One rank's training batches across epochs, sample by sample (pipeline/data/epochs.py), so that a resumed
run continues where it stopped, at any world size.

The first pass of a run that resumes inside an epoch reads the shards of that epoch it had not finished, in
the epoch's order, from a stream of just those shards that skips their samples accounted for. Full epochs
follow from one stream over all shards,
made once for the whole run: each epoch is one more execution of it, which reads the next permutation.
Keeping one stream keeps its coordinator and its decode workers warm: a new dataset per epoch cost ~10 s of
start-up at every epoch boundary on 2 cores, a reused split ~1.5 s (docs/benchmarks.md).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist

from pipeline.config import DataConfig
from pipeline.data.bad_samples import BadSampleReport
from pipeline.data.epochs import EpochPlan, EpochRecord, SampleTally, plan_epoch
from pipeline.data.shard_set import ShardSet
from pipeline.data.worker_batches import WorkerBatches

log = logging.getLogger(__name__)


SAMPLE_LOG_ENV = "VIT_PIPELINE_SAMPLE_LOG"


class TrainFeed:
    """Yields (epoch, batch) forever from `epochs()`, or with the wait for each from `steps()`;
    `record_collective()` says which samples of the epoch in progress all ranks together have accounted for."""

    def __init__(self, ctx, shards: ShardSet, cfg: DataConfig, *, batch_size: int, num_classes: int | None, ledger,
                 device: torch.device):
        self.ctx = ctx
        self.shards = shards
        self.cfg = cfg
        self.batch_size = batch_size
        self.num_classes = num_classes
        self.ledger = ledger
        self.device = device
        self.tally: SampleTally | None = None
        self.worker_batches: WorkerBatches | None = None

    def steps(self, record: EpochRecord, first_step: int) -> Iterator[tuple[int, dict[str, torch.Tensor], float]]:
        """(epoch, batch, seconds waited for it) of steps `first_step`, `first_step` + 1, …, starting inside
        `record.epoch` as `epochs()` does; with VIT_PIPELINE_SAMPLE_LOG set, each step's samples go to the sample log
        (`open_sample_log_collective`; opening it is a collective)."""
        sample_log = open_sample_log_collective(self.ctx.rank, self.ctx.world_size, self.ctx.cpu_group)
        batches = self.epochs(record)
        try:
            for step in itertools.count(first_step):
                wait_start = time.perf_counter()
                epoch, batch = next(batches)
                data_wait_s = time.perf_counter() - wait_start
                if sample_log is not None:
                    sample_log.write(json.dumps({"step": step, "epoch": epoch, "samples": self.sample_ids(batch)})
                                     + "\n")
                yield epoch, batch, data_wait_s
        finally:
            if sample_log is not None:
                sample_log.close()

    def epochs(self, record: EpochRecord) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Starts inside `record.epoch`, after the samples it accounts for."""
        epoch = record.epoch
        if record.done or record.partial:
            plan = self._plan(epoch, record)
            if plan.steps:
                yield from self._run(plan, self._batches(plan.shards, shuffle_files=False, skip=plan.skip))
            else:
                log.info("epoch %d: the samples left are fewer than one global batch; next epoch", epoch)
            epoch += 1
        whole_epochs = None
        while True:
            plan = self._plan(epoch, None)
            if whole_epochs is None:  # executions k = 0, 1, ... read the permutations of epochs epoch + k
                whole_epochs = self._batches(plan.shards, first_epoch=epoch)
            yield from self._run(plan, whole_epochs)
            epoch += 1

    def _plan(self, epoch: int, record: EpochRecord | None) -> EpochPlan:
        return plan_epoch(self.shards, epoch, record, seed=self.cfg.shuffle_seed, world_size=self.ctx.world_size,
                          batch_size=self.batch_size)

    def _batches(self, uris: list[str], *, shuffle_files: bool = True, first_epoch: int = 0,
                 skip: dict | None = None) -> WorkerBatches:
        """This rank's batches of a stream over `uris` (a collective: rank 0 builds it for all)."""
        shards = self.shards if uris == self.shards.uris else self.shards.subset(uris)
        stream = self.ctx.image_stream(shards, self.cfg, train=True, num_classes=self.num_classes,
                                       ledger=self.ledger, shuffle_files=shuffle_files, first_epoch=first_epoch,
                                       skip=skip)
        return WorkerBatches(stream, batch_size=self.batch_size, cfg=self.cfg, train=True, ledger=self.ledger,
                             device=self.device)

    def _run(self, plan: EpochPlan, worker_batches: WorkerBatches):
        self.tally, self.worker_batches = SampleTally(plan), worker_batches
        if self.ctx.rank == 0:
            self.ledger.start_pass()  # before this pass's first decode: every split must start before data flows
            before = plan.before
            log.info("epoch %d: %d shards (%d done before, %d partly), %d samples, %d steps", plan.epoch,
                     len(plan.shards), len(before.done), len(plan.skip), plan.num_samples, plan.steps)
        for batch, fresh in worker_batches.epoch(plan.steps):
            if fresh:  # replayed batches (a short epoch) are not new rows
                self.tally.add(batch["shard"].cpu().numpy(), batch["index"].cpu().numpy())
            yield plan.epoch, batch

    def record_collective(self) -> tuple[EpochRecord, BadSampleReport]:
        """The samples of the current epoch accounted for by all ranks together (those trained on, and those
        the decode stage found bad, which a resume skips so that they are counted once), and the ledger's
        totals as of that record. A collective: call on every rank; every rank gets the same."""
        totals = None
        if self.ctx.rank == 0:
            snapshot = self.ledger.snapshot()
            shard_ids, positions = np.asarray(snapshot.pass_bad, dtype=np.int64).reshape(-1, 2).T
            self.tally.add(shard_ids, positions)
        packed = torch.from_numpy(self.tally.packed())
        if self.ctx.world_size > 1:
            dist.all_reduce(packed, op=dist.ReduceOp.BOR, group=self.ctx.cpu_group)
        record = self.tally.record(packed.numpy())
        if self.ctx.rank == 0:
            # rows read ahead of training are read again after a resume: they count as seen once they are
            # accounted for
            totals = snapshot.totals
            totals.seen += self.tally.accounted - self.tally.preset - snapshot.pass_seen
        if self.ctx.world_size > 1:
            holder = [totals]
            dist.broadcast_object_list(holder, src=0, group=self.ctx.cpu_group)
            totals = holder[0]
        return record, totals

    def sample_ids(self, batch: dict[str, torch.Tensor]) -> list[tuple[str, int]]:
        """(shard uri, position) of each row of a batch of the current pass."""
        uris = self.tally.plan.shards
        return [(uris[s], i) for s, i in zip(batch["shard"].tolist(), batch["index"].tolist(), strict=True)]

    def metrics(self) -> dict[str, float]:
        return self.worker_batches.metrics() if self.worker_batches else {}



def open_sample_log_collective(rank: int, world_size: int, group=None):
    """With VIT_PIPELINE_SAMPLE_LOG=<folder> (on every worker): a file there per rank and attempt,
    `attempt-<start ns>-rank<r>of<w>.jsonl` (rank 0's start time, so later attempts sort later), with one JSON
    line per step holding the (shard, position) of every sample the rank trained on: to audit what a run saw
    (which samples a loss spike came from; that resumes repeat none). Off by default. Line-buffered, so a lost
    worker loses no step it logged. A collective when on."""
    folder = os.environ.get(SAMPLE_LOG_ENV)
    if not folder:
        return None
    started = [time.time_ns()]
    if world_size > 1:
        dist.broadcast_object_list(started, src=0, group=group)
    os.makedirs(folder, exist_ok=True)
    return open(os.path.join(folder, f"attempt-{started[0]}-rank{rank}of{world_size}.jsonl"), "a", buffering=1)
