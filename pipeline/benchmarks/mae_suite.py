"""MAE against supervised training: the step's speed on the same ViT, what MAE pretraining buys when labels are
few, and the decode cores one GPU needs to feed MAE.

step
    The trainer's own engine (`build_engine`) and step (`train_step`) for the same ViT (ViT-S/16 at 224 on the
    CPU; ViT-B/16 in bf16 on a GPU) under `train.objective=supervised` and `train.objective=mae` (its preset
    decoder), in this process, on the same in-memory batch; the two contenders' steps alternate, round by round,
    and each one's median step time gives its images/s. Beside them, each step's forward FLOPs per image as the
    objective counts them for train/tflops.

labels
    Label efficiency on scikit-learn's digits (1,437 train and 359 val images, 32 px). Per seed: MAE pretrained
    on every train image with its labels ignored (jobs/configs/digits_mae_pretrain.yaml), then fine-tuned on 10 %
    of the train labels (14 images per class) with the demo's fine-tune recipe (jobs/configs/digits_finetune.yaml)
    at 32 px; against the same fine-tune from random weights, on the same images, steps and batch. Each arm takes
    the learning rate of its best mean val top-1 over the seeds, from the same grid. Every run is the trainer's
    loop through `LocalContext` in a fresh process.

cores
    The cores of CPU decoding one GPU needs to feed ViT-B/16 at 45 % MFU, MAE beside supervised: the GPU's images/s
    at that MFU (0.45 x its dense bf16 peak / (3 x the objective's forward FLOPs per image)) over one core's decode
    rate, measured here: the decode task's path (`transforms.decode_batch`) on the data benchmark's 500x375 JPEGs
    to 224 px with each objective's augmentation (RandomResizedCrop, scale 0.08-1 or MAE's 0.2-1, and flip).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from pipeline.benchmarks import chosen_modes

MODES = ("step", "labels", "cores")
JOBS = Path(__file__).resolve().parents[2] / "jobs"
OBJECTIVES = ("supervised", "mae")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    gpu = torch.cuda.is_available()
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated: {', '.join(MODES)}")
    parser.add_argument("--preset", default="vit_base_patch16_224" if gpu else "vit_small_patch16_224",
                        help="step mode: the ViT both objectives train (ViT-B/16 on a GPU, ViT-S/16 on the CPU)")
    parser.add_argument("--img-size", type=int, default=224, help="step mode: input side in pixels")
    parser.add_argument("--batch-size", type=int, default=256 if gpu else 32, help="step mode: images per step")
    parser.add_argument("--warmup", type=int, default=2, help="step mode: untimed steps of each contender first")
    parser.add_argument("--rounds", type=int, default=8, help="step mode: rounds, one step of each contender in each")
    parser.add_argument("--seeds", default="0,1,2", help="labels mode: seeds, each its own pretrain and fine-tunes")
    parser.add_argument("--lrs", default="1e-3,2e-3,4e-3,8e-3", help="labels mode: the fine-tune lr grid of both arms")
    parser.add_argument("--per-class", type=int, default=14, help="labels mode: labelled train images per class")
    parser.add_argument("--pretrain-steps", type=int, default=1000, help="labels mode: MAE steps (the demo's)")
    parser.add_argument("--finetune-steps", type=int, default=200, help="labels mode: fine-tune steps of both arms")
    parser.add_argument("--num-images", type=int, default=400, help="cores mode: JPEGs decoded per round")
    parser.add_argument("--decode-rounds", type=int, default=5, help="cores mode: timed rounds; the median counts")
    parser.add_argument("--mfu", type=float, default=0.45, help="cores mode: the MFU the GPU is fed at")
    parser.add_argument("--gpu", default="H100", help="cores mode: the card whose dense bf16 peak is used")


# ---- step ---------------------------------------------------------------------------------------------------


def measure_step(args: argparse.Namespace) -> dict:
    """Median step seconds and images/s of both objectives on one batch, alternating, in this process."""
    from pipeline.benchmarks import free_port
    from pipeline.benchmarks.train_harness import EngineLoop, bench_job, bench_model_args, synchronize
    from pipeline.train.engine import use_cpu_deepspeed

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        use_cpu_deepspeed()
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    model_args = bench_model_args(args.preset, args.img_size, num_classes=1000)
    loops = {}
    for objective in OBJECTIVES:
        job = bench_job(preset=args.preset, img_size=args.img_size, batch_size_per_worker=args.batch_size,
                        num_workers=1, zero_stage=2, device=device.type,
                        steps=args.warmup + args.rounds + 1, objective=objective)
        loops[objective] = EngineLoop(job, model_args, 1, device, seed=0)
    for loop in loops.values():
        for _ in range(args.warmup):
            loop.step()
    times: dict[str, list[float]] = {name: [] for name in loops}
    for r in range(args.rounds):
        for name in (OBJECTIVES if r % 2 == 0 else OBJECTIVES[::-1]):
            synchronize(device)
            start = time.perf_counter()
            loops[name].step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    rows = {}
    for name, loop in loops.items():
        step_s = statistics.median(times[name])
        rows[name] = {"step_s": step_s, "images_per_s": args.batch_size / step_s,
                      "forward_gflops": loop.objective.forward_flops_per_image() / 1e9}
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    return {"device": device_name, "rows": rows,
            "ratio": rows["mae"]["images_per_s"] / rows["supervised"]["images_per_s"]}


def print_step(args: argparse.Namespace, result: dict) -> None:
    print(f"\n### One optimizer step, {args.preset} at {args.img_size} px, batch {args.batch_size}, ZeRO-2, "
          f"{result['device']}; {args.rounds} alternating rounds, medians")
    print("| objective | step s | images/s | forward GFLOPs/image |\n|---|---|---|---|")
    for name, row in result["rows"].items():
        print(f"| {name} | {row['step_s']:.3f} | {row['images_per_s']:.1f} | {row['forward_gflops']:.2f} |")
    print(f"MAE ÷ supervised images/s: {result['ratio']:.2f}")


# ---- labels -------------------------------------------------------------------------------------------------


def one_run(spec: dict) -> dict:
    """In a fresh process: one training through LocalContext; its last evaluation and its last checkpoint."""
    from pipeline.config import load_job_config
    from pipeline.train.context import LocalContext
    from pipeline.train.loop import run_training
    from pipeline.train.resolved_job import resolve_job

    run, init_state = resolve_job(load_job_config(spec["config"], spec["overrides"]), spec["kind"])
    ctx = LocalContext(spec["folder"])
    start = time.perf_counter()
    run_training(run, ctx, init_state=init_state)
    return {"val": {k: v for k, v in ctx.reports[-1].items() if k.startswith("val")},
            "checkpoint": str(ctx.checkpoints[-1]), "wall_s": time.perf_counter() - start}


def run_in_process(spec: dict) -> dict:
    done = subprocess.run([sys.executable, "-m", "pipeline.benchmarks.mae_suite", json.dumps(spec)],
                          capture_output=True, text=True, check=False, cwd=JOBS.parent)
    if done.returncode:
        raise RuntimeError(f"{spec['folder']}: {done.stderr[-2000:]}")
    [line] = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    return json.loads(line[len("RESULTS "):])


def write_label_subset(folder: str, per_class: int) -> None:
    """The digits' train split (its own order) cut to the first `per_class` images of each class."""
    from pipeline.data.shard_writer import write_split
    from pipeline.data.sources import digits_source

    source = digits_source(img_size=32)
    taken: dict[int, int] = {}

    def first_of_each_class():
        for sample in source.splits["train"]():
            if taken.get(sample.label, 0) < per_class:
                taken[sample.label] = taken.get(sample.label, 0) + 1
                yield sample

    write_split(first_of_each_class(), source.classes, folder, split="train", max_count=64, progress=False)


