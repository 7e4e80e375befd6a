"""What every mode of the training benchmark (`train_speed`) is built from: the job and model inputs at a
benchmark's size, one seeded batch, the trainer's own engine stepping that batch with each step timed, and one
Ray Train run of a per-worker function whose ranks hand back their results as JSON.

The engine and the step are the trainer's (`build_engine`, `train_step`), so a mode measures what training runs.
"""

import dataclasses
import json
import os
import tempfile
import time

import torch

from pipeline.config import JobConfig


def bench_job(*, preset: str, img_size: int, batch_size_per_worker: int, num_workers: int, zero_stage: int,
              device: str, steps: int, precision: str = "auto", compile: bool = False,
              objective: str = "supervised") -> JobConfig:
    """The job a contender runs: the project's defaults (AdamW, schedule, clipping, smoothing) at this size."""
    job = JobConfig()
    job = dataclasses.replace(
        job,
        model=dataclasses.replace(job.model, preset=preset),
        data=dataclasses.replace(job.data, img_size=img_size),
        train=dataclasses.replace(job.train, steps=steps, global_batch_size=batch_size_per_worker * num_workers,
                                  micro_batch_size=0, num_workers=num_workers, zero_stage=zero_stage,
                                  device=device, precision=precision, compile=compile, objective=objective),
    )
    return job.validate()


def bench_model_args(preset: str, img_size: int, num_classes: int) -> dict:
    """`VisionTransformer(**model_args)` of a preset, as the resolved job holds them (plain lists, no tuples)."""
    from pipeline.config import plain
    from pipeline.model import preset_kwargs

    return plain(preset_kwargs(preset, img_size=img_size, num_classes=num_classes))


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


class EngineLoop:
    """The trainer's own engine (`build_engine`) and step (`train_step`) on one in-memory batch."""

    def __init__(self, job: JobConfig, model_args: dict, world_size: int, device: torch.device, seed: int):
        from pipeline.train.engine import build_engine
        from pipeline.train.objectives import build_objective

        self.job, self.device, self.world_size = job, device, world_size
        self.objective = build_objective(job, model_args)
        self.engine, self.dtype = build_engine(job, self.objective, world_size, device)
        self.images, self.targets = make_batch(job.train.global_batch_size // world_size, job.data.img_size,
                                               model_args["num_classes"], seed, device, self.dtype)

    def step(self) -> torch.Tensor:
        from pipeline.train.engine import train_step

        train = self.job.train
        return train_step(self.engine, self.objective, self.images, self.targets,
                          micro_batch=train.micro_batch_size_per_worker(),
                          accum=train.grad_accum_steps(self.world_size))


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
