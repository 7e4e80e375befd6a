"""Forward+backward step time of our ViT against timm's, same arguments, weights, batch and size, in one process.

The two models run interleaved (ABBA order, so neither always runs first) after a warm-up, and the table
gives each one's median step time and the ratio ours / timm (below 1.0 means ours is faster).
"""

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import date

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model import build_model, preset_kwargs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="vit_small_patch16_224", help="model preset (pipeline.model.PRESETS)")
    parser.add_argument("--img-size", type=int, default=224, help="square input size in pixels")
    parser.add_argument("--global-pool", choices=("token", "avg"), default="token",
                        help="pooling: 'token' lets our last block skip the patch rows, 'avg' runs every token")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model before timing")
    parser.add_argument("--iters", type=int, default=20, help="timed steps per model")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="autocast dtype (bf16 needs a GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads on the CPU")


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


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    ours, theirs = build_pair(args.preset, args.img_size, args.device, args.global_pool)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=args.device)
    labels = torch.randint(0, ours.num_classes, (args.batch_size,), device=args.device)
    models = {"ours": ours, "timm": theirs}
    for _ in range(args.warmup):
        for model in models.values():
            time_step(model, images, labels, args.dtype)
    step_times_s = {name: [] for name in models}
    for i in range(args.iters):
        order = ("ours", "timm") if i % 2 == 0 else ("timm", "ours")
        for name in order:
            step_times_s[name].append(time_step(models[name], images, labels, args.dtype))

    median_s = {name: statistics.median(times) for name, times in step_times_s.items()}
    ratio = median_s["ours"] / median_s["timm"]
    pair_ratio = statistics.median(a / b for a, b in zip(step_times_s["ours"], step_times_s["timm"], strict=True))
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.machine()} CPU"
    print(f"command: python jobs/benchmark.py model {' '.join(sys.argv[2:])}".rstrip())
    print(f"machine: {device}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads; "
          f"date {date.today()}")
    print(f"config: {args.preset} at {args.img_size} px, {args.global_pool} pool, batch {args.batch_size}, "
          f"{args.dtype}, {args.warmup} warm-up + {args.iters} timed steps each, interleaved")
    print("| model | median fwd+bwd step (ms) | img/s |")
    print("|---|---|---|")
    for name, seconds in median_s.items():
        print(f"| {name} | {seconds * 1e3:.1f} | {args.batch_size / seconds:.1f} |")
    print(f"ratio ours / timm (medians): {ratio:.3f}; median of per-pair ratios: {pair_ratio:.3f}")
    return {"median_step_s": median_s, "ratio": ratio, "pair_ratio": pair_ratio}
