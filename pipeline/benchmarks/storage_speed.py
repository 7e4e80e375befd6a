"""Shards on an S3 endpoint against the same shards on local disk, side by side in one run.

    python jobs/benchmark.py storage                      # a moto S3 server on 127.0.0.1, started and stopped here
    python jobs/benchmark.py storage --use-configured-endpoint --bucket B   # the store AWS_ENDPOINT_URL names

The data benchmark's ImageNet-like shards (JPEGs of about 500x375 at quality 90) are written to a local folder
and copied to the bucket. Each contender in turn has an untimed warm-up, then --rounds rounds of one run on the
local copy and one on the S3 copy (local first in odd rounds, S3 first in even ones, so that a drift of the
machine's load favours neither):
  (data)     one epoch of the training input pipeline alone, as the trainer builds it (build_image_dataset with
             train=True: read, decode, RandomResizedCrop and flip in Ray Data tasks), iterated in batches;
  (pretrain) a short real pretrain (run_job: Ray Train, DeepSpeed ZeRO-2, 2 CPU workers, the demo ViT at
             --img-size), whose train/images_per_s is averaged over its logging windows after the first.
The table gives each one's median images/s, the median of the per-round S3/local ratios (goal >= 0.9), and the
CPU time the endpoint itself spent serving each S3 run: a local server takes it from the cores the run uses.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path

MODES = ("data", "pretrain")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--num-images", type=int, default=2000, help="JPEGs in the benchmark shards")
    parser.add_argument("--shard-size", type=int, default=100, help="images per shard")
    parser.add_argument("--img-size", type=int, default=32, help="output side in pixels (the demo ViT's)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch, and the pretrain's global batch")
    parser.add_argument("--pretrain-steps", type=int, default=40, help="optimizer steps of each pretrain run")
    parser.add_argument("--log-every", type=int, default=5, help="steps per logging window of the pretrain runs")
    parser.add_argument("--ray-cpus", type=int, default=2 * (os.cpu_count() or 1),
                        help="logical CPUs of the local Ray (when none is running)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of local then S3; the table shows medians")
    parser.add_argument("--bucket", default="vit-bench", help="bucket for the S3 copy")
    parser.add_argument("--use-configured-endpoint", action="store_true",
                        help="use the store AWS_ENDPOINT_URL names instead of a moto server of our own")
    parser.add_argument("--workdir", default="", help="folder for the local copy and the runs (default: temporary)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated images")


def data_epoch(spec: str, args: argparse.Namespace) -> float:
    """Images/s of one epoch of the training input pipeline over `spec`."""
    from pipeline.benchmarks.data_speed import _iterate, train_dataset
    from pipeline.config import DataConfig

    dataset = train_dataset(spec, DataConfig(img_size=args.img_size))
    return _iterate(dataset.iter_torch_batches(batch_size=args.batch_size, device="cpu"))


def pretrain(spec: str, workdir: str, args: argparse.Namespace) -> float:
    """Mean train/images_per_s of a short pretrain on `spec`, over its logging windows after the first (which
    holds the start of the data stream)."""
    from mlflow import MlflowClient

    from pipeline.config import load_job_config
    from pipeline.train.launch import run_job
    from pipeline.train.resolved_job import resolve_job

    config = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "digits_pretrain.yaml"
    uri = f"sqlite:///{workdir}/mlflow.db"
    run, _ = resolve_job(load_job_config(config, [
        f"data.train={spec}", "data.val=", f"data.img_size={args.img_size}", "data.hflip=0.5",
        f"train.steps={args.pretrain_steps}", f"train.global_batch_size={args.batch_size}",
        f"train.log_every_n_steps={args.log_every}", "train.eval_every_n_steps=0",
        "train.checkpoint_every_n_steps=0", f"train.storage_path={workdir}/runs", f"tracking.uri={uri}",
        "tracking.experiment=storage-bench", "tracking.log_weights=false"]), "pretrain")
    result = run_job(run)
    windows = sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(result.run_id,
                                                                                   "train/images_per_s"))
    return statistics.mean(value for _, value in windows[1:])


def run(args: argparse.Namespace) -> dict:
    import pyarrow.fs as pafs
    import ray

    from pipeline import storage
    from pipeline.benchmarks.data_speed import build_bench_shards
    from pipeline.benchmarks.s3_endpoint import s3_endpoint

    modes = [mode for mode in args.modes.split(",") if mode]
    if not modes or set(modes) - set(MODES):
        raise SystemExit(f"--modes takes {', '.join(MODES)}, got {args.modes!r}")
    workdir = args.workdir or tempfile.mkdtemp(prefix="storage-bench-")
    try:
        with s3_endpoint(args.bucket, use_configured=args.use_configured_endpoint) as endpoint:
            env = endpoint.env
            local = os.path.join(workdir, "shards")
            shards = build_bench_shards(local, args.num_images, args.shard_size, args.seed)
            remote = f"s3://{args.bucket}/storage-bench-{os.getpid()}"
            fs, path = storage.resolve(remote)
            pafs.copy_files(local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs,
                            use_threads=True)
            megabytes = sum(os.path.getsize(s) for s in shards) / 2**20
            print(f"{args.num_images} JPEGs in {len(shards)} shards ({megabytes:.0f} MiB), local and at {remote} "
                  f"({env['AWS_ENDPOINT_URL']})", flush=True)
            started = not ray.is_initialized()
            if started:  # after s3_endpoint: the workers inherit its settings
                ray.init(num_cpus=args.ray_cpus, include_dashboard=False, configure_logging=False,
                         log_to_driver=False)
            ray.data.DataContext.get_current().enable_progress_bars = False
            specs = {"local": f"{local}/bench-*.tar", "s3": f"{remote}/bench-*.tar"}
            contenders = {"data": lambda spec: data_epoch(spec, args),
                          "pretrain": lambda spec: pretrain(spec, workdir, args)}
            samples = {(mode, where): [] for mode in modes for where in specs}
            server_cpu_s = {mode: [] for mode in modes}  # the endpoint's CPU, on these same cores, per S3 run
            try:
                for mode in modes:
                    contenders[mode](specs["local"])  # warm-up: decode and Train workers, imports, comm ops
                    for r in range(args.rounds):
                        for where in (("local", "s3") if r % 2 == 0 else ("s3", "local")):
                            before = endpoint.cpu_s()
                            samples[(mode, where)].append(contenders[mode](specs[where]))
                            if where == "s3":
                                server_cpu_s[mode].append(endpoint.cpu_s() - before)
                        print(f"{mode} round {r + 1}/{args.rounds}: local {samples[(mode, 'local')][-1]:.0f}, "
                              f"s3 {samples[(mode, 's3')][-1]:.0f} images/s", flush=True)
            finally:
                if started:
                    ray.shutdown()
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    results = {}
    print(f"\nShards on an S3 endpoint against local disk, {args.img_size} px; {platform.machine()} "
          f"{os.cpu_count()} cores, {date.today().isoformat()}")
    print("| contender | local images/s | S3 images/s | S3 / local (median of rounds) | endpoint CPU s per S3 run |\n"
          "|---|---|---|---|---|")
    for mode in modes:
        local_values, s3_values = samples[(mode, "local")], samples[(mode, "s3")]
        ratio = statistics.median(s / loc for s, loc in zip(s3_values, local_values, strict=True))
        results[mode] = {"local": statistics.median(local_values), "s3": statistics.median(s3_values),
                         "ratio": ratio, "server_cpu_s": statistics.median(server_cpu_s[mode])}
        print(f"| ({mode}) | {results[mode]['local']:.0f} | {results[mode]['s3']:.0f} | **{ratio:.2f}** | "
              f"{results[mode]['server_cpu_s']:.1f} |")
    print(f"\ncommand: python jobs/benchmark.py storage {' '.join(sys.argv[2:])}".rstrip())
    return results
