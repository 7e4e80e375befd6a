"""Forward+backward step time of our ViT against timm's, same arguments, weights, batch and size, in one process.

The two models run interleaved (ABBA order, so neither always runs first) after a warm-up, and the table
gives each one's median step time and the ratio ours / timm (below 1.0 means ours is faster).

With `--compile` the contenders are our model eager and the same model compiled in place with `torch.compile`
(inductor; what `train.compile=true` does), same weights, and the ratio is compiled / eager. The table gives each
one's first step: the compiled model's is its compile time (the graph capture and the code generation of forward
and backward, then the step). With `--zero-stage N` as well, each contender is the trainer's whole step instead
(`build_engine` + `train_step`: DeepSpeed ZeRO-N in this one process, AdamW, clipping, the schedule), eager
against `train.compile=true`.
"""

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.benchmarks import free_port
from pipeline.model import build_model, preset_kwargs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="vit_small_patch16_224", help="model preset (pipeline.model.PRESETS)")
    parser.add_argument("--img-size", type=int, default=224, help="square input size in pixels")
    parser.add_argument("--global-pool", choices=("token", "avg"), default="token",
                        help="pooling: 'token' lets our last block skip the patch rows, 'avg' runs every token")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model before timing (at least 1)")
    parser.add_argument("--iters", type=int, default=20, help="timed steps per model")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="autocast dtype (bf16 needs a GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads on the CPU")
    parser.add_argument("--compile", action="store_true",
                        help="time our model eager against our model compiled with torch.compile, instead of timm's")
    parser.add_argument("--zero-stage", type=int, choices=(-1, 0, 1, 2, 3), default=-1,
                        help="with --compile: time the trainer's whole step under DeepSpeed ZeRO at this stage (one "
                             "process) instead of the bare model's forward+backward; -1 times the bare model")


def build_pair(preset: str, img_size: int, device: str, global_pool: str = "token") -> tuple[nn.Module, nn.Module]:
    """Our preset model and timm's VisionTransformer with the same arguments and the same weights."""
    try:
        from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
    except ImportError as err:  # timm is a dev dependency
        raise SystemExit("the model benchmark compares against timm: pip install -e '.[dev]'") from err
    kwargs = preset_kwargs(preset, img_size=img_size, global_pool=global_pool)
    ours = build_model(preset, img_size=img_size, global_pool=global_pool)
    theirs = TimmVisionTransformer(**kwargs)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours.to(device).train(), theirs.to(device).train()


def build_compiled_pair(preset: str, img_size: int, device: str, global_pool: str = "token"
                        ) -> tuple[nn.Module, nn.Module]:
    """Our preset model eager, and a copy with the same weights compiled in place (its state_dict keys unchanged)."""
    eager = build_model(preset, img_size=img_size, global_pool=global_pool)
    compiled = build_model(preset, img_size=img_size, global_pool=global_pool)
    compiled.load_state_dict(eager.state_dict(), strict=True)
    compiled.compile()
    return eager.to(device).train(), compiled.to(device).train()


def time_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, dtype: str) -> float:
    """Seconds for one forward+backward (gradients cleared first, device synchronised around it)."""
    model.zero_grad(set_to_none=True)
    synchronize(images.device)
    start = time.perf_counter()
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        loss = F.cross_entropy(model(images), labels)
    loss.backward()
    synchronize(images.device)
    return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_steps(args: argparse.Namespace) -> dict[str, Callable[[], float]]:
    """name -> one timed forward+backward of that model, on one batch."""
    pair = (build_compiled_pair if args.compile else build_pair)(args.preset, args.img_size, args.device,
                                                                args.global_pool)
    models = dict(zip(("eager", "compiled") if args.compile else ("ours", "timm"), pair, strict=True))
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=args.device)
    labels = torch.randint(0, pair[0].num_classes, (args.batch_size,), device=args.device)
    return {name: (lambda model=model: time_step(model, images, labels, args.dtype)) for name, model in models.items()}