def measure_labels(args: argparse.Namespace, workdir: str) -> dict:
    from pipeline.data.shard_writer import ensure_digits_shards

    digits, few = f"{workdir}/digits", f"{workdir}/few"
    ensure_digits_shards(f"{digits}/train-*.tar", img_size=32)
    write_label_subset(few, args.per_class)
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = [float(lr) for lr in args.lrs.split(",")]
    common = [f"data.val={digits}/val-*.tar", "train.num_workers=1", f"tracking.uri=sqlite:///{workdir}/mlflow.db"]
    pretrains = {}
    for seed in seeds:
        pretrains[seed] = run_in_process({
            "kind": "pretrain", "config": str(JOBS / "configs" / "digits_mae_pretrain.yaml"),
            "folder": f"{workdir}/mae-{seed}", "overrides": [
                *common, f"data.train={digits}/train-*.tar", f"train.steps={args.pretrain_steps}",
                f"train.seed={seed}", f"data.shuffle_seed={seed}"]})
        print(f"MAE pretrain, seed {seed}: {pretrains[seed]['val']} in {pretrains[seed]['wall_s']:.0f} s", flush=True)
    finetune = [*common, f"data.train={few}/train-*.tar", "model.img_size=32", "train.global_batch_size=32",
                f"train.steps={args.finetune_steps}", f"train.eval_every_n_steps={args.finetune_steps}",
                f"train.checkpoint_every_n_steps={args.finetune_steps}", "optim.warmup_steps=20"]
    top1: dict[str, dict[float, list[float]]] = {"mae": {}, "scratch": {}}
    for arm in top1:
        for lr in lrs:
            for seed in seeds:
                init = [f"init_from={pretrains[seed]['checkpoint']}"] if arm == "mae" else []
                result = run_in_process({
                    "kind": "finetune" if arm == "mae" else "pretrain",
                    "config": str(JOBS / "configs" / "digits_finetune.yaml"), "folder": f"{workdir}/{arm}-{lr}-{seed}",
                    "overrides": [*finetune, *init, f"optim.lr={lr}", f"train.seed={seed}",
                                  f"data.shuffle_seed={seed}"]})
                top1[arm].setdefault(lr, []).append(result["val"]["val/top1"])
                print(f"{arm} lr {lr:g} seed {seed}: val top-1 {result['val']['val/top1']:.4f}", flush=True)
    best = {arm: max(by_lr, key=lambda lr, by_lr=by_lr: statistics.mean(by_lr[lr])) for arm, by_lr in top1.items()}
    return {"seeds": seeds, "lrs": lrs, "top1": {arm: {str(lr): v for lr, v in by_lr.items()}
                                                  for arm, by_lr in top1.items()},
            "best_lr": best, "pretrain_val": [pretrains[s]["val"] for s in seeds],
            "gain": statistics.mean(top1["mae"][best["mae"]]) - statistics.mean(top1["scratch"][best["scratch"]])}


