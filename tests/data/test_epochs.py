"""Epoch plans at shard granularity: the order, the step count and what a resume reads."""

from pipeline.data.epochs import ShardTally, plan_epoch, shard_order
from pipeline.data.shard_set import ShardSet


def uneven_set() -> ShardSet:
    uris = [f"s3://bucket/train-{i:06d}.tar" for i in range(5)]
    return ShardSet(spec="s3://bucket/train-{000000..000004}.tar", uris=uris, counts=[12, 7, 16, 9, 20],
                    classes=["a", "b"])


def test_a_whole_epoch_lists_every_shard_and_gives_every_rank_the_same_steps():
    shards = uneven_set()
    plan = plan_epoch(shards, 3, [], seed=5, world_size=2, batch_size=4)
    assert plan.shards == shards.uris and plan.samples == [12, 7, 16, 9, 20]
    assert plan.steps == 64 // 8 and plan.shards_done_before == []
    assert shard_order(shards.uris, 5, 3) != shard_order(shards.uris, 5, 4)  # each epoch its own permutation
    assert sorted(shard_order(shards.uris, 5, 3)) == shards.uris


def test_a_resumed_epoch_reads_the_shards_not_done_in_the_epoch_order():
    shards = uneven_set()
    order = shard_order(shards.uris, 5, 1)
    done = [order[0], order[2]]
    plan = plan_epoch(shards, 1, done, seed=5, world_size=1, batch_size=4)
    assert plan.shards == [order[1], order[3], order[4]]
    counts = dict(zip(shards.uris, shards.counts, strict=True))
    assert plan.num_samples == sum(counts[uri] for uri in plan.shards)
    assert plan.steps == plan.num_samples // 4
    tally = ShardTally(plan)
    tally.add([0] * counts[order[1]] + [2] * (counts[order[4]] - 1))  # the last shard is one row short
    assert tally.shards_done(tally.consumed) == [order[0], order[2], order[1]]