def engine_steps(args: argparse.Namespace) -> dict[str, Callable[[], float]]:
    """name -> one timed optimizer step of the trainer's engine, eager and with train.compile=true, in this
    process (a process group of one)."""
    from pipeline.benchmarks.train_harness import bench_job, bench_model_args, make_batch
    from pipeline.train.engine import use_cpu_deepspeed

    device = torch.device(args.device)
    if device.type == "cpu":
        use_cpu_deepspeed()
    import torch.distributed as dist

    from pipeline.train.engine import build_engine, train_step
    from pipeline.train.objectives import build_objective

    if not dist.is_initialized():
        port = free_port()
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    num_classes = preset_kwargs(args.preset).get("num_classes", 1000)  # the bare model's: VisionTransformer's default
    model_args = {**bench_model_args(args.preset, args.img_size, num_classes), "global_pool": args.global_pool}
    steps = {}
    for name, compile in (("eager", False), ("compiled", True)):
        job = bench_job(preset=args.preset, img_size=args.img_size, batch_size_per_worker=args.batch_size,
                        num_workers=1, zero_stage=args.zero_stage, device=device.type,
                        steps=args.warmup + args.iters + 1, precision=args.dtype, compile=compile)
        objective = build_objective(job, model_args)
        engine, dtype = build_engine(job, objective, 1, device)  # the same seeded initial weights
        images, labels = make_batch(args.batch_size, args.img_size, num_classes, 0, device, dtype)

        def step(engine=engine, objective=objective, images=images, labels=labels) -> float:
            synchronize(device)
            start = time.perf_counter()
            train_step(engine, objective, images, labels, micro_batch=args.batch_size, accum=1)
            synchronize(device)
            return time.perf_counter() - start

        steps[name] = step
    return steps


def run(args: argparse.Namespace) -> dict:
    if args.zero_stage >= 0 and not args.compile:
        raise SystemExit("--zero-stage times the trainer's step eager against compiled: add --compile")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    steps = engine_steps(args) if args.zero_stage >= 0 else model_steps(args)
    names = ("compiled", "eager") if args.compile else ("ours", "timm")
    first_step_s = {name: step() for name, step in steps.items()}
    for _ in range(args.warmup - 1):
        for step in steps.values():
            step()
    step_times_s = {name: [] for name in steps}
    for i in range(args.iters):
        for name in names if i % 2 == 0 else names[::-1]:
            step_times_s[name].append(steps[name]())

    median_s = {name: statistics.median(times) for name, times in step_times_s.items()}
    top, bottom = names
    ratio = median_s[top] / median_s[bottom]
    pair_ratio = statistics.median(a / b for a, b in zip(step_times_s[top], step_times_s[bottom], strict=True))
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.machine()} CPU"
    what = (f"the trainer's step (DeepSpeed ZeRO-{args.zero_stage}, AdamW, 1 process)" if args.zero_stage >= 0
            else "forward+backward")
    print(f"command: python jobs/benchmark.py model {' '.join(sys.argv[2:])}".rstrip())
    print(f"machine: {device}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads; "
          f"date {date.today()}")
    print(f"config: {args.preset} at {args.img_size} px, {args.global_pool} pool, batch {args.batch_size}, "
          f"{args.dtype}, {what}, {max(args.warmup, 1)} warm-up + {args.iters} timed steps each, interleaved")
    print("| model | first step (s) | median step (ms) | img/s |")
    print("|---|---|---|---|")
    for name, seconds in median_s.items():
        print(f"| {name} | {first_step_s[name]:.1f} | {seconds * 1e3:.1f} | {args.batch_size / seconds:.1f} |")
    print(f"ratio {top} / {bottom} (medians): {ratio:.3f}; median of per-pair ratios: {pair_ratio:.3f}")
    result = {"median_step_s": median_s, "first_step_s": first_step_s, "ratio": ratio, "pair_ratio": pair_ratio}
    if args.compile:
        # the first compiled step less an eager one: what compiling cost on top of the step itself
        result["compile_s"] = first_step_s["compiled"] - median_s["eager"]
        print(f"compile time: first compiled step {first_step_s['compiled']:.1f} s, "
              f"{result['compile_s']:.1f} s more than an eager step")
    return result
