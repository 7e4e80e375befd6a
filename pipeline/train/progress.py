"""The step line and the tracker: what every step reports, to the console on rank 0 and to MLflow.

    metrics = MetricsProcessor(run, ctx, objective, feed, state, stored_at=…, device=…, stop_step=…)
    metrics.log(state, loss=…, lr=…, data_wait_s=…, evaluation=…)   # every step; decides itself what is due
    metrics.tracker                                                  # rank 0's AttemptMetrics, or None
    metrics.close("FINISHED")
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from pipeline import storage
from pipeline.train.checkpoint import LoopState
from pipeline.train.flops import achieved_flops, device_peak_flops

log = logging.getLogger(__name__)


def due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """Rolling step timings for the step line and the rate metrics: images/s of the job, TFLOP/s per device from
    the forward FLOPs per image (pipeline/train/flops.py), and MFU when the device's peak is known."""

    def __init__(self, total_steps: int, start_step: int, images_per_step: int, *, forward_flops_per_image: float = 0.0,
                 world_size: int = 1, peak_flops_per_s: float | None = None):
        self.total_steps = total_steps
        self.images_per_step = images_per_step
        self.forward_flops_per_image = forward_flops_per_image
        self.world_size = world_size
        self.peak_flops_per_s = peak_flops_per_s
        self.window_start = time.perf_counter()
        self.window_steps = 0
        self.window_data_wait_s = 0.0
        self.losses: list[torch.Tensor] = []
        self.run_start = self.window_start
        self.start_step = start_step

    def add(self, loss: torch.Tensor, data_wait_s: float) -> None:
        self.window_steps += 1
        self.window_data_wait_s += data_wait_s
        self.losses.append(loss)

    def flush_collective(self, step: int, lr: float, world_size: int, group=None) -> tuple[dict[str, float], str]:
        """The window's metrics (loss averaged over ranks: a collective) and its step line; a new window."""
        now = time.perf_counter()
        elapsed_s = max(now - self.window_start, 1e-9)
        loss = torch.stack(self.losses).float().mean().cpu()
        if world_size > 1:
            dist.all_reduce(loss, group=group)  # `group`: the context's for CPU tensors
            loss /= world_size
        steps = max(self.window_steps, 1)
        metrics = {
            "train/loss": loss.item(),
            "train/lr": lr,
            "train/images_per_s": self.window_steps * self.images_per_step / elapsed_s,
            "train/step_time_s": (elapsed_s - self.window_data_wait_s) / steps,
            "train/data_wait_s": self.window_data_wait_s / steps,
        }
        rates = ""
        if self.forward_flops_per_image:
            device_flops = achieved_flops(self.forward_flops_per_image,
                                          metrics["train/images_per_s"] / self.world_size)
            metrics["train/tflops"] = device_flops / 1e12  # per device: what one card's peak compares with
            rates = f" | {metrics['train/tflops']:.3g} TFLOP/s/device"
            if self.peak_flops_per_s:
                metrics["train/mfu"] = device_flops / self.peak_flops_per_s
                rates += f" | MFU {100 * metrics['train/mfu']:.1f}%"
        eta_s = (now - self.run_start) / max(step - self.start_step, 1) * (self.total_steps - step)
        line = (f"step {step}/{self.total_steps} | loss {metrics['train/loss']:.3f} | lr {lr:.2e} | "
                f"{metrics['train/images_per_s']:.0f} img/s{rates} | data wait "
                f"{100 * self.window_data_wait_s / elapsed_s:.0f}% | eta {format_duration(eta_s)}")
        self.window_start, self.window_steps, self.window_data_wait_s, self.losses = now, 0, 0.0, []
        return metrics, line


class MetricsProcessor:
    """Owns the step line and the tracker. Every `train.log_every_n_steps` (and the first step of an attempt) it
    averages the window's loss over the ranks and logs the rates, the data counts and the position; an evaluation
    is logged at its step, its pictures too. Rank 0 prints the line and sends everything to MLflow
    (tracking/attempts.py), which never blocks a step."""

    def __init__(self, run, ctx, objective, feed, state: LoopState, *, stored_at: str | None, device: torch.device,
                 stop_step: int):
        train_cfg = run.job.train
        self.ctx, self.objective, self.feed, self.stop_step = ctx, objective, feed, stop_step
        self.every = train_cfg.log_every_n_steps
        self.total_steps = train_cfg.steps
        self.resumed_from = state.step
        self.logged: dict[str, float] = {}  # the metrics of the latest step, for its checkpoint's report
        self.tracker = None
        if ctx.rank == 0 and run.mlflow_run_id:
            from pipeline.tracking.attempts import AttemptMetrics
            from pipeline.tracking.datasets import dataset_key

            self.tracker = AttemptMetrics(
                run.tracking_uri, run.mlflow_run_id, run_name=run.run_name, world_size=ctx.world_size,
                start_step=state.step, carried=state.job_run_metrics, model_params=run.model_params(),
                val_dataset=dataset_key(run.val_shards) if run.val_shards else None,
                resumed_location=storage.to_uri(run.storage_path, stored_at) if stored_at else None)
        peak, device_name = device_peak_flops(device, train_cfg.peak_tflops)
        if ctx.rank == 0 and device.type == "cuda" and peak is None:
            log.warning("no peak bf16 FLOP/s known for %r: train/mfu is not logged; set train.peak_tflops to the "
                        "card's dense bf16 peak to have it", device_name)
        self.progress = Progress(train_cfg.steps, state.step, train_cfg.global_batch_size,
                                 forward_flops_per_image=objective.forward_flops_per_image(),
                                 world_size=ctx.world_size, peak_flops_per_s=peak)

    def log(self, state: LoopState, *, epoch: int, loss: torch.Tensor, lr: float, data_wait_s: float,
            evaluation=None) -> None:
        """The step just trained: its loss (this rank's), its lr, how long it waited for data, and the evaluation
        made after it, if any (a collective when the window is due)."""
        self.progress.add(loss, data_wait_s)
        step = state.step
        metrics: dict[str, float] = {}
        line = ""
        if due(step, self.every, self.stop_step) or step == self.resumed_from + 1:
            window, line = self.progress.flush_collective(step, lr, self.ctx.world_size, self.ctx.cpu_group)
            metrics.update(window)
            metrics.update(self.feed.metrics())
            metrics.update({"train/epoch": epoch, "train/world_size": self.ctx.world_size})
            if step == self.resumed_from + 1 and self.resumed_from:  # where a restarted or resumed attempt picked up
                metrics["train/resumed_at_step"] = self.resumed_from
        if evaluation is not None:
            metrics.update(evaluation.metrics)
            line = (line or f"step {step}/{self.total_steps}") + self.objective.describe(evaluation.metrics)
        if self.ctx.rank == 0 and line:
            log.info(line)
        if self.tracker is not None:
            if metrics:
                self.tracker.log(metrics, step=step)
            if evaluation is not None and evaluation.images:
                self.tracker.log_images(evaluation.images, step=step)
        self.logged = metrics

    def close(self, outcome: str) -> None:
        if self.tracker is not None:
            self.tracker.close(outcome)
