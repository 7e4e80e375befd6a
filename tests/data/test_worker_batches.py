"""Every worker gets exactly the epoch's step count of batches, whatever the shard sizes and the bad samples:
in one process (the local stream) and on two Ray Train workers through the trainer's own wiring
(RayTrainContext's split, its ledger actors, TrainFeed); with the tasks decoding, and with the workers
decoding (data.decode_device=gpu, on their CPUs here), where the bad JPEGs are found on the worker."""

import dataclasses
import json
import os

import numpy as np
import pytest

from pipeline.config import DataConfig
from pipeline.data.bad_samples import LocalLedger
from pipeline.data.device_decode import on_device
from pipeline.data.epochs import EpochRecord, SampleTally, plan_epoch, shard_order
from pipeline.data.local_stream import LocalImageStream
from pipeline.data.shard_set import read_shard_set
from pipeline.data.shard_writer import index_shards
from pipeline.data.worker_batches import WorkerBatches


def uneven_shards(tars, sizes: list[int], bad_in_largest: int) -> str:
    """Shards of the given sizes under tars.folder/u, `bad_in_largest` undecodable images in the largest one
    (truncated JPEGs: their headers read, so with data.decode_device=gpu the worker finds them), and their
    manifest (which counts every key, bad ones included)."""
    largest = sizes.index(max(sizes))
    for s, size in enumerate(sizes):
        records = [tars.good_record(f"{s}{i:04d}", label=(s + i) % 3, seed=i) for i in range(size)]
        if s == largest:
            for record in records[:bad_in_largest]:
                record["jpg"] = record["jpg"][: len(record["jpg"]) // 2]
        tars.write(f"u/train-{s:06d}.tar", records)
    index_shards(str(tars.folder / "u" / "train-*.tar"), classes=["a", "b", "c"])
    return str(tars.folder / "u" / "train-*.tar")


# 25 % bad in the first decode call of the short-epoch test: the limit sits above it, since the order varies.
CFG = DataConfig(img_size=16, max_bad_fraction=0.3, min_samples_for_bad_check=1, local_shuffle_buffer=16)


@pytest.mark.parametrize("decode_device", ["cpu", "gpu"])
def test_short_epochs_are_topped_up_and_long_ones_drained(tars, decode_device):
    cfg = dataclasses.replace(CFG, decode_device=decode_device)
    shards = read_shard_set(uneven_shards(tars, [20, 5], bad_in_largest=5))  # 25 keys in the manifest, 20 good
    plan = plan_epoch(shards, 0, None, seed=cfg.shuffle_seed, world_size=1, batch_size=4)
    assert (plan.num_samples, plan.steps) == (25, 6)
    ledger = LocalLedger(cfg.max_bad_fraction, cfg.min_samples_for_bad_check)
    local = LocalImageStream(shards, cfg, train=True, num_classes=3, ledger=ledger)
    stream = on_device(local, cfg, train=True, ledger=ledger, local_rank=0, shard_uris=shards.uris)
    batches = WorkerBatches(stream, batch_size=4, cfg=cfg, ledger=ledger, device="cpu")
    tally = SampleTally(plan)
    epoch = []
    for batch, fresh in batches.epoch(plan.steps):  # 20 good rows make 5 batches; the 6th replays one
        epoch.append(batch)
        if fresh:
            tally.add(batch["shard"].numpy(), batch["index"].numpy())
    assert len(epoch) == 6 and batches.padded_steps == 1
    assert all(b["image"].shape == (4, 3, 16, 16) and str(b["image"].dtype) == "torch.uint8" for b in epoch)
    assert all(str(b["label"].dtype) == "torch.int64" and set(b["label"].tolist()) <= {0, 1, 2} for b in epoch)
    # the short shard was read whole; the other is done once the ledger's bad samples are marked too
    assert tally.record(tally.packed()).partial.keys() == {shards.uris[0]}
    bad = np.asarray(ledger.snapshot().pass_bad).T
    assert sorted(bad[1].tolist()) == [0, 1, 2, 3, 4] and set(bad[0].tolist()) == {0}  # by shard and position
    tally.add(*bad)
    assert tally.record(tally.packed()).done == shards.uris
    metrics = batches.metrics()
    assert metrics["data/bad_undecodable"] == 5 and metrics["data/samples_seen"] == 25
    assert len(list(batches.epoch(2))) == 2 and batches.discarded_batches == 3
    assert ledger.report().seen == 50  # the second epoch was read to its end
    assert local.orders == [shard_order(shards.uris, cfg.shuffle_seed, e) for e in (0, 1)]  # an order per epoch


def feed_per_worker(config: dict) -> None:
    import torch

    from pipeline.train.feed import TrainFeed
    from pipeline.train.ray_context import RayTrainContext

    cfg = config["cfg"]
    ctx = RayTrainContext()
    [ledger] = ctx.start_ledgers(1, cfg.max_bad_fraction, cfg.min_samples_for_bad_check)
    feed = TrainFeed(ctx, config["shards"], cfg, batch_size=config["batch_size"], num_classes=3, ledger=ledger,
                     device=torch.device("cpu"))
    batches = feed.epochs(EpochRecord())
    epochs, labels, metrics, records = [], [], [], []
    for _ in range(2):
        for _ in range(config["steps"]):
            epoch, batch = next(batches)
            assert tuple(batch["image"].shape) == (config["batch_size"], 3, cfg.img_size, cfg.img_size)
            epochs.append(epoch)
            labels.extend(batch["label"].tolist())
        metrics.append(feed.metrics())
        record, totals = feed.record_collective()
        records.append({"done": record.done, "accounted": feed.tally.accounted, "bad": totals.num_bad,
                        "seen": totals.seen, "padded": feed.worker_batches.padded_steps})
    with open(os.path.join(config["out"], f"rank{ctx.rank}.json"), "w") as f:
        json.dump({"epochs": epochs, "padded": feed.worker_batches.padded_steps, "labels": labels,
                   "metrics": metrics, "records": records}, f)


@pytest.mark.e2e
@pytest.mark.parametrize("decode_device", ["cpu", "gpu"])
def test_two_train_workers_get_equal_batches_from_uneven_shards(ray_local, tars, tmp_path, decode_device):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    shards = read_shard_set(uneven_shards(tars, [7, 50, 13], bad_in_largest=6))  # 70 keys, 64 good
    batch_size = 5
    steps = plan_epoch(shards, 0, None, seed=CFG.shuffle_seed, world_size=2, batch_size=batch_size).steps
    assert steps == 7  # 70 // (2 * 5); 64 good rows give each worker 32 rows = 6 batches + 1 replayed
    out = tmp_path / "ranks"
    out.mkdir()
    trainer = TorchTrainer(
        feed_per_worker,
        train_loop_config={"shards": shards, "batch_size": batch_size, "steps": steps, "out": str(out),
                           "cfg": dataclasses.replace(CFG, decode_device=decode_device)},
        # Fractional CPUs leave the 4-CPU test Ray room for decode tasks; 1 CPU each would starve them.
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="uneven", storage_path=str(tmp_path / "runs")),
    )
    trainer.fit()
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["epochs"] for r in ranks] == [[0] * 7 + [1] * 7] * 2  # the same step count on both ranks
    # the tasks drop bad rows before the equal split; the workers drop theirs after it, each its own share
    padded = [[e["padded"] for e in r["records"]] for r in ranks]  # after epoch 0, after epoch 1
    if decode_device == "cpu":
        assert padded == [[1, 2], [1, 2]]
    assert all(set(r["labels"]) <= {0, 1, 2} and len(r["labels"]) == 2 * 7 * batch_size for r in ranks)
    for r in ranks:  # the ledger is shared: both workers report the same dataset-wide counts
        assert [m["data/bad_undecodable"] for m in r["metrics"]] == [6, 12]
        assert [m["data/samples_seen"] for m in r["metrics"]] == [70, 140]
        # OR-ed over ranks (the same answer on both): the rows trained fresh and the 6 bad of each epoch are
        # accounted for; good rows trimmed by drop_last are not
        assert [(e["done"], e["accounted"], e["bad"]) for e in r["records"]] == \
            [(e["done"], e["accounted"], e["bad"]) for e in ranks[0]["records"]]
        fresh = [batch_size * sum(7 - p[0] for p in padded), batch_size * sum(7 - (p[1] - p[0]) for p in padded)]
        assert [(e["accounted"], e["bad"]) for e in r["records"]] == [(fresh[0] + 6, 6), (fresh[1] + 6, 12)]
        # the ledger's totals as of a record count as seen what is accounted for, not what was read ahead
        assert [e["seen"] for e in r["records"]] == [fresh[0] + 6, 70 + fresh[1] + 6]
