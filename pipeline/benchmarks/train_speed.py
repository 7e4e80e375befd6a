"""Training step: Ray Train + DeepSpeed against a plain torch loop, per-rank ZeRO state bytes, GPU img/s and MFU.

Three modes, all built from the trainer's own pieces (`build_engine`, `train_step`, `build_optimizer`); each
module's docstring gives its method in full:

overhead (CPU; `train_overhead`)
    The median optimizer-step time of Ray Train + DeepSpeed with 1 worker at ZeRO-0 and ZeRO-2, against a
    plain torch loop in this process (no Ray, no DeepSpeed), same weights, batch, optimizer and threads, the
    contenders timed step by step in alternating order.

memory (CPU, 2 ranks; `zero_memory`)
    The bytes of model state each rank holds with ZeRO-0/1/2/3, in fp32 and bf16, counted after one optimizer
    step and the next backward: params, grads, optimizer state, and DeepSpeed's communication buckets apart.

gpu (`--gpu`, the default when CUDA is present; `gpu_step`)
    ViT-B/16 at 224 in bf16 under DeepSpeed (ZeRO-2 by default), 1 Ray Train worker with one GPU: images/s
    and MFU. With `--device cpu` the same path runs on the CPU (fp32), which is how it is tested without a GPU.

The modes share `train_harness` (the job, the batch, the trainer's engine loop, one Ray Train run); this module
holds the flags, the local Ray and the order the modes run in.
"""

import argparse
import os
import platform
import sys
import tempfile
from datetime import date

import torch

from pipeline.benchmarks import chosen_modes
from pipeline.benchmarks.gpu_step import measure_gpu, print_gpu
from pipeline.benchmarks.train_overhead import measure_overhead, print_overhead, summarise_overhead
from pipeline.benchmarks.zero_memory import measure_memory, print_memory, summarise_memory


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cores = os.cpu_count() or 1
    parser.add_argument("--modes", default="",
                        help="comma-separated modes: overhead, memory, gpu; empty means gpu when CUDA is present, "
                             "else overhead,memory")
    parser.add_argument("--gpu", action="store_true", help="run the GPU mode only (same as --modes gpu)")
    parser.add_argument("--preset", default="vit_tiny_patch16_224", help="overhead mode: model preset")
    parser.add_argument("--img-size", type=int, default=224, help="overhead mode: square input size in pixels")
    parser.add_argument("--batch-size", type=int, default=16, help="overhead mode: images per optimizer step")
    parser.add_argument("--warmup", type=int, default=2, help="overhead mode: untimed steps of each contender first")
    parser.add_argument("--steps", type=int, default=1, help="overhead mode: timed steps of each contender per round")
    parser.add_argument("--rounds", type=int, default=24, help="overhead mode: rounds, every contender in each")
    parser.add_argument("--zero-stages", default="0,2", help="overhead mode: ZeRO stages timed under Ray Train")
    parser.add_argument("--cores", type=int, default=cores,
                        help="threads of the plain loop and CPUs (threads) of the Ray worker")
    parser.add_argument("--num-classes", type=int, default=1000, help="classifier outputs of every mode's model")
    parser.add_argument("--memory-preset", default="vit_small_patch16_224", help="memory mode: model preset")
    parser.add_argument("--memory-img-size", type=int, default=224, help="memory mode: input size in pixels")
    parser.add_argument("--memory-batch-size", type=int, default=1, help="memory mode: images per rank per step")
    parser.add_argument("--memory-precisions", default="fp32,bf16",
                        help="memory mode: precisions to count (fp32 is the trainer's CPU default, bf16 its GPU one)")
    parser.add_argument("--gpu-preset", default="vit_base_patch16_224", help="gpu mode: model preset")
    parser.add_argument("--gpu-img-size", type=int, default=224, help="gpu mode: input size in pixels")
    parser.add_argument("--gpu-batch-size", type=int, default=256, help="gpu mode: images per step on the one GPU")
    parser.add_argument("--gpu-zero-stage", type=int, default=2, help="gpu mode: ZeRO stage")
    parser.add_argument("--gpu-compile", action="store_true",
                        help="gpu mode: compile the model (train.compile=true); the warm-up then holds the compile")
    parser.add_argument("--gpu-warmup", type=int, default=10, help="gpu mode: untimed steps")
    parser.add_argument("--gpu-steps", type=int, default=30, help="gpu mode: timed steps")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="gpu mode's device; cpu runs the same path in fp32 (a check of the harness)")
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="gpu mode: peak dense TFLOP/s for MFU; 0 looks the card up in a table of known ones")
    parser.add_argument("--ray-cpus", type=int, default=0,
                        help="logical CPUs of the local Ray this starts (when none is running); 0 means --cores")


def resolve_modes(args: argparse.Namespace) -> list[str]:
    if args.gpu:
        return ["gpu"]
    if args.modes:
        return chosen_modes(args.modes, ("overhead", "memory", "gpu"))
    return ["gpu"] if torch.cuda.is_available() else ["overhead", "memory"]


def print_header(args: argparse.Namespace, device: str) -> None:
    print(f"command: python jobs/benchmark.py train {' '.join(sys.argv[2:])}".rstrip())
    print(f"machine: {device}, {os.cpu_count()} cores, torch {torch.__version__}; date {date.today()}")


def start_local_ray(num_cpus: int) -> None:
    """A local Ray that asks its own dashboard for Ray's state API (`launch.own_dashboard`), quiet."""
    import ray

    from pipeline.train.launch import own_dashboard

    ray.init(num_cpus=num_cpus, configure_logging=False, log_to_driver=False, **own_dashboard())


def run(args: argparse.Namespace) -> dict:
    import ray

    modes = resolve_modes(args)
    owns_ray = not ray.is_initialized()
    if owns_ray:
        start_local_ray(args.ray_cpus or args.cores)
    results: dict = {}
    try:
        with tempfile.TemporaryDirectory(prefix="train-bench-") as storage_path:
            gpu_device = "cpu" if "gpu" not in modes or args.device == "cpu" else torch.cuda.get_device_name()
            print_header(args, gpu_device if gpu_device != "cpu" else f"{platform.machine()} CPU")
            if "overhead" in modes:
                measured = measure_overhead(args, storage_path)
                results["overhead"] = {**measured, **summarise_overhead(measured["times"])}
                print_overhead(args, measured, results["overhead"])
            if "memory" in modes:
                per_rank = measure_memory(args, storage_path)
                results["memory"] = summarise_memory(per_rank)
                print_memory(args, results["memory"], per_rank)
            if "gpu" in modes:
                results["gpu"] = measure_gpu(args, storage_path, compile=args.gpu_compile)
                print_gpu(args, results["gpu"])
    finally:
        if owns_ray:
            ray.shutdown()
    return results