def print_labels(args: argparse.Namespace, result: dict) -> None:
    print(f"\n### Label efficiency on the digits: fine-tuned on {args.per_class} labels per class (10 %), "
          f"{args.finetune_steps} steps of 32, from MAE ({args.pretrain_steps} steps, labels ignored) or from "
          f"scratch; seeds {args.seeds}")
    print("| arm | lr | val top-1 per seed | mean |\n|---|---|---|---|")
    for arm, by_lr in result["top1"].items():
        for lr, values in by_lr.items():
            chosen = "**" if float(lr) == result["best_lr"][arm] else ""
            print(f"| {arm} | {chosen}{float(lr):g}{chosen} | {', '.join(f'{v:.4f}' for v in values)} | "
                  f"{chosen}{statistics.mean(values):.4f}{chosen} |")
    for seed, val in zip(result["seeds"], result["pretrain_val"], strict=True):
        print(f"MAE pretrain seed {seed}: val loss {val['val/loss']:.4f} ({val['val/loss_ratio']:.3f} of "
              f"predict-the-mean), k-NN top-1 {val.get('val/knn_top1', float('nan')):.4f}")
    print(f"MAE - scratch, each at its best lr: {100 * result['gain']:+.1f} points val top-1")


# ---- cores --------------------------------------------------------------------------------------------------


