"""Epochs at shard granularity: the order an epoch reads its shards in, how many steps it gives every rank,
and which of its shards have been consumed, so that a resumed run continues where it stopped.

Epoch e reads the shards in the permutation seeded with `shuffle_seed + e`. A resumed run first finishes the
interrupted epoch with the shards it had not finished, in the same order; full epochs follow. Every row
carries the index of its shard in the pass's shard list; a `ShardTally` counts the rows consumed per shard,
and a shard whose every sample was consumed (all ranks together) is done. A shard with bad samples never
reaches its manifest count, so it is read again after a resume: a few samples repeat, none is lost.
timm and OpenCLIP resume at epoch granularity only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.data.shard_set import ShardSet


def shard_order(uris: list[str], seed: int, epoch: int) -> list[str]:
    """The order in which epoch `epoch` reads `uris` (the same draws as the Ray Data reader's, which
    permutes the same list positions with the same seed)."""
    order = list(uris)
    np.random.default_rng(seed + epoch).shuffle(order)
    return order


def steps_per_epoch(num_samples: int, world_size: int, batch_size: int) -> int:
    """Full batches each worker runs per epoch; the remainder is dropped so that every rank runs the same count."""
    if world_size < 1 or batch_size < 1:
        raise ValueError(f"world_size ({world_size}) and batch_size ({batch_size}) must be >= 1")
    return num_samples // (world_size * batch_size)


@dataclass
class EpochPlan:
    epoch: int
    shards: list[str]  # the shards this pass reads, in order: the epoch's permutation less the ones done
    samples: list[int]  # manifest sample count of each shard
    steps: int  # optimizer steps this pass gives every rank
    shards_done_before: list[str]  # shards of the epoch consumed before this pass (a resume)

    @property
    def num_samples(self) -> int:
        return sum(self.samples)


def plan_epoch(shards: ShardSet, epoch: int, shards_done: list[str], *, seed: int, world_size: int,
               batch_size: int) -> EpochPlan:
    """The rest of `epoch` after `shards_done`, in the epoch's order; with none done, the whole epoch, listed
    in the set's order (the whole-epoch dataset indexes its shards by it and orders each execution itself)."""
    counts = shards.count_of()
    done = set(shards_done)
    order = [uri for uri in shard_order(shards.uris, seed, epoch) if uri not in done] if done else shards.uris
    samples = [counts[uri] for uri in order]
    return EpochPlan(epoch, order, samples, steps_per_epoch(sum(samples), world_size, batch_size),
                     list(shards_done))


class ShardTally:
    """Rows consumed per shard of one pass, on one rank."""

    def __init__(self, plan: EpochPlan):
        self.plan = plan
        self.consumed = np.zeros(len(plan.shards), dtype=np.int64)

    def add(self, shard_ids: np.ndarray) -> None:
        """Count one batch's rows by the shard index each row carries."""
        self.consumed += np.bincount(shard_ids, minlength=len(self.consumed))

    def shards_done(self, consumed_all_ranks: np.ndarray) -> list[str]:
        """Shards of the epoch consumed in full, given the counts summed over ranks."""
        finished = [uri for uri, count, seen in zip(self.plan.shards, self.plan.samples, consumed_all_ranks.tolist(),
                                                    strict=True) if seen >= count]
        return self.plan.shards_done_before + finished
