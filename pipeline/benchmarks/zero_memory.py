"""Per-rank ZeRO state bytes: the model state each rank holds with ZeRO-0/1/2/3, in fp32 and bf16.

fp32 is the trainer's CPU precision and bf16 its GPU one. The bytes are counted in one Ray Train run of 2 workers
that builds, steps, measures and frees one engine per setting. The count is taken after one full optimizer step
and the next step's backward, before its `step()`: the moment when parameters, gradients and optimizer state all
exist. There is no allocator counter on the CPU, so it counts the tensors the engine holds:
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
"""

import argparse
import time

import torch

from pipeline.benchmarks.train_harness import bench_job, bench_model_args, make_batch, report_json, run_workers
from pipeline.config import JobConfig, config_from_dict

CATEGORIES = ("params", "grads", "optimizer", "buckets")


def _category(path: str, default: str) -> str:
    """The category of a tensor the walk reaches by `path`: buckets, then grads, by name; else `default`."""
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

    from pipeline.train.engine import build_engine, train_step
    from pipeline.train.objectives import build_objective

    torch.set_num_threads(config["threads"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    model_args = config["model_args"]
    device = torch.device("cpu")
    per_run = {}
    for key, job_dict in config["jobs"].items():
        job = config_from_dict(JobConfig, job_dict)
        start = time.perf_counter()
        objective = build_objective(job, model_args)
        engine, dtype = build_engine(job, objective, world_size, device)
        build_s = time.perf_counter() - start
        images, targets = make_batch(job.train.global_batch_size // world_size, job.data.img_size,
                                     model_args["num_classes"], config["seed"] + rank, device, dtype)
        train_step(engine, objective, images, targets, micro_batch=len(images), accum=1)
        engine.backward(objective.loss(engine, images, targets))
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
    model_args = bench_model_args(args.memory_preset, args.memory_img_size, args.num_classes)
    jobs = {f"{precision} ZeRO-{stage}": bench_job(
        preset=args.memory_preset, img_size=args.memory_img_size, batch_size_per_worker=args.memory_batch_size,
        num_workers=world_size, zero_stage=stage, device="cpu", steps=2, precision=precision).to_dict()
        for precision in args.memory_precisions.split(",") for stage in (0, 1, 2, 3)}
    cpus = max(args.cores // world_size, 1)
    config = {"jobs": jobs, "model_args": model_args, "seed": 0, "threads": cpus}
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
