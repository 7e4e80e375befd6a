"""The GPU machine's figures in one run and one table, for a node with one GPU and 16 CPU cores (under 8 min):

    python jobs/benchmark.py gpu

1. the trainer's step, ViT-B/16 at 224 in bf16 on one GPU: images/s and MFU at each of --zero-stages, eager
   and compiled (`gpu_step.measure_gpu`: one Ray Train worker each; the compile is in the warm-up, reported);
2. JPEG decode on the GPU (data.decode_device=gpu, `decode_speed.measure_device`) against the CPU task path on
   one core, on the data benchmark's images;
3. the data benchmark's (a)/(b) and (a)/(c) with --cores (`data_speed.measure`, --rounds interleaved rounds);
4. decode scaling: the Ray Data pipeline capped at 1, 2, 4 and 8 CPUs (`ExecutionResources`), images/s and
   the efficiency against 1 task x N.

One local Ray (with --ray-cpus logical CPUs, GPUs detected) serves every part. `--device cpu` with tiny sizes
runs the same script on a machine without a GPU (the step in fp32, the decode on the CPU), which is how it is
tested; its figures then say nothing about GPUs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date

import torch

from pipeline.benchmarks import data_speed, decode_speed, gpu_step, train_speed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cores = os.cpu_count() or 1
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="the step's device; cpu runs the script's path without a GPU")
    parser.add_argument("--preset", default="vit_base_patch16_224", help="step: model preset")
    parser.add_argument("--img-size", type=int, default=224, help="step and data: input side in pixels")
    parser.add_argument("--batch-size", type=int, default=256, help="step: images per step on the GPU")
    parser.add_argument("--zero-stages", default="1,2", help="step: ZeRO stages, each eager and compiled")
    parser.add_argument("--compile", default="off,on", help="step: eager (off) and/or compiled (on)")
    parser.add_argument("--warmup", type=int, default=5, help="step: untimed steps (the compile happens here)")
    parser.add_argument("--steps", type=int, default=20, help="step: timed steps")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="step: peak dense TFLOP/s; 0 looks it up")
    parser.add_argument("--num-classes", type=int, default=1000, help="step: classifier outputs")
    parser.add_argument("--cores", type=int, default=min(cores, 16), help="data: CPUs for (a), workers for (b)")
    parser.add_argument("--ray-cpus", type=int, default=2 * cores, help="logical CPUs of the local Ray")
    parser.add_argument("--num-images", type=int, default=4000, help="data: JPEGs in the benchmark shards")
    parser.add_argument("--shard-size", type=int, default=200, help="data: images per shard")
    parser.add_argument("--data-batch-size", type=int, default=64, help="data: images per batch")
    parser.add_argument("--rounds", type=int, default=2, help="data and decode: timed rounds (medians)")
    parser.add_argument("--decode-images", type=int, default=1024, help="decode: images of the device comparison")
    parser.add_argument("--decode-batch-size", type=int, default=256, help="decode: rows per device batch")
    parser.add_argument("--scaling", default="1,2,4,8", help="decode scaling: the CPU caps, 1 first")
    parser.add_argument("--workdir", default="", help="folder for the shards (default: a temporary one, removed)")


def suite_args(module, **values) -> argparse.Namespace:
    """Another suite's arguments: its defaults, with `values` in place."""
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    args = parser.parse_args([])
    for key, value in values.items():
        setattr(args, key, value)
    return args


def csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def measure_steps(args: argparse.Namespace, storage_path: str) -> list[dict]:
    step_args = suite_args(train_speed, gpu_preset=args.preset, gpu_img_size=args.img_size,
                           gpu_batch_size=args.batch_size, gpu_warmup=args.warmup, gpu_steps=args.steps,
                           device=args.device, peak_tflops=args.peak_tflops, num_classes=args.num_classes,
                           cores=args.cores)
    flags = {"off": False, "on": True}
    compiles = [flags[c.strip()] for c in args.compile.split(",") if c.strip()]
    results = []
    for stage in csv_ints(args.zero_stages):
        for compiled in compiles:
            start = time.perf_counter()
            result = gpu_step.measure_gpu(step_args, storage_path, zero_stage=stage, compile=compiled)
            result["wall_s"] = time.perf_counter() - start
            print(f"step ZeRO-{stage} {'compiled' if compiled else 'eager'}: {result['images_per_s']:.0f} img/s, "
                  f"warm-up {result['warmup_s']:.1f} s", flush=True)
            results.append(result)
    return results


