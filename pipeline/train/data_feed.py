"""Training data per epoch, at shard granularity, so that a resumed run continues where it stopped.

An epoch reads the training shards in a seeded permutation (`shuffle_seed + epoch`). Rank 0 builds that
epoch's Ray Dataset from the shards not yet consumed, splits it into `world_size` equal streams and hands one
to each rank, so the dataset always matches the loop's position: after a worker failure (Ray Train restarts
the group from the latest checkpoint) or an explicit `train.resume_from`, the epoch goes on with the shards
it had not finished, in the same order, instead of starting over. timm and OpenCLIP resume at epoch
granularity only.

Every row carries the index of its shard in the epoch's list. Ranks count the rows they consume per shard;
at a checkpoint the counts are summed over ranks and a shard whose every sample was consumed is recorded as
done. A shard with bad samples never reaches its manifest count, so it is read again after a resume: a few
samples repeat, none is lost.
"""

import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from pipeline.config import DataConfig
from pipeline.data.bad_samples import BadSamplePolicy
from pipeline.data.datasets import build_image_dataset
from pipeline.data.manifest import find_manifest, steps_per_epoch
from pipeline.data.tar_reader import expand_shards, shard_order
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
    """The training shards and their manifest sample counts."""

    def __init__(self, spec: str | list[str]):
        paths, fs = expand_shards(spec)
        manifest = find_manifest(fs, paths)
        if manifest is None:
            raise FileNotFoundError(f"no manifest beside {paths[0]}: training needs the sample count of every "
                                    "shard; write one with `python jobs/make_shards.py --source shards:PATTERN`")
        counts = {shard.name: shard.num_samples for shard in manifest.shards}
        missing = [path for path in paths if path.rsplit("/", 1)[-1] not in counts]
        if missing:
            raise ValueError(f"{len(missing)} shards are not in their manifest, e.g. {missing[0]}")
        self.paths = paths
        self.counts = {path: counts[path.rsplit("/", 1)[-1]] for path in paths}
        self.classes = manifest.classes

    def plan(self, epoch: int, shards_done: list[str], *, seed: int, world_size: int, batch_size: int
             ) -> EpochPlan:
        done = set(shards_done)
        shards = [path for path in shard_order(self.paths, seed, epoch) if path not in done]
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


class Prefetched:
    """Drives an iterator on a thread, at most `depth` items ahead, so that the next epoch's pipeline (its read
    and decode tasks, which need worker processes) starts while the current epoch is still being trained on,
    instead of after it: on small epochs that start-up stalled training for seconds at every boundary."""

    _END = object()

    def __init__(self, iterable, depth: int):
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.thread = threading.Thread(target=self._run, args=(iterable,), daemon=True)
        self.thread.start()

    def _run(self, iterable) -> None:
        try:
            for item in iterable:
                self.queue.put((True, item))
            self.queue.put((True, self._END))
        except BaseException as error:  # handed to the consumer, which raises it in the training thread
            self.queue.put((False, error))

    def __iter__(self):
        while True:
            ok, item = self.queue.get()
            if not ok:
                raise item
            if item is self._END:
                return
            yield item


@dataclass
class OpenEpoch:
    plan: EpochPlan
    worker_batches: WorkerBatches | None  # None when the plan has no step
    batches: Prefetched | list  # (batch, replayed) pairs


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
        self.current: OpenEpoch | None = None
        self.shards_done_before: list[str] = []
        self.consumed = np.zeros(0, dtype=np.int64)

    def open(self, epoch: int, shards_done: list[str]) -> OpenEpoch:
        """Plan an epoch pass and start its pipeline. A collective (rank 0 hands out the splits)."""
        plan = self.catalog.plan(epoch, shards_done, seed=self.cfg.shuffle_seed, world_size=self.world_size,
                                 batch_size=self.batch_size)
        if plan.steps == 0:
            log.warning("epoch %d: the %d samples left are fewer than one global batch; next epoch", epoch,
                        plan.num_samples)
            return OpenEpoch(plan, None, [])

        def build():
            return build_image_dataset(plan.shards, self.cfg, train=True, shuffle_files=False,
                                       num_classes=self.num_classes, policy=self.policy).dataset

        stream = split_for_ranks(build, self.rank, self.world_size)
        worker_batches = WorkerBatches(
            stream, batch_size=self.batch_size, steps_per_epoch=plan.steps, cfg=self.cfg, train=True,
            ledger_name=self.policy.ledger_name if self.policy else None, device=self.device)

        def tagged():
            padded_steps = 0
            for batch in worker_batches.epoch():
                yield batch, worker_batches.padded_steps != padded_steps
                padded_steps = worker_batches.padded_steps

        return OpenEpoch(plan, worker_batches, Prefetched(tagged(), depth=self.cfg.prefetch_batches))

    def epochs(self, epoch: int, shards_done: list[str]) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Yields (epoch, batch) forever, starting inside `epoch` after `shards_done`."""
        opened = self.open(epoch, shards_done)
        while True:
            self.current, self.shards_done_before = opened, list(shards_done)
            self.consumed = np.zeros(len(opened.plan.shards), dtype=np.int64)
            if self.rank == 0:
                log.info("epoch %d: %d shards (%d already done), %d samples, %d steps", epoch,
                         len(opened.plan.shards), len(shards_done), opened.plan.num_samples, opened.plan.steps)
            following = None
            for batch, replayed in opened.batches:
                if following is None:  # every rank reaches its first batch of the epoch at the same step
                    following = self.open(epoch + 1, [])
                if not replayed:  # replayed batches (a short epoch topped up) are not new rows
                    self.consumed += np.bincount(batch["shard"].cpu().numpy(), minlength=len(self.consumed))
                yield epoch, batch
            opened = following or self.open(epoch + 1, [])
            epoch, shards_done = epoch + 1, []

    def shards_done(self) -> list[str]:
        """Shards of the current epoch fully consumed by all ranks together. A collective: call on every rank."""
        consumed = torch.from_numpy(self.consumed)
        if self.world_size > 1:
            dist.all_reduce(consumed)
        plan = self.current.plan
        finished = [path for path, count, seen in zip(plan.shards, plan.samples, consumed.tolist(), strict=True)
                    if seen >= count]
        return self.shards_done_before + finished

    def metrics(self) -> dict[str, float]:
        return self.current.worker_batches.metrics() if self.current and self.current.worker_batches else {}


def build_eval_stream(cfg: DataConfig, *, rank: int, world_size: int, num_classes: int,
                      policy: BadSamplePolicy | None):
    """One stream of the val split per rank, not trimmed, so every image counts; iterate once per evaluation."""
    def build():
        return build_image_dataset(cfg.val, cfg, train=False, num_classes=num_classes, policy=policy).dataset
    return split_for_ranks(build, rank, world_size, equal=False)
