"""GPU step: images/s and MFU of the trainer's step for ViT-B/16 at 224 in bf16 under DeepSpeed (ZeRO-2 by default).

One Ray Train worker with one GPU runs warm-up steps, then timed ones. MFU = 3 x `flops_per_image` x images/s /
peak bf16 FLOP/s (backward ~ 2 x forward; pipeline/train/flops.py, which the training loop uses too). The peak
comes from a table of known cards keyed by `torch.cuda.get_device_name()`, or `--peak-tflops`. With `--device cpu`
the same path runs on the CPU (fp32), which is how it is tested without a GPU.

`measure_gpu` may be called several times in one Ray session, each with its own ZeRO stage and `train.compile`
setting; it returns the warm-up's wall time beside the timed steps, which with compile on holds the compile.
"""

import argparse
import statistics
import uuid

import torch

from pipeline.benchmarks.train_harness import (
    EngineLoop,
    bench_job,
    bench_model_args,
    report_json,
    run_steps,
    run_workers,
)
from pipeline.config import JobConfig, config_from_dict
from pipeline.train.flops import achieved_flops, mfu, model_flops_per_image, peak_flops


def step_times_per_worker(config: dict) -> None:
    """Ray Train worker (gpu mode): the trainer's engine and step, warm-up then timed steps, reported."""
    import ray.train

    from pipeline.train.engine import resolve_device

    if config["threads"]:
        torch.set_num_threads(config["threads"])
    job = config_from_dict(JobConfig, config["job"])
    context = ray.train.get_context()
    device = resolve_device(job, context.get_local_rank())
    loop = EngineLoop(job, config["model_args"], context.get_world_size(), device, config["seed"])
    warmup_times_s, warmup_losses = run_steps(loop, config["warmup"])
    times_s, losses = run_steps(loop, config["steps"])
    result = {"step_times_s": times_s, "losses": losses, "warmup_step_times_s": warmup_times_s,
              "warmup_losses": warmup_losses, "dtype": str(loop.dtype).removeprefix("torch."),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    report_json(result, context.get_world_rank())


def measure_gpu(args: argparse.Namespace, storage_path: str, *, zero_stage: int | None = None,
                compile: bool = False) -> dict:
    """One Ray Train run of the trainer's step at ZeRO `zero_stage` (default `--gpu-zero-stage`), compiled or not:
    the worker's step times (s), losses, dtype and device, with the median step, images/s, forward FLOPs per
    image, the achieved and peak FLOP/s, the MFU, and the warm-up's wall time (`warmup_s`; with `compile`, the first
    step's `first_step_s` holds the compile)."""
    use_gpu = args.device == "cuda"
    if use_gpu and not torch.cuda.is_available():
        raise SystemExit("gpu mode needs CUDA here (or --device cpu to check the harness on the CPU)")
    zero_stage = args.gpu_zero_stage if zero_stage is None else zero_stage
    model_args = bench_model_args(args.gpu_preset, args.gpu_img_size, args.num_classes)
    job = bench_job(preset=args.gpu_preset, img_size=args.gpu_img_size, batch_size_per_worker=args.gpu_batch_size,
                    num_workers=1, zero_stage=zero_stage, device=args.device,
                    steps=args.gpu_warmup + args.gpu_steps, compile=compile)
    forward_flops = model_flops_per_image(model_args)
    config = {"job": job.to_dict(), "model_args": model_args, "seed": 0, "warmup": args.gpu_warmup,
              "steps": args.gpu_steps, "threads": 0 if use_gpu else args.cores}
    result = run_workers(step_times_per_worker, config, num_workers=1, cpus_per_worker=1 if use_gpu else args.cores,
                         use_gpu=use_gpu, storage_path=storage_path,  # a new name: the same one would resume
                         name=f"gpu-zero{zero_stage}-{'compiled' if compile else 'eager'}-{uuid.uuid4().hex[:8]}")[0]
    step_s = statistics.median(result["step_times_s"])
    images_per_s = args.gpu_batch_size / step_s
    peak = peak_flops(result["device_name"], args.peak_tflops)  # None for a card the table does not know
    warmup = result["warmup_step_times_s"]
    return {**result, "zero_stage": zero_stage, "compile": compile, "median_step_s": step_s,
            "images_per_s": images_per_s, "forward_flops": forward_flops,
            "achieved_flops": achieved_flops(forward_flops, images_per_s), "peak_flops": peak,
            "mfu": mfu(forward_flops, images_per_s, peak) if peak else None, "warmup_s": sum(warmup),
            "first_step_s": warmup[0] if warmup else None}


def print_gpu(args: argparse.Namespace, result: dict) -> None:
    print(f"\n### GPU: {args.gpu_preset} at {args.gpu_img_size} px, {result['dtype']}, DeepSpeed ZeRO-"
          f"{result['zero_stage']}{', compiled' if result['compile'] else ''}, batch {args.gpu_batch_size}, 1 Ray "
          f"Train worker, {args.gpu_warmup} warm-up + {args.gpu_steps} timed steps")
    print("| device | warm-up (s) | median step (ms) | img/s | fwd GFLOPs/img | achieved TFLOP/s | peak TFLOP/s "
          "| MFU |")
    print("|---|---|---|---|---|---|---|---|")
    peak = (f"{result['peak_flops'] / 1e12:.0f} | **{100 * result['mfu']:.1f} %**" if result["peak_flops"] else
            "unknown card: pass --peak-tflops | –")
    print(f"| {result['device_name']} | {result['warmup_s']:.1f} | {result['median_step_s'] * 1e3:.1f} | "
          f"{result['images_per_s']:.1f} | {result['forward_flops'] / 1e9:.2f} | "
          f"{result['achieved_flops'] / 1e12:.1f} | {peak} |")
    if "peak_memory_gib" in result:
        print(f"peak GPU memory allocated: {result['peak_memory_gib']:.1f} GiB")