def measure_scaling(shards: list[str], args: argparse.Namespace) -> dict[int, float]:
    """Images/s of one epoch of the pipeline capped at each CPU count (after one warm-up epoch each)."""
    caps = csv_ints(args.scaling)
    pipelines = {cap: data_speed.ray_pipeline(shards, args.img_size, args.data_batch_size, max_cpus=cap)
                 for cap in caps}
    samples: dict[int, list[float]] = {cap: [] for cap in caps}
    for fn in pipelines.values():
        fn()
    for _ in range(args.rounds):
        for cap, fn in pipelines.items():
            samples[cap].append(fn())
    return {cap: statistics.median(v) for cap, v in samples.items()}


def run(args: argparse.Namespace) -> dict:
    import ray

    started = time.perf_counter()
    owns_ray = not ray.is_initialized()
    if owns_ray:
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    workdir = args.workdir or tempfile.mkdtemp(prefix="gpu-bench-")
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        with tempfile.TemporaryDirectory(prefix="gpu-bench-runs-") as storage_path:
            steps = measure_steps(args, storage_path)
        decode = decode_speed.measure_device(suite_args(decode_speed, num_images=args.decode_images,
                                                        batch_size=args.decode_batch_size, img_size=args.img_size,
                                                        rounds=args.rounds))
        print(f"decode: {decode['device_rate']:.0f} img/s on {decode['device']}, {decode['cpu_rate']:.0f} on one "
              "core", flush=True)
        shards = data_speed.build_bench_shards(os.path.join(workdir, "shards"), args.num_images, args.shard_size, 0)
        data_args = suite_args(data_speed, num_images=args.num_images, img_size=args.img_size,
                               batch_size=args.data_batch_size, cores=args.cores, ray_cpus=args.ray_cpus,
                               rounds=args.rounds)
        data = data_speed.measure(shards, data_args)
        scaling = measure_scaling(shards, args)
    finally:
        if owns_ray:
            ray.shutdown()
        if not args.workdir:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    results = summarise(steps, decode, data, scaling)
    results["wall_s"] = time.perf_counter() - started
    print_table(args, results)
    return results


def summarise(steps: list[dict], decode: dict, data: dict[str, list[float]], scaling: dict[int, float]) -> dict:
    rounds = list(data.values())
    a, b, c = rounds[0], rounds[2], rounds[3]

    def paired(xs: list[float], ys: list[float]) -> float:
        return statistics.median(x / y for x, y in zip(xs, ys, strict=True))

    first = min(scaling)
    return {"steps": steps, "decode": decode, "a_over_b": paired(a, b), "a_over_c": paired(a, c),
            "data_images_per_s": {name: statistics.median(v) for name, v in data.items()},
            "scaling": {cap: {"images_per_s": rate, "efficiency": rate / (scaling[first] * cap / first)}
                        for cap, rate in scaling.items()}}


def print_table(args: argparse.Namespace, results: dict) -> None:
    device = results["steps"][0]["device_name"] if results["steps"] else args.device
    print(f"\ncommand: python jobs/benchmark.py gpu {' '.join(sys.argv[2:])}".rstrip())
    print(f"machine: {device}, {os.cpu_count()} cores ({platform.machine()}), torch {torch.__version__}; "
          f"date {date.today()}; the whole run {results['wall_s'] / 60:.1f} min")
    print("| figure | measured | goal |\n|---|---|---|")
    for step in results["steps"]:
        mfu = f"{100 * step['mfu']:.1f} % MFU" if step.get("mfu") is not None else "MFU: unknown peak"
        goal = ">= 45 % MFU (compiled)" if step["compile"] else "-"
        print(f"| {args.preset} {args.img_size} {step['dtype']} step, ZeRO-{step['zero_stage']}, "
              f"{'compiled' if step['compile'] else 'eager'}, batch {args.batch_size} | "
              f"{step['images_per_s']:.0f} img/s, {mfu}, {step['achieved_flops'] / 1e12:.1f} TFLOP/s; "
              f"warm-up {step['warmup_s']:.1f} s | {goal} |")
    decode = results["decode"]
    print(f"| JPEG decode + crop + resize on {decode['device']}, batches of {args.decode_batch_size} | "
          f"{decode['device_rate']:.0f} img/s; {decode['ratio']:.1f}x one CPU core ({decode['cpu_rate']:.0f}) "
          f"| >= 10x one core |")
    print(f"| data (a)/(b), {args.cores} cores | {results['a_over_b']:.2f} | >= 1.5 |")
    print(f"| data (a)/(c), {args.cores} cores | {results['a_over_c']:.2f} | >= 0.8 |")
    for cap, row in results["scaling"].items():
        goal = ">= 90 %" if cap == max(results["scaling"]) and cap > 1 else "-"
        print(f"| decode scaling, pipeline capped at {cap} CPUs | {row['images_per_s']:.0f} img/s, "
              f"{100 * row['efficiency']:.0f} % of {cap} x the 1-CPU rate | {goal} |")
