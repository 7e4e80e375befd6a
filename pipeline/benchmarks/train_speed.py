"""Training step: Ray Train + DeepSpeed against a plain torch loop, per-rank ZeRO state bytes, GPU img/s and MFU.

Three modes, all built from the trainer's own pieces (`build_engine`, `train_step`, `build_optimizer`):

overhead (CPU)
    The median optimizer-step time of Ray Train + DeepSpeed with 1 worker at ZeRO-0 and ZeRO-2, against a
    plain torch loop in this process (no Ray, no DeepSpeed). Same model and initial weights, one in-memory
    batch made once from a fixed seed, the same AdamW param groups, warmup+cosine schedule, gradient clipping
    and label smoothing (so the losses agree step for step), and the same threads: the Ray worker reserves
    {"CPU": cores} and both sides call `torch.set_num_threads(cores)`. One Ray Train run holds an engine per
    ZeRO stage while the plain loop runs in a thread of this process; they pass a baton (a Ray actor), so that
    after one untimed warm-up turn each, every round runs a few timed steps of each contender back to back,
    in reversed order every other round: load on the shared machine falls on all of them alike. The table
    gives each contender's median over all timed steps, the ratio DS / plain of those medians, and the median
    of the per-round ratios (each round's median over the plain loop's median in the same round).

memory (CPU, 2 ranks)
    The bytes of model state each rank holds with ZeRO-0/1/2/3, in fp32 (the trainer's CPU precision) and
    bf16 (its GPU precision), counted in one Ray Train run of 2 workers that builds, steps, measures and frees
    one engine per setting. The count is taken after one full optimizer step and the next step's backward,
    before its `step()`: the moment when parameters, gradients and optimizer state all exist. There is no
    allocator counter on the CPU, so it counts the tensors the engine holds:
      - params: each module parameter's storage and, under ZeRO-3, its `ds_tensor` partition (the parameter
        itself is then empty, except for the small ones ZeRO-3 keeps whole on every rank, below
        `stage3_param_persistence_threshold`); a flat buffer that parameters are views of counts once;
      - grads: each parameter's `.grad`, and every tensor reachable from the DeepSpeed optimizer through an
        attribute, key or `.grad` whose path names a gradient (the averaged/partitioned gradient buffers);
      - optimizer: every other tensor reachable from the DeepSpeed optimizer object and from its inner torch
        optimizer (`state`: exp_avg, exp_avg_sq, step; the fp32 master weights or partitions), found by walking
        the attributes, lists, tuples and dicts of DeepSpeed and torch.optim objects (nn.Modules are not
        entered: their parameters are counted above);
      - buckets: reachable tensors whose path names an ipg/reduce bucket: DeepSpeed's gradient communication
        staging buffers, sized by `reduce_bucket_size` (5e8 elements by default), not by the model. They are
        reported apart, because they would otherwise swamp the model state.
    Every tensor is deduplicated by its untyped storage (`untyped_storage().data_ptr()`) and counted as its
    storage's `nbytes()`, the first path that reaches it deciding its category (params, then grads, then the
    walk). The table gives the larger rank, and the ratio to ZeRO-0 of the model state (params + grads +
    optimizer) without the buckets and with them.

gpu (`--gpu`, the default when CUDA is present)
    ViT-B/16 at 224 in bf16 under DeepSpeed (ZeRO-2 by default), 1 Ray Train worker with one GPU: images/s
    and MFU = 3 x `flops_per_image` x images/s / peak bf16 FLOP/s (backward ~ 2 x forward). The peak comes
    from a table of known cards keyed by `torch.cuda.get_device_name()`, or `--peak-tflops`. With
    `--device cpu` the same path runs on the CPU (fp32), which is how it is tested without a GPU.
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date

import torch
import torch.nn.functional as F

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
CATEGORIES = ("params", "grads", "optimizer", "buckets")


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
    parser.add_argument("--gpu-warmup", type=int, default=10, help="gpu mode: untimed steps")
    parser.add_argument("--gpu-steps", type=int, default=30, help="gpu mode: timed steps")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="gpu mode's device; cpu runs the same path in fp32 (a check of the harness)")
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="gpu mode: peak dense TFLOP/s for MFU; 0 looks the card up in a table of known ones")
    parser.add_argument("--ray-cpus", type=int, default=0,
                        help="logical CPUs of the local Ray this starts (when none is running); 0 means --cores")


# ---------------------------------------------------------------------------------------------------------------
# What both sides run: the job config, the model arguments, the batch
# ---------------------------------------------------------------------------------------------------------------

def bench_job(*, preset: str, img_size: int, batch_size_per_worker: int, num_workers: int, zero_stage: int,
              device: str, steps: int, precision: str = "auto") -> JobConfig:
    """The job a contender runs: the project's defaults (AdamW, schedule, clipping, smoothing) at this size."""
    job = JobConfig()
    job = dataclasses.replace(
        job,
        model=dataclasses.replace(job.model, preset=preset),
        data=dataclasses.replace(job.data, img_size=img_size),
        train=dataclasses.replace(job.train, steps=steps, global_batch_size=batch_size_per_worker * num_workers,
                                  micro_batch_size=0, num_workers=num_workers, zero_stage=zero_stage,
                                  device=device, precision=precision),
    )
    return job.validate()


