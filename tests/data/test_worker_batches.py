"""Every worker gets exactly steps_per_epoch batches, whatever the shard sizes and the bad samples."""

import dataclasses
import json
import os

import pytest

from pipeline.config import DataConfig
from pipeline.data.datasets import build_image_dataset
from pipeline.data.shard_writer import index_shards
from pipeline.data.worker_batches import WorkerBatches


def uneven_shards(tars, sizes: list[int], bad_in_largest: int) -> str:
    """Shards of the given sizes under tars.folder/u, `bad_in_largest` undecodable images in the largest one,
    and their manifest (which counts every key, bad ones included)."""
    largest = sizes.index(max(sizes))
    for s, size in enumerate(sizes):
        records = [tars.good_record(f"{s}{i:04d}", label=(s + i) % 3, seed=i) for i in range(size)]
        if s == largest:
            for record in records[:bad_in_largest]:
                record["jpg"] = b"not a jpeg"
        tars.write(f"u/train-{s:06d}.tar", records)
    index_shards(str(tars.folder / "u" / "train-*.tar"), classes=["a", "b", "c"])
    return str(tars.folder / "u" / "train-*.tar")


# 25 % bad in the first decode call of the short-epoch test: the limit sits above it, since the order varies.
CFG = DataConfig(img_size=16, max_bad_fraction=0.3, min_samples_for_bad_check=1, local_shuffle_buffer=16)


def test_short_epochs_are_topped_up_and_long_ones_drained(ray_local, tars):
    spec = uneven_shards(tars, [20, 5], bad_in_largest=5)  # 25 keys in the manifest, 20 good
    data = build_image_dataset(spec, CFG, train=True)
    steps = data.steps_per_epoch(world_size=1, batch_size=4)
    assert (data.num_samples, steps) == (25, 6)
    batches = WorkerBatches(data.dataset.iterator(), batch_size=4, steps_per_epoch=steps, cfg=CFG,
                            ledger_name=data.ledger_name, device="cpu")
    epoch = list(batches.epoch())  # 20 good rows make 5 batches; the 6th replays one
    assert len(epoch) == 6 and batches.padded_steps == 1
    assert all(b["image"].shape == (4, 3, 16, 16) and str(b["image"].dtype) == "torch.uint8" for b in epoch)
    assert all(str(b["label"].dtype) == "torch.int64" and set(b["label"].tolist()) <= {0, 1, 2} for b in epoch)
    metrics = batches.metrics()
    assert metrics["data/bad_undecodable"] == 5 and metrics["data/samples_seen"] == 25
    short = WorkerBatches(data.dataset.iterator(), batch_size=4, steps_per_epoch=2, cfg=CFG,
                          ledger_name=data.ledger_name, device="cpu")
    assert len(list(short.epoch())) == 2 and short.discarded_batches == 3
    assert data.bad_samples().seen == 50  # the second epoch was read to its end


def uneven_loop_per_worker(config: dict) -> None:
    import ray.train

    cfg = DataConfig(**config["data"])
    batches = WorkerBatches(ray.train.get_dataset_shard("train"), batch_size=config["batch_size"],
                            steps_per_epoch=config["steps_per_epoch"], cfg=cfg, ledger_name=config["ledger"],
                            device="cpu")
    per_epoch, labels, metrics = [], [], []
    for _ in range(config["epochs"]):
        n = 0
        for batch in batches.epoch():
            assert tuple(batch["image"].shape) == (config["batch_size"], 3, cfg.img_size, cfg.img_size)
            labels.extend(batch["label"].tolist())
            n += 1
        per_epoch.append(n)
        metrics.append(batches.metrics())
        ray.train.report(metrics[-1])
    rank = ray.train.get_context().get_world_rank()
    with open(os.path.join(config["out"], f"rank{rank}.json"), "w") as f:
        json.dump({"per_epoch": per_epoch, "padded": batches.padded_steps, "labels": labels, "metrics": metrics}, f)


@pytest.mark.e2e
def test_two_train_workers_get_equal_batches_from_uneven_shards(ray_local, tars, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    spec = uneven_shards(tars, [7, 50, 13], bad_in_largest=6)  # 70 keys, 64 good
    data = build_image_dataset(spec, CFG, train=True)
    batch_size = 5
    steps = data.steps_per_epoch(world_size=2, batch_size=batch_size)
    assert steps == 7  # 70 // (2 * 5); 64 good rows give each worker 32 rows = 6 batches + 1 replayed
    out = tmp_path / "ranks"
    out.mkdir()
    trainer = TorchTrainer(
        uneven_loop_per_worker,
        train_loop_config={"data": dataclasses.asdict(CFG), "batch_size": batch_size, "steps_per_epoch": steps,
                           "ledger": data.ledger_name, "epochs": 2, "out": str(out)},
        # Fractional CPUs leave the 4-CPU test Ray room for decode tasks; 1 CPU each would starve them.
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="uneven", storage_path=str(tmp_path / "runs")),
        datasets={"train": data.dataset},
    )
    trainer.fit()
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["per_epoch"] for r in ranks] == [[7, 7], [7, 7]]
    assert [r["padded"] for r in ranks] == [2, 2]
    assert all(set(r["labels"]) <= {0, 1, 2} and len(r["labels"]) == 2 * 7 * batch_size for r in ranks)
    for r in ranks:  # the ledger is shared: both workers report the same dataset-wide counts
        assert [m["data/bad_undecodable"] for m in r["metrics"]] == [6, 12]
        assert [m["data/samples_seen"] for m in r["metrics"]] == [70, 140]
