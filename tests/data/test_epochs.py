"""Epoch plans sample by sample: the order, the step count, what a resume reads and skips, and the record the
ranks agree on."""

import numpy as np

from pipeline.data.epochs import EpochRecord, SampleTally, plan_epoch, shard_order
from pipeline.data.shard_set import ShardSet


def uneven_set() -> ShardSet:
    uris = [f"s3://bucket/train-{i:06d}.tar" for i in range(5)]
    return ShardSet(spec="s3://bucket/train-{000000..000004}.tar", uris=uris, counts=[12, 7, 16, 9, 20],
                    classes=["a", "b"])


def bits(length: int, marked) -> np.ndarray:
    out = np.zeros(length, dtype=bool)
    out[list(marked)] = True
    return out


def test_a_whole_epoch_lists_every_shard_and_gives_every_rank_the_same_steps():
    shards = uneven_set()
    plan = plan_epoch(shards, 3, None, seed=5, world_size=2, batch_size=4)
    assert plan.shards == shards.uris and plan.samples == [12, 7, 16, 9, 20] and plan.skip == {}
    assert plan.steps == 64 // 8 and plan.before == EpochRecord(3)
    assert shard_order(shards.uris, 5, 3) != shard_order(shards.uris, 5, 4)  # each epoch its own permutation
    assert sorted(shard_order(shards.uris, 5, 3)) == shards.uris
    # a record of another epoch says nothing about this one
    assert plan_epoch(shards, 3, EpochRecord(2, [shards.uris[0]]), seed=5, world_size=2, batch_size=4).steps == 8


def test_a_resumed_epoch_reads_the_shards_not_done_in_the_epoch_order_and_skips_what_was_accounted_for():
    shards = uneven_set()
    order = shard_order(shards.uris, 5, 1)
    counts = dict(zip(shards.uris, shards.counts, strict=True))
    partial = bits(counts[order[3]] + 1, [0, 2, 3])
    record = EpochRecord(1, [order[0], order[2]], {order[3]: partial})
    for world_size, batch_size in ((1, 4), (3, 2)):  # whatever the world size of the resumed attempt
        plan = plan_epoch(shards, 1, record, seed=5, world_size=world_size, batch_size=batch_size)
        assert plan.shards == [order[1], order[3], order[4]]
        assert plan.samples == [counts[order[1]], counts[order[3]] - 3, counts[order[4]]]
        assert plan.steps == plan.num_samples // (world_size * batch_size)
        assert list(plan.skip) == [order[3]] and plan.skip[order[3]] is partial


def test_the_tally_marks_rows_and_bad_samples_and_the_ranks_or_their_bitmaps():
    shards = uneven_set()
    order = shard_order(shards.uris, 5, 1)
    record = EpochRecord(1, [order[0]], {order[1]: bits(shards.count_of()[order[1]] + 1, [0, 1])})
    plan = plan_epoch(shards, 1, record, seed=5, world_size=2, batch_size=2)
    counts = plan.counts  # plan.shards = order[1:]
    rank0, rank1 = SampleTally(plan), SampleTally(plan)
    assert rank0.preset == 2
    rank0.add(np.array([0] * (counts[0] - 2)), np.arange(2, counts[0]))  # the rest of the partly read shard
    rank0.add(np.array([1, 1]), np.array([0, 5]))
    rank1.add(np.array([1, 1, 1]), np.array([1, 2, 99]))  # a position past the manifest count is not recorded
    rank1.add(np.array([3]), np.array([counts[3]]))  # the marker row of a broken tar: its bit, past the samples
    merged = np.bitwise_or(rank0.packed(), rank1.packed())
    out = rank0.record(merged)
    assert out.epoch == 1 and out.done == [order[0], order[1]]
    assert sorted(out.partial) == sorted([order[2], order[4]])
    assert np.flatnonzero(out.partial[order[2]]).tolist() == [0, 1, 2, 5]
    assert np.flatnonzero(out.partial[order[4]]).tolist() == [counts[3]]
    assert rank0.accounted == counts[0] + 5  # every bit set, the ones preset included
    again = EpochRecord.from_json(out.to_json())
    assert again.done == out.done and sorted(again.partial) == sorted(out.partial)
    assert all(np.array_equal(again.partial[uri], out.partial[uri]) for uri in out.partial)
    # a resume from that record trains on each remaining sample once
    rest = plan_epoch(shards, 1, again, seed=5, world_size=1, batch_size=1)
    assert rest.shards == order[2:] and rest.num_samples == sum(rest.counts) - 4
