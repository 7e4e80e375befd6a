"""Orchestration overhead: the median optimizer-step time of Ray Train + DeepSpeed against a plain torch loop.

Ray Train + DeepSpeed runs with 1 worker at ZeRO-0 and ZeRO-2; the plain torch loop runs in this process (no
Ray, no DeepSpeed). Same model and initial weights, one in-memory batch made once from a fixed seed, the same
AdamW param groups, warmup+cosine schedule, gradient clipping and label smoothing (so the losses agree step for
step), and the same threads: the Ray worker reserves {"CPU": cores} and both sides call
`torch.set_num_threads(cores)`. One Ray Train run holds an engine per ZeRO stage while the plain loop runs in a
thread of this process; they pass a baton (a Ray actor), so that after one untimed warm-up turn each, every
round runs a few timed steps of each contender back to back, in reversed order every other round: load on the
shared machine falls on all of them alike. The table gives each contender's median over all timed steps, the
ratio DS / plain of those medians, and the median of the per-round ratios (each round's median over the plain
loop's median in the same round).
"""

import argparse
import statistics

import torch
import torch.nn.functional as F

from pipeline.benchmarks.train_harness import (
    EngineLoop,
    bench_job,
    bench_model_args,
    make_batch,
    report_json,
    run_steps,
    run_workers,
)
from pipeline.config import JobConfig, config_from_dict


class PlainLoop:
    """The trainer's step with no Ray and no DeepSpeed: forward, smoothed cross-entropy, backward, gradient
    clipping, AdamW over our param groups, schedule step, zero_grad; the same initial weights as build_engine."""

    def __init__(self, job: JobConfig, model_args: dict, seed: int):
        from pipeline.model import VisionTransformer
        from pipeline.train.optim import build_optimizer, build_scheduler

        torch.manual_seed(job.train.seed)
        self.model = VisionTransformer(**model_args).train()
        optim = self.optim = job.optim
        self.optimizer = build_optimizer(self.model, lr=optim.lr, weight_decay=optim.weight_decay,
                                         betas=optim.betas, eps=optim.eps, layer_decay=optim.layer_decay)
        self.scheduler = build_scheduler(self.optimizer, warmup_steps=optim.warmup_steps,
                                         total_steps=job.train.steps, min_lr_ratio=optim.min_lr_ratio)
        self.images, self.targets = make_batch(job.train.global_batch_size, job.data.img_size,
                                               model_args["num_classes"], seed)
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

    from pipeline.train.engine import resolve_device

    threads_given = torch.get_num_threads()  # what Ray set up for the worker's CPUs (OMP_NUM_THREADS)
    torch.set_num_threads(config["threads"])
    model_args = config["model_args"]
    context = ray.train.get_context()
    loops = {}
    for name, job_dict in config["jobs"].items():
        job = config_from_dict(JobConfig, job_dict)
        loops[name] = EngineLoop(job, model_args, context.get_world_size(),
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


def measure_overhead(args: argparse.Namespace, storage_path: str) -> dict:
    """Step times (s) of each contender, per round: {name: [[round 1 times], [round 2 times], ...]}.

    One Ray Train worker holds an engine per ZeRO stage; the plain loop runs in a thread of this process while
    the main thread waits in `fit()`. The two pass a baton, so each round times `--steps` steps of every
    contender back to back (plain first, then the stages; the reverse every other round), after one untimed
    turn of `--warmup` steps each."""
    import threading

    import ray

    stages = [int(s) for s in args.zero_stages.split(",") if s.strip()]
    model_args = bench_model_args(args.preset, args.img_size, args.num_classes)

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
            plain = PlainLoop(job_for(0), model_args, seed=0)
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
              "model_args": model_args, "seed": 0, "threads": args.cores, "baton": baton}
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
