"""What the sample-exact data position costs a checkpoint, at ImageNet-like scale.

    python jobs/benchmark.py resume                       # 10,000 shards x 1,250 samples, mid-epoch

A real DeepSpeed engine (--preset at --img-size, ViT-S/16 at 224 px by default; ZeRO-2, one rank in a gloo group of
one, as `LocalContext` runs it) saves a checkpoint mid-epoch, --rounds times each, alternating:
  (shards)   the data position checkpoints held before: the list of shards done (half of them);
  (samples)  the sample-exact record: the rank's bitmap over all samples of the epoch packed and OR-ed across
             ranks (an all-reduce, here of one rank), the record built from it (shards done, and a bitmap for
             each of the --partial shards in flight), and saved with the checkpoint.
Both write the same model and optimizer state. The table gives medians and the ratio.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from dataclasses import asdict
from datetime import date

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-shards", type=int, default=10_000, help="shards in the epoch")
    parser.add_argument("--samples-per-shard", type=int, default=1250, help="samples in each shard")
    parser.add_argument("--partial", type=int, default=64, help="shards in flight (partly read) at the checkpoint")
    parser.add_argument("--rounds", type=int, default=5, help="timed saves of each kind; the table shows medians")
    parser.add_argument("--preset", default="vit_small_patch16_224", help="the model saved")
    parser.add_argument("--img-size", type=int, default=224)


def run(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from pipeline.benchmarks.train_harness import bench_job, bench_model_args
    from pipeline.data.bad_samples import BadSampleReport
    from pipeline.data.epochs import SampleTally, plan_epoch
    from pipeline.data.shard_set import ShardSet
    from pipeline.train.checkpoint import LoopState, save_checkpoint_collective
    from pipeline.train.context import LocalContext
    from pipeline.train.engine import build_engine
    from pipeline.train.objectives import build_objective

    LocalContext(tempfile.mkdtemp(prefix="bench-resume-"))  # the gloo group of one that DeepSpeed joins
    job = bench_job(preset=args.preset, img_size=args.img_size, batch_size_per_worker=8, num_workers=1, zero_stage=2,
                    device="cpu", steps=10)
    model_args = bench_model_args(args.preset, args.img_size, num_classes=1000)
    engine, _ = build_engine(job, build_objective(job, model_args), 1, torch.device("cpu"))
    uris = [f"s3://bucket/imagenet/train-{i:06d}.tar" for i in range(args.num_shards)]
    shards = ShardSet(spec="s3://bucket/imagenet/train-{000000..}.tar", uris=uris,
                      counts=[args.samples_per_shard] * args.num_shards, classes=[str(i) for i in range(1000)])
    plan = plan_epoch(shards, 0, None, seed=0, world_size=1, batch_size=256)
    tally = SampleTally(plan)
    half, n = args.num_shards // 2, args.samples_per_shard
    tally.add(np.repeat(np.arange(half), n), np.tile(np.arange(n), half))  # half the shards consumed
    rng = np.random.default_rng(0)
    for shard in range(half, half + args.partial):  # the shards in flight: a random part of each
        taken = rng.choice(n, size=int(rng.integers(1, n)), replace=False)
        tally.add(np.full(len(taken), shard), taken)

    def save(state: LoopState) -> None:
        with tempfile.TemporaryDirectory(prefix="bench-checkpoint-") as directory:
            save_checkpoint_collective(engine, directory, rank=0, state=state, model_config={"model_args": model_args})

    def shards_only() -> float:
        start = time.perf_counter()
        save(LoopState(step=1000, epoch=0, shards_done=uris[:half], world_size=1))
        return time.perf_counter() - start

    def sample_exact() -> float:
        start = time.perf_counter()
        packed = torch.from_numpy(tally.packed())
        dist.all_reduce(packed, op=dist.ReduceOp.BOR)
        state = LoopState(step=1000, world_size=1)
        state.set_epoch_record(tally.record(packed.numpy()))
        state.bad_samples = asdict(BadSampleReport())
        save(state)
        return time.perf_counter() - start

    shards_only(), sample_exact()  # warm: first-save allocations
    times = {"shards": [], "samples": []}
    for _ in range(args.rounds):
        times["shards"].append(shards_only())
        times["samples"].append(sample_exact())
    record = tally.record(tally.packed())
    old, new = statistics.median(times["shards"]), statistics.median(times["samples"])
    params = sum(p.numel() for p in engine.module.parameters())
    print(f"\n`python jobs/benchmark.py resume --num-shards {args.num_shards} --samples-per-shard "
          f"{args.samples_per_shard} --partial {args.partial} --rounds {args.rounds} --preset {args.preset} "
          f"--img-size {args.img_size}` on {platform.node()} ({platform.processor() or platform.machine()}), "
          f"{date.today().isoformat()}; model {params / 1e6:.2f} M params, ZeRO-2, 1 rank\n")
    print("| checkpoint | data position saved | save time (median) |")
    print("|---|---|---|")
    print(f"| (shards) before | {half:,} shards done | {old * 1000:.0f} ms |")
    print(f"| (samples) sample-exact | {len(record.done):,} shards done + {len(record.partial)} bitmaps of "
          f"{n + 1} bits, from a {len(tally.bytes) / 2**20:.1f} MiB OR-ed bitmap | {new * 1000:.0f} ms |")
    print(f"| ratio | | {new / old:.3f} |")
