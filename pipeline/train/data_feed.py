"""Training data per epoch, at shard granularity, so that a resumed run continues where it stopped.

Epoch e reads the training shards in a seeded permutation (`shuffle_seed + e`). Rank 0 builds one Ray Dataset
over all shards and splits it once into `world_size` equal streams; each epoch is one more execution of it,
which Ray orders by the next permutation. Keeping one split for the whole run keeps its coordinator and its
decode workers warm: a new dataset per epoch cost ~10 s of start-up at every epoch boundary on 2 cores, a
reused split ~1.5 s (docs/benchmarks.md).

A resumed run (after a worker failure, Ray Train restarts the group from the latest checkpoint, or with
`train.resume_from`) first finishes the interrupted epoch with the shards it had not finished, in the same
order, from a dataset of just those shards; full epochs follow. timm and OpenCLIP resume at epoch
granularity only.

Every row carries the index of its shard. Ranks count the rows they consume per shard; at a checkpoint the
counts are summed over ranks and a shard whose every sample was consumed is recorded as done. A shard with
bad samples never reaches its manifest count, so it is read again after a resume: a few samples repeat,
none is lost.
"""

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from pipeline.config import DataConfig
from pipeline.data.bad_samples import BadSamplePolicy
from pipeline.data.datasets import build_image_dataset
from pipeline.data.manifest import find_manifest, steps_per_epoch
from pipeline.data.shard_specs import expand_shards
from pipeline.data.tar_reader import shard_order
from pipeline.data.worker_batches import WorkerBatches

log = logging.getLogger(__name__)


@dataclass
class EpochPlan:
    epoch: int
    shards: list[str]  # the shards this pass reads, in order: the epoch's permutation less the ones done
    samples: list[int]  # manifest sample count of each shard
    steps: int  # optimizer steps this pass gives every rank

    @property
    def num_samples(self) -> int:
        return sum(self.samples)


class ShardCatalog:
    """The training shards (locations with their scheme) and their manifest sample counts."""

    def __init__(self, spec: str | list[str]):
        paths = expand_shards(spec)
        manifest = find_manifest(paths)
        if manifest is None:
            raise FileNotFoundError(f"no manifest beside {paths[0]}: training needs the sample count of every "
                                    "shard; write one with `python jobs/make_shards.py --source shards:PATTERN`")
        self.paths = paths
        self.counts = dict(zip(paths, manifest.sample_counts(paths), strict=True))
        self.classes = manifest.classes
        self.manifest = manifest

    def plan(self, epoch: int, shards_done: list[str], *, seed: int, world_size: int, batch_size: int
             ) -> EpochPlan:
        """The rest of `epoch` after `shards_done`, in the epoch's order; with none done, the whole epoch (then
        listed in catalog order, the order the whole-epoch dataset indexes its shards by)."""
        done = set(shards_done)
        shards = [path for path in shard_order(self.paths, seed, epoch) if path not in done] if done else self.paths
        samples = [self.counts[path] for path in shards]
        return EpochPlan(epoch, shards, samples, steps_per_epoch(sum(samples), world_size, batch_size))


