"""GPU step: images/s and MFU of the trainer's step for ViT-B/16 at 224 in bf16 under DeepSpeed (ZeRO-2 by default).

One Ray Train worker with one GPU runs warm-up steps, then timed ones. MFU = 3 x `flops_per_image` x images/s /
peak bf16 FLOP/s (backward ~ 2 x forward). The peak comes from a table of known cards keyed by
`torch.cuda.get_device_name()`, or `--peak-tflops`. With `--device cpu` the same path runs on the CPU (fp32),
which is how it is tested without a GPU.
"""

import argparse
import statistics

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

# dense bf16 peak FLOP/s by a substring of torch.cuda.get_device_name(); the longest matching key wins
PEAK_BF16_FLOPS = {
    "H100": 989e12,  # SXM ("NVIDIA H100 80GB HBM3")
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
}


def peak_flops(device_name: str, peak_tflops: float = 0.0) -> float:
    """Peak dense bf16 FLOP/s: `peak_tflops` when given, else the longest key of the table in `device_name`."""
    if peak_tflops > 0:
        return peak_tflops * 1e12
    matches = [key for key in PEAK_BF16_FLOPS if key.lower() in device_name.lower()]
    if not matches:
        raise ValueError(f"no peak bf16 FLOP/s known for {device_name!r}; pass --peak-tflops")
    return PEAK_BF16_FLOPS[max(matches, key=len)]


def mfu(forward_flops_per_image: float, images_per_s: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: forward + backward (~3 x forward) FLOPs per second over the peak."""
    return 3 * forward_flops_per_image * images_per_s / peak_flops_per_s


def step_times_per_worker(config: dict) -> None:
    """Ray Train worker (gpu mode): the trainer's engine and step, warm-up then timed steps, reported."""
    import ray.train

    from pipeline.train.loop import resolve_device

    if config["threads"]:
        torch.set_num_threads(config["threads"])
    job = config_from_dict(JobConfig, config["job"])
    context = ray.train.get_context()
    device = resolve_device(job, context.get_local_rank())
    loop = EngineLoop(job, config["model_args"], context.get_world_size(), device, config["seed"])
    run_steps(loop, config["warmup"])
    times_s, losses = run_steps(loop, config["steps"])
    result = {"step_times_s": times_s, "losses": losses, "dtype": str(loop.dtype).removeprefix("torch."),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    report_json(result, context.get_world_rank())


def measure_gpu(args: argparse.Namespace, storage_path: str) -> dict:
    """The worker's step times (s), losses, dtype and device, with the median step, images/s, forward FLOPs per
    image, the peak FLOP/s and the MFU."""
    from pipeline.model import build_model, flops_per_image

    use_gpu = args.device == "cuda"
    if use_gpu and not torch.cuda.is_available():
        raise SystemExit("gpu mode needs CUDA here (or --device cpu to check the harness on the CPU)")
    model_args = bench_model_args(args.gpu_preset, args.gpu_img_size, args.num_classes)
    job = bench_job(preset=args.gpu_preset, img_size=args.gpu_img_size, batch_size_per_worker=args.gpu_batch_size,
                    num_workers=1, zero_stage=args.gpu_zero_stage, device=args.device,
                    steps=args.gpu_warmup + args.gpu_steps)
    forward_flops = flops_per_image(build_model(args.gpu_preset, img_size=args.gpu_img_size,
                                                num_classes=args.num_classes))
    config = {"job": job.to_dict(), "model_args": model_args, "seed": 0, "warmup": args.gpu_warmup,
              "steps": args.gpu_steps, "threads": 0 if use_gpu else args.cores}
    result = run_workers(step_times_per_worker, config, num_workers=1, cpus_per_worker=1 if use_gpu else args.cores,
                         use_gpu=use_gpu, storage_path=storage_path, name="gpu")[0]
    step_s = statistics.median(result["step_times_s"])
    images_per_s = args.gpu_batch_size / step_s
    peak = peak_flops(result["device_name"], args.peak_tflops)
    return {**result, "median_step_s": step_s, "images_per_s": images_per_s, "forward_flops": forward_flops,
            "peak_flops": peak, "mfu": mfu(forward_flops, images_per_s, peak)}


def print_gpu(args: argparse.Namespace, result: dict) -> None:
    print(f"\n### GPU: {args.gpu_preset} at {args.gpu_img_size} px, {result['dtype']}, DeepSpeed ZeRO-"
          f"{args.gpu_zero_stage}, batch {args.gpu_batch_size}, 1 Ray Train worker, {args.gpu_warmup} warm-up + "
          f"{args.gpu_steps} timed steps")
    print("| device | median step (ms) | img/s | fwd GFLOPs/img | achieved TFLOP/s | peak TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|")
    achieved = 3 * result["forward_flops"] * result["images_per_s"]
    print(f"| {result['device_name']} | {result['median_step_s'] * 1e3:.1f} | {result['images_per_s']:.1f} | "
          f"{result['forward_flops'] / 1e9:.2f} | {achieved / 1e12:.1f} | {result['peak_flops'] / 1e12:.0f} | "
          f"**{100 * result['mfu']:.1f} %** |")
    if "peak_memory_gib" in result:
        print(f"peak GPU memory allocated: {result['peak_memory_gib']:.1f} GiB")