def measure_cores(args: argparse.Namespace) -> dict:
    from pipeline.benchmarks.decode_speed import bench_images, raw_batch
    from pipeline.config import DataConfig, load_job_config
    from pipeline.data.transforms import decode_batch
    from pipeline.model import preset_kwargs
    from pipeline.train.flops import PEAK_BF16_FLOPS
    from pipeline.train.objectives import build_objective

    torch.set_num_threads(1)
    datas, _ = bench_images(args.num_images, 224, 0)
    batches = [raw_batch(datas[s: s + 64], s) for s in range(0, len(datas), 64)]
    # each objective's crops: RandomResizedCrop's default scale for supervised training, MAE's (0.2, 1)
    configs = {"supervised": DataConfig(img_size=224, hflip=0.5),
               "mae": DataConfig(img_size=224, rrc_scale=(0.2, 1.0), hflip=0.5)}
    rates: dict[str, list[float]] = {name: [] for name in OBJECTIVES}
    for r in range(args.decode_rounds + 1):  # round 0 warms up; the two alternate
        for name in (OBJECTIVES if r % 2 == 0 else OBJECTIVES[::-1]):
            start = time.perf_counter()
            for i, batch in enumerate(batches):
                decode_batch(batch, cfg=configs[name], train=True, num_classes=None, seed=i)
            if r:
                rates[name].append(len(datas) / (time.perf_counter() - start))
    per_core = {name: statistics.median(values) for name, values in rates.items()}
    flops, gpu_rate = {}, {}
    peak = PEAK_BF16_FLOPS[args.gpu]
    for objective in OBJECTIVES:
        job = load_job_config(None, [f"train.objective={objective}", "model.preset=vit_base_patch16_224"])
        flops[objective] = build_objective(job, preset_kwargs("vit_base_patch16_224")).forward_flops_per_image()
        gpu_rate[objective] = args.mfu * peak / (3 * flops[objective])
    return {"per_core": per_core, "flops": flops, "gpu_rate": gpu_rate,
            "cores": {name: gpu_rate[name] / per_core[name] for name in OBJECTIVES}}


def print_cores(args: argparse.Namespace, result: dict) -> None:
    print(f"\n### Decode cores one {args.gpu} needs at {100 * args.mfu:.0f} % MFU, ViT-B/16 224 (dense bf16 peak "
          "from pipeline/train/flops.py); decode on one core, the data benchmark's 500x375 JPEGs to 224 px with "
          f"each objective's RandomResizedCrop and flip, {args.decode_rounds} alternating rounds, medians")
    print("| objective | forward GFLOPs/image | images/s per GPU | decode images/s per core | decode cores per GPU |")
    print("|---|---|---|---|---|")
    for name in OBJECTIVES:
        print(f"| {name} | {result['flops'][name] / 1e9:.2f} | {result['gpu_rate'][name]:.0f} | "
              f"{result['per_core'][name]:.0f} | {result['cores'][name]:.1f} |")


def run(args: argparse.Namespace) -> dict:
    modes = chosen_modes(args.modes, MODES)
    print(f"command: python jobs/benchmark.py mae {' '.join(sys.argv[2:])}".rstrip())
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; date {date.today()}")
    results: dict = {}
    if "step" in modes:
        results["step"] = measure_step(args)
        print_step(args, results["step"])
    if "cores" in modes:
        results["cores"] = measure_cores(args)
        print_cores(args, results["cores"])
    if "labels" in modes:
        with tempfile.TemporaryDirectory(prefix="mae-labels-") as workdir:
            results["labels"] = measure_labels(args, workdir)
        print_labels(args, results["labels"])
    return results


if __name__ == "__main__":
    print("RESULTS " + json.dumps(one_run(json.loads(sys.argv[1]))))