def broadcast_from_rank0(value, rank: int, world_size: int):
    if world_size == 1:
        return value
    holder = [value if rank == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def split_for_ranks(build, rank: int, world_size: int, *, equal: bool = True):
    """Rank 0 builds a dataset and splits it into streams (`equal`: trimmed to the same row count); every rank
    gets its own stream."""
    splits = build().streaming_split(world_size, equal=equal) if rank == 0 else None
    return broadcast_from_rank0(splits, rank, world_size)[rank]


class TrainFeed:
    """One rank's training batches across epochs, with per-shard consumption for checkpoints."""

    def __init__(self, catalog: ShardCatalog, cfg: DataConfig, *, rank: int, world_size: int, batch_size: int,
                 num_classes: int, policy: BadSamplePolicy | None, device: torch.device):
        self.catalog = catalog
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.num_classes = num_classes
        self.policy = policy
        self.device = device
        self.plan: EpochPlan | None = None
        self.shards_done_before: list[str] = []
        self.consumed = np.zeros(0, dtype=np.int64)
        self.worker_batches: WorkerBatches | None = None

    def epochs(self, epoch: int, shards_done: list[str]) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Yields (epoch, batch) forever, starting inside `epoch` after `shards_done`."""
        if shards_done:
            plan = self._plan(epoch, shards_done)
            if plan.steps:
                yield from self._run(plan, self._split(plan.shards, shuffle_files=False), shards_done)
            else:
                log.info("epoch %d: the samples left are fewer than one global batch; next epoch", epoch)
            epoch += 1
        whole_epochs = None
        while True:
            plan = self._plan(epoch, [])
            if whole_epochs is None:  # executions k = 0, 1, ... read the permutations of epochs epoch + k
                whole_epochs = self._split(plan.shards, first_epoch=epoch)
            yield from self._run(plan, whole_epochs, [])
            epoch += 1

    def _plan(self, epoch: int, shards_done: list[str]) -> EpochPlan:
        return self.catalog.plan(epoch, shards_done, seed=self.cfg.shuffle_seed, world_size=self.world_size,
                                 batch_size=self.batch_size)

    def _split(self, shards: list[str], *, shuffle_files: bool = True, first_epoch: int = 0) -> WorkerBatches:
        """A dataset of `shards`, split once for all ranks (a collective)."""
        def build():
            return build_image_dataset(shards, self.cfg, train=True, shuffle_files=shuffle_files,
                                       first_epoch=first_epoch, num_classes=self.num_classes,
                                       policy=self.policy).dataset

        stream = split_for_ranks(build, self.rank, self.world_size)
        return WorkerBatches(stream, batch_size=self.batch_size, steps_per_epoch=1, cfg=self.cfg, train=True,
                             ledger_name=self.policy.ledger_name if self.policy else None, device=self.device)

    def _run(self, plan: EpochPlan, worker_batches: WorkerBatches, shards_done: list[str]):
        self.plan, self.worker_batches, self.shards_done_before = plan, worker_batches, list(shards_done)
        self.consumed = np.zeros(len(plan.shards), dtype=np.int64)
        worker_batches.steps_per_epoch = plan.steps
        if self.rank == 0:
            log.info("epoch %d: %d shards (%d already done), %d samples, %d steps", plan.epoch, len(plan.shards),
                     len(shards_done), plan.num_samples, plan.steps)
        padded_steps = worker_batches.padded_steps
        for batch in worker_batches.epoch():
            if worker_batches.padded_steps == padded_steps:  # replayed batches (a short epoch) are not new rows
                self.consumed += np.bincount(batch["shard"].cpu().numpy(), minlength=len(self.consumed))
            padded_steps = worker_batches.padded_steps
            yield plan.epoch, batch

    def shards_done(self) -> list[str]:
        """Shards of the current epoch fully consumed by all ranks together. A collective: call on every rank."""
        consumed = torch.from_numpy(self.consumed)
        if self.world_size > 1:
            dist.all_reduce(consumed)
        plan = self.plan
        finished = [path for path, count, seen in zip(plan.shards, plan.samples, consumed.tolist(), strict=True)
                    if seen >= count]
        return self.shards_done_before + finished

    def metrics(self) -> dict[str, float]:
        return self.worker_batches.metrics() if self.worker_batches else {}


def build_eval_stream(cfg: DataConfig, *, rank: int, world_size: int, num_classes: int,
                      policy: BadSamplePolicy | None):
    """One stream of the val split per rank, not trimmed, so every image counts; iterate once per evaluation."""
    def build():
        return build_image_dataset(cfg.val, cfg, train=False, num_classes=num_classes, policy=policy).dataset
    return split_for_ranks(build, rank, world_size, equal=False)