def bench_inputs(preset: str, img_size: int, num_classes: int):
    from pipeline.model import preset_kwargs
    from pipeline.train.loop import RunInputs

    model_args = preset_kwargs(preset, img_size=img_size, num_classes=num_classes)
    model_args = {k: list(v) if isinstance(v, tuple) else v for k, v in model_args.items()}
    return RunInputs(model_args=model_args, classes=[str(i) for i in range(num_classes)])


def make_batch(batch_size: int, img_size: int, num_classes: int, seed: int, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """One normalised-looking batch, identical wherever it is made (a seeded CPU generator)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, img_size, img_size, generator=generator)
    targets = torch.randint(0, num_classes, (batch_size,), generator=generator)
    return images.to(device=device, dtype=dtype), targets.to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------------
# Overhead mode
# ---------------------------------------------------------------------------------------------------------------

class PlainLoop:
    """The trainer's step with no Ray and no DeepSpeed: forward, smoothed cross-entropy, backward, gradient
    clipping, AdamW over our param groups, schedule step, zero_grad; the same initial weights as build_engine."""

    def __init__(self, job: JobConfig, inputs, seed: int):
        from pipeline.model import VisionTransformer
        from pipeline.train.optim import build_optimizer, build_scheduler

        torch.manual_seed(job.train.seed)
        self.model = VisionTransformer(**inputs.model_args).train()
        optim = self.optim = job.optim
        self.optimizer = build_optimizer(self.model, lr=optim.lr, weight_decay=optim.weight_decay,
                                         betas=optim.betas, eps=optim.eps, layer_decay=optim.layer_decay)
        self.scheduler = build_scheduler(self.optimizer, warmup_steps=optim.warmup_steps,
                                         total_steps=job.train.steps, min_lr_ratio=optim.min_lr_ratio)
        self.images, self.targets = make_batch(job.train.global_batch_size, job.data.img_size, len(inputs.classes),
                                               seed)
        self.device = torch.device("cpu")

    def step(self) -> torch.Tensor:
        loss = F.cross_entropy(self.model(self.images), self.targets, label_smoothing=self.optim.label_smoothing)
        loss.backward()
        if self.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss


class EngineLoop:
    """The trainer's own engine (`build_engine`) and step (`train_step`) on one in-memory batch."""

    def __init__(self, job: JobConfig, inputs, world_size: int, device: torch.device, seed: int):
        from pipeline.train.loop import build_engine

        self.job, self.device = job, device
        self.engine, self.dtype = build_engine(job, inputs, world_size, device)
        self.images, self.targets = make_batch(job.train.global_batch_size // world_size, job.data.img_size,
                                               len(inputs.classes), seed, device, self.dtype)

    def step(self) -> torch.Tensor:
        from pipeline.train.loop import train_step

        train = self.job.train
        return train_step(self.engine, self.images, self.targets, micro_batch=train.micro_batch_size_per_worker(),
                          accum=train.grad_accum_steps(), label_smoothing=self.job.optim.label_smoothing)


def run_steps(loop, steps: int) -> tuple[list[float], list[float]]:
    """Seconds and loss of each of `steps` optimizer steps (the device synchronised around each)."""
    times_s, losses = [], []
    for _ in range(steps):
        synchronize(loop.device)
        start = time.perf_counter()
        loss = loop.step()
        synchronize(loop.device)
        times_s.append(time.perf_counter() - start)
        losses.append(loss.item())
    return times_s, losses


class Baton:
    """Whose turn it is to run steps: "driver" (the plain loop here) or one engine of the Ray worker, with the
    number of steps and whether they are timed; "stop" ends the worker. An async actor: waiting holds no CPU."""

    def __init__(self):
        import asyncio

        self.turn: tuple[str, int, bool] = ("driver", 0, False)
        self.changed = asyncio.Condition()

    async def give(self, name: str, steps: int = 0, timed: bool = False) -> None:
        async with self.changed:
            self.turn = (name, steps, timed)
            self.changed.notify_all()

    async def wait_for(self, names: list[str]) -> tuple[str, int, bool]:
        async with self.changed:
            await self.changed.wait_for(lambda: self.turn[0] in names)
            return self.turn


def overhead_per_worker(config: dict) -> None:
    """Ray Train worker: one engine per ZeRO stage, each stepping when the baton names it; reports each engine's
    timed turns and losses as a checkpoint."""
    import ray
    import ray.train

    from pipeline.train.loop import RunInputs, resolve_device

    threads_given = torch.get_num_threads()  # what Ray set up for the worker's CPUs (OMP_NUM_THREADS)
    torch.set_num_threads(config["threads"])
    inputs = RunInputs(**config["inputs"])
    context = ray.train.get_context()
    loops = {}
    for name, job_dict in config["jobs"].items():
        job = config_from_dict(JobConfig, job_dict)
        loops[name] = EngineLoop(job, inputs, context.get_world_size(),
                                 resolve_device(job, context.get_local_rank()), config["seed"])
    baton = config["baton"]
    results = {name: {"turns": [], "losses": [], "threads_given": threads_given, "threads": torch.get_num_threads()}
               for name in loops}
    while True:
        name, steps, timed = ray.get(baton.wait_for.remote([*loops, "stop"]))
        if name == "stop":
            break
        times_s, losses = run_steps(loops[name], steps)
        results[name]["losses"] += losses
        if timed:
            results[name]["turns"].append(times_s)
        ray.get(baton.give.remote("driver"))
    report_json(results, context.get_world_rank())


def step_times_per_worker(config: dict) -> None:
    """Ray Train worker (gpu mode): the trainer's engine and step, warm-up then timed steps, reported."""
    import ray.train

    from pipeline.train.loop import RunInputs, resolve_device

    if config["threads"]:
        torch.set_num_threads(config["threads"])
    job = config_from_dict(JobConfig, config["job"])
    context = ray.train.get_context()
    device = resolve_device(job, context.get_local_rank())
    loop = EngineLoop(job, RunInputs(**config["inputs"]), context.get_world_size(), device, config["seed"])
    run_steps(loop, config["warmup"])
    times_s, losses = run_steps(loop, config["steps"])
    result = {"step_times_s": times_s, "losses": losses, "dtype": str(loop.dtype).removeprefix("torch."),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    report_json(result, context.get_world_rank())


def report_json(result: dict, rank: int) -> None:
    """Result.metrics only reflects reports that carry a checkpoint: numbers travel as a JSON file in one."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="train-bench-") as directory:
        with open(os.path.join(directory, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        ray.train.report({"rank": rank}, checkpoint=ray.train.Checkpoint.from_directory(directory))


def run_workers(per_worker, config: dict, *, num_workers: int, cpus_per_worker: float, use_gpu: bool,
                storage_path: str, name: str) -> list[dict]:
    """One Ray Train run of `per_worker`; every rank's JSON result, in rank order."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        per_worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage_path),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"benchmark run {name} reported no results")
    with result.checkpoint.as_directory() as directory:
        results = []
        for rank in range(num_workers):
            with open(os.path.join(directory, f"rank{rank}.json")) as f:
                results.append(json.load(f))
    return results


def measure_overhead(args: argparse.Namespace, storage_path: str) -> dict:
    """Step times (s) of each contender, per round: {name: [[round 1 times], [round 2 times], ...]}.

    One Ray Train worker holds an engine per ZeRO stage; the plain loop runs in a thread of this process while
    the main thread waits in `fit()`. The two pass a baton, so each round times `--steps` steps of every
    contender back to back (plain first, then the stages; the reverse every other round), after one untimed
    turn of `--warmup` steps each."""
    import threading

    import ray

    stages = [int(s) for s in args.zero_stages.split(",") if s.strip()]
    inputs = bench_inputs(args.preset, args.img_size, args.num_classes)

    def job_for(stage: int) -> JobConfig:
        return bench_job(preset=args.preset, img_size=args.img_size, batch_size_per_worker=args.batch_size,
                         num_workers=1, zero_stage=stage, device="cpu",
                         steps=args.warmup + args.rounds * args.steps)

    plain_name = "plain torch"
    names = [plain_name] + [f"Ray Train + DeepSpeed ZeRO-{stage}" for stage in stages]
    baton = ray.remote(num_cpus=0)(Baton).remote()
    plain_result = {"turns": [], "losses": []}
    failures: list[BaseException] = []

    def drive() -> None:
        """The plain loop's turns, and the baton passed to each engine in order."""
        try:
            torch.set_num_threads(args.cores)  # in this thread (OpenMP's thread count is per calling thread)
            plain = PlainLoop(job_for(0), inputs, seed=0)
            plain_result["threads"] = torch.get_num_threads()

            def turn(name: str, steps: int, timed: bool) -> None:
                if name == plain_name:
                    times_s, losses = run_steps(plain, steps)
                    plain_result["losses"] += losses
                    if timed:
                        plain_result["turns"].append(times_s)
                    return
                ray.get(baton.give.remote(name, steps, timed))
                if ray.get(baton.wait_for.remote(["driver", "stop"]))[0] == "stop":
                    raise RuntimeError("the Ray Train worker stopped before its turn ended")

            for name in names:
                turn(name, args.warmup, timed=False)
            for r in range(args.rounds):
                for name in names if r % 2 == 0 else names[::-1]:
                    turn(name, args.steps, timed=True)
                print(f"round {r + 1}/{args.rounds}: plain {statistics.median(plain_result['turns'][-1]) * 1e3:.0f} ms",
                      flush=True)
        except BaseException as err:  # re-raised in the main thread
            failures.append(err)
        finally:
            ray.get(baton.give.remote("stop"))

    driver = threading.Thread(target=drive, name="plain-loop", daemon=True)
    config = {"jobs": {name: job_for(stage).to_dict() for name, stage in zip(names[1:], stages, strict=True)},
              "inputs": dataclasses.asdict(inputs), "seed": 0, "threads": args.cores, "baton": baton}
    driver.start()
    try:
        worker = run_workers(overhead_per_worker, config, num_workers=1, cpus_per_worker=args.cores, use_gpu=False,
                             storage_path=storage_path, name="overhead")[0]
    finally:
        ray.get(baton.give.remote("stop"))
        driver.join()
    if failures:
        raise failures[0]
    details = {plain_name: plain_result, **worker}
    return {"times": {name: details[name]["turns"] for name in names}, "details": details}


def summarise_overhead(times: dict[str, list[list[float]]]) -> dict:
    """Per contender: the median and the fastest of all its timed steps; to plain: the ratio of medians, the
    median of per-round ratios, every per-round ratio, and the ratio of fastest steps (load only adds time, so
    the fastest step is the closest to an unloaded machine's)."""
    plain_name = next(iter(times))
    steps = {name: [t for round_times in rounds for t in round_times] for name, rounds in times.items()}
    medians = {name: statistics.median(values) for name, values in steps.items()}
    fastest = {name: min(values) for name, values in steps.items()}
    summary: dict = {"median_step_s": medians, "fastest_step_s": fastest, "ratio": {}, "round_ratio": {},
                     "round_ratios": {}, "fastest_ratio": {}}
    for name, rounds in times.items():
        if name == plain_name:
            continue
        per_round = [statistics.median(mine) / statistics.median(theirs)
                     for mine, theirs in zip(rounds, times[plain_name], strict=True)]
        summary["ratio"][name] = medians[name] / medians[plain_name]
        summary["round_ratio"][name] = statistics.median(per_round)
        summary["round_ratios"][name] = per_round
        summary["fastest_ratio"][name] = fastest[name] / fastest[plain_name]
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Memory mode
# ---------------------------------------------------------------------------------------------------------------

def _category(path: str, default: str) -> str:
    lowered = path.lower()
    if "ipg" in lowered or "bucket" in lowered:
        return "buckets"
    if "grad" in lowered:
        return "grads"
    return default


def state_bytes(engine) -> tuple[dict[str, int], dict[str, int]]:
    """Bytes of the model state one rank holds, by category, and the largest storages by path (see the module
    docstring for exactly what is counted)."""
    from torch import nn

    seen: set[int] = set()
    totals = dict.fromkeys(CATEGORIES, 0)
    largest: dict[str, int] = {}

    def add(tensor: torch.Tensor, category: str, path: str) -> None:
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        if nbytes == 0 or storage.data_ptr() in seen:
            return
        seen.add(storage.data_ptr())
        totals[category] += nbytes
        if nbytes > tensor.numel() * tensor.element_size():
            path = f"flat buffer under {path}"
        largest[f"{category}: {path}"] = nbytes

    params = list(engine.module.named_parameters())
    for name, param in params:
        if hasattr(param, "ds_tensor"):  # ZeRO-3: this rank's partition, plus the full tensor if it is gathered
            add(param.ds_tensor, "params", f"{name}.ds_tensor")
        add(param, "params", name)
    for name, param in params:
        if param.grad is not None:
            add(param.grad, "grads", f"{name}.grad")

    visited: set[int] = set()

    def walk(obj, path: str, default: str) -> None:
        if id(obj) in visited or isinstance(obj, (str, bytes, int, float, bool, type(None), nn.Module)):
            return
        visited.add(id(obj))
        if isinstance(obj, torch.Tensor):
            add(obj, _category(path, default), path)
            for attr in ("ds_tensor", "grad"):
                inner = getattr(obj, attr, None)
                if isinstance(inner, torch.Tensor):
                    walk(inner, f"{path}.{attr}", default)
            return
        if isinstance(obj, dict):
            for key, value in obj.items():
                walk(value, f"{path}[{key if isinstance(key, (str, int)) else type(key).__name__}]", default)
        elif isinstance(obj, (list, tuple, set)):
            for i, value in enumerate(obj):
                walk(value, f"{path}[{i}]", default)
        elif type(obj).__module__.startswith(("deepspeed", "torch.optim")) and hasattr(obj, "__dict__"):
            for key, value in vars(obj).items():
                walk(value, f"{path}.{key}", default)

    walk(engine.optimizer, "optimizer", "optimizer")
    inner = getattr(engine.optimizer, "optimizer", None)
    if inner is not None:
        walk(inner.state, "optimizer.optimizer.state", "optimizer")
    return totals, dict(sorted(largest.items(), key=lambda kv: -kv[1])[:40])


def state_bytes_per_worker(config: dict) -> None:
    """Ray Train worker: for each ZeRO stage, build the trainer's engine, step once, run the next backward,
    count the state this rank holds, finish the step, and free the engine."""
    import gc

    import ray.train

    from pipeline.train.loop import RunInputs, build_engine, train_step

    torch.set_num_threads(config["threads"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    inputs = RunInputs(**config["inputs"])
    device = torch.device("cpu")
    per_run = {}
    for key, job_dict in config["jobs"].items():
        job = config_from_dict(JobConfig, job_dict)
        start = time.perf_counter()
        engine, dtype = build_engine(job, inputs, world_size, device)
        build_s = time.perf_counter() - start
        images, targets = make_batch(job.train.global_batch_size // world_size, job.data.img_size,
                                     len(inputs.classes), config["seed"] + rank, device, dtype)
        smoothing = job.optim.label_smoothing
        train_step(engine, images, targets, micro_batch=len(images), accum=1, label_smoothing=smoothing)
        engine.backward(F.cross_entropy(engine(images).float(), targets, label_smoothing=smoothing))
        totals, largest = state_bytes(engine)
        engine.step()
        per_run[key] = {"bytes": totals, "largest": largest, "engine_build_s": build_s,
                        "total_s": time.perf_counter() - start,
                        "num_params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                          for p in engine.module.parameters())}
        del engine
        gc.collect()
    report_json(per_run, rank)


def measure_memory(args: argparse.Namespace, storage_path: str) -> list[dict]:
    """Per rank: {"fp32 ZeRO-0": {"bytes": {category: n}, "largest": {path: n}, "num_params": n}, ...}."""
    world_size = 2
    inputs = bench_inputs(args.memory_preset, args.memory_img_size, args.num_classes)
    jobs = {f"{precision} ZeRO-{stage}": bench_job(
        preset=args.memory_preset, img_size=args.memory_img_size, batch_size_per_worker=args.memory_batch_size,
        num_workers=world_size, zero_stage=stage, device="cpu", steps=2, precision=precision).to_dict()
        for precision in args.memory_precisions.split(",") for stage in (0, 1, 2, 3)}
    cpus = max(args.cores // world_size, 1)
    config = {"jobs": jobs, "inputs": dataclasses.asdict(inputs), "seed": 0, "threads": cpus}
    return run_workers(state_bytes_per_worker, config, num_workers=world_size, cpus_per_worker=cpus, use_gpu=False,
                       storage_path=storage_path, name="memory")


def summarise_memory(per_rank: list[dict]) -> dict:
    """Per stage: the largest rank's bytes by category, the model state (params + grads + optimizer), the
    total with buckets, and the ratios to ZeRO-0."""
    rows = {}
    for key in per_rank[0]:
        by_rank = [rank_result[key]["bytes"] for rank_result in per_rank]
        worst = max(by_rank, key=lambda b: b["params"] + b["grads"] + b["optimizer"])
        state = worst["params"] + worst["grads"] + worst["optimizer"]
        rows[key] = {**worst, "state": state, "with_buckets": state + worst["buckets"],
                     "num_params": per_rank[0][key]["num_params"]}
    for key, row in rows.items():
        base = rows[key.split(" ")[0] + " ZeRO-0"]
        row["ratio"] = row["state"] / base["state"]
        row["ratio_with_buckets"] = row["with_buckets"] / base["with_buckets"]
    return rows


# ---------------------------------------------------------------------------------------------------------------
# GPU mode
# ---------------------------------------------------------------------------------------------------------------

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


def measure_gpu(args: argparse.Namespace, storage_path: str) -> dict:
    from pipeline.model import build_model, flops_per_image

    use_gpu = args.device == "cuda"
    if use_gpu and not torch.cuda.is_available():
        raise SystemExit("gpu mode needs CUDA here (or --device cpu to check the harness on the CPU)")
    inputs = bench_inputs(args.gpu_preset, args.gpu_img_size, args.num_classes)
    job = bench_job(preset=args.gpu_preset, img_size=args.gpu_img_size, batch_size_per_worker=args.gpu_batch_size,
                    num_workers=1, zero_stage=args.gpu_zero_stage, device=args.device,
                    steps=args.gpu_warmup + args.gpu_steps)
    forward_flops = flops_per_image(build_model(args.gpu_preset, img_size=args.gpu_img_size,
                                                num_classes=args.num_classes))
    config = {"job": job.to_dict(), "inputs": dataclasses.asdict(inputs), "seed": 0, "warmup": args.gpu_warmup,
              "steps": args.gpu_steps, "threads": 0 if use_gpu else args.cores}
    result = run_workers(step_times_per_worker, config, num_workers=1, cpus_per_worker=1 if use_gpu else args.cores,
                         use_gpu=use_gpu, storage_path=storage_path, name="gpu")[0]
    step_s = statistics.median(result["step_times_s"])
    images_per_s = args.gpu_batch_size / step_s
    peak = peak_flops(result["device_name"], args.peak_tflops)
    return {**result, "median_step_s": step_s, "images_per_s": images_per_s, "forward_flops": forward_flops,
            "peak_flops": peak, "mfu": mfu(forward_flops, images_per_s, peak)}


# ---------------------------------------------------------------------------------------------------------------
# Tables and the entry point
# ---------------------------------------------------------------------------------------------------------------

def print_header(args: argparse.Namespace, device: str) -> None:
    print(f"command: python jobs/benchmark.py train {' '.join(sys.argv[2:])}".rstrip())
    print(f"machine: {device}, {os.cpu_count()} cores, torch {torch.__version__}; date {date.today()}")


def print_overhead(args: argparse.Namespace, measured: dict, summary: dict) -> None:
    details = measured["details"]
    short = {name: name.rsplit(" ", 1)[-1] if "ZeRO" in name else "plain" for name in details}
    threads = ", ".join(f"{short[name]} {d['threads']}" for name, d in details.items())
    print(f"\n### Orchestration overhead: {args.preset} at {args.img_size} px, batch {args.batch_size}, fp32; "
          f"{args.warmup} warm-up steps each, then {args.rounds} rounds of {args.steps} timed step(s) of every "
          f"contender back to back (order reversed every other round); threads: {threads}")
    print("| contender | median step (ms) | img/s | fastest step (ms) | round medians (ms) | ÷ plain (medians) | "
          "median of per-round ratios | per-round ratios | ÷ plain (fastest) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, rounds in measured["times"].items():
        round_medians = [statistics.median(t) for t in rounds]
        median_s = summary["median_step_s"][name]
        if name in summary["ratio"]:
            per_round = summary["round_ratios"][name]
            cells = (f"**{summary['ratio'][name]:.3f}** | **{summary['round_ratio'][name]:.3f}** | "
                     f"{min(per_round):.2f}–{max(per_round):.2f} | {summary['fastest_ratio'][name]:.3f}")
        else:
            cells = "1 | 1 | – | 1"
        print(f"| {name} | {median_s * 1e3:.0f} | {args.batch_size / median_s:.1f} | "
              f"{summary['fastest_step_s'][name] * 1e3:.0f} | "
              f"{min(round_medians) * 1e3:.0f}–{max(round_medians) * 1e3:.0f} | {cells} |")
    print("first losses (same weights, batch and optimizer): " + "; ".join(
        f"{short[name]} " + " ".join(f"{v:.4f}" for v in d["losses"][:3]) for name, d in details.items()))


def print_memory(args: argparse.Namespace, rows: dict, per_rank: list[dict]) -> None:
    mib = 2**20
    num_params = next(iter(rows.values()))["num_params"]
    print(f"\n### Per-rank state bytes, 2 ranks: {args.memory_preset} at {args.memory_img_size} px "
          f"({num_params / 1e6:.1f} M params), after one step + the next backward; the larger rank")
    print("| precision, stage | params (MiB) | grads (MiB) | optimizer (MiB) | state (MiB) | ÷ ZeRO-0 | "
          "comm buckets (MiB) | state + buckets (MiB) | ÷ ZeRO-0 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key, row in rows.items():
        print(f"| {key} | {row['params'] / mib:.1f} | {row['grads'] / mib:.1f} | {row['optimizer'] / mib:.1f} | "
              f"{row['state'] / mib:.1f} | **{row['ratio']:.3f}** | {row['buckets'] / mib:.1f} | "
              f"{row['with_buckets'] / mib:.1f} | {row['ratio_with_buckets']:.3f} |")
    for key in per_rank[0]:
        print(f"largest storages, {key}, rank 0: " + "; ".join(
            f"{path} {n / mib:.1f} MiB" for path, n in list(per_rank[0][key]["largest"].items())[:5]))


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


def resolve_modes(args: argparse.Namespace) -> list[str]:
    if args.gpu:
        return ["gpu"]
    if args.modes:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        unknown = set(modes) - {"overhead", "memory", "gpu"}
        if unknown:
            raise SystemExit(f"unknown --modes {', '.join(sorted(unknown))}; choose from overhead, memory, gpu")
        return modes
    return ["gpu"] if torch.cuda.is_available() else ["overhead", "memory"]


def start_local_ray(num_cpus: int) -> None:
    """A local Ray, no dashboard, with an unreachable state API for its processes.

    Ray Train's PlacementGroupCleaner polls the state API for the controller; with no dashboard of our own it
    resolves the newest `ray start` cluster on the host, finds no such actor there, takes the controller for
    dead and removes the placement group, killing the workers mid-run. A refused connection is an error it
    waits through. Ray's processes inherit the variable at start; this process gets its old value back."""
    import ray

    previous = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = "http://127.0.0.1:9"
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    finally:
        if previous is None:
            del os.environ["RAY_API_SERVER_ADDRESS"]
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = previous


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
                results["gpu"] = measure_gpu(args, storage_path)
                print_gpu(args, results["gpu"])
    finally:
        if owns_ray:
            ray.shutdown()
    return results
