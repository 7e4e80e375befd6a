"""A run's checkpoints: where it resumes from, when one is due, the save on every rank, the report, the commit of
its steps' metrics and its logged model, and the drain.

    checkpointer = Checkpointer(run, ctx, engine, objective, stop_step=…)
    state, stored_at, ema_weights = checkpointer.restore()   # the context's latest checkpoint, or train.resume_from
    checkpointer.save(state, feed, validator, metrics)       # every step; a collective; decides itself what is due

A checkpoint is due every `train.checkpoint_every_n_steps`, at the last step, and when Ray drains a node of the
worker group; after a drain's checkpoint the group waits to be restarted from it.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

from pipeline import storage
from pipeline.train.checkpoint import (
    EMA_WEIGHTS_FILE,
    SCORE_KEY,
    CheckpointDamaged,
    LoopState,
    checkpoint_problem,
    kept_before,
    load_checkpoint,
    local_checkpoint,
    read_weights,
    save_checkpoint_collective,
)
from pipeline.train.objectives import score
from pipeline.train.progress import due

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, run, ctx, engine, objective, *, stop_step: int):
        self.run, self.ctx, self.engine, self.objective = run, ctx, engine, objective
        self.every = run.job.train.checkpoint_every_n_steps
        self.stop_step = stop_step

    def restore(self) -> tuple[LoopState, str | None, dict[str, torch.Tensor] | None]:
        """Every rank (a collective): the engine restored from the context's latest checkpoint (a restart) or
        `train.resume_from`. Returns the loop state, where the checkpoint is stored (None for a fresh start or
        resume_from), and its EMA weights when it holds some.

        Each checkpoint is checked against the checksums written at save first, the ranks sharing the reading. A
        damaged latest checkpoint gives way to the newest whole one kept before it, in one line; when there is
        none, or `resume_from` is damaged, CheckpointDamaged ends the job (no restart would cure it)."""
        resume_from = self.run.job.train.resume_from
        with self.ctx.latest_checkpoint() as (checkpoint_dir, stored_at):
            if checkpoint_dir:
                problem = self._problem_collective(checkpoint_dir)
                if problem is None:
                    return self._load(checkpoint_dir, stored_at, stored_at)
        if not checkpoint_dir:
            if not resume_from:
                return LoopState(), None, None
            with local_checkpoint(resume_from) as source:
                problem = self._problem_collective(source)
                if problem is not None:
                    raise CheckpointDamaged(f"train.resume_from: {resume_from} is damaged: {problem}")
                return self._load(source, resume_from, None)
        damaged = storage.to_uri(self.run.storage_path, stored_at)
        for older in kept_before(damaged):
            with local_checkpoint(older) as source:
                if self._problem_collective(source, required=True) is None:
                    if self.ctx.rank == 0:
                        log.warning("checkpoint %s is damaged (%s): resuming from the newest whole one before it",
                                    damaged, problem)
                    return self._load(source, older, older)
        raise CheckpointDamaged(f"checkpoint {damaged} is damaged ({problem}), and no whole checkpoint is kept before "
                                "it: resume_from a good one, or start anew under another train.run_name")

    def _problem_collective(self, source: str, *, required: bool = False) -> str | None:
        """What is wrong with the local checkpoint folder `source` (checkpoint.checkpoint_problem), every rank
        reading its share; the same answer on every rank. `required`: a folder without checksums is damaged."""
        problem = checkpoint_problem(source, part=(self.ctx.rank, self.ctx.world_size), required=required)
        if self.ctx.world_size > 1:
            problems = [None] * self.ctx.world_size
            dist.all_gather_object(problems, problem, group=self.ctx.cpu_group)
            problem = next((p for p in problems if p), None)
        return problem

    def _load(self, source: str, label: str, stored_at: str | None
              ) -> tuple[LoopState, str | None, dict[str, torch.Tensor] | None]:
        """The engine restored from the local checkpoint folder `source` (`label`: where it is, for the log)."""
        from pipeline.model import VisionTransformer

        with torch.device("meta"):  # what model.safetensors holds: the objective's export of the module
            exported = VisionTransformer(**self.run.model_args)
        state = load_checkpoint(self.engine, source, local_rank=self.ctx.local_rank, weights_model=exported)
        if self.ctx.rank == 0:
            record = state.epoch_record()
            log.info("resumed from %s at step %d (epoch %d: %d shards done, %d partly read)", label, state.step,
                     state.epoch, len(record.done), len(record.partial))
        ema_path = os.path.join(source, EMA_WEIGHTS_FILE)
        keeps_ema = self.run.job.finetune.ema_decay and os.path.exists(ema_path)
        return state, stored_at, read_weights(ema_path) if keeps_ema else None

    def save(self, state: LoopState, feed, validator, metrics) -> None:
        """After each step, on every rank (a collective): checkpoint if one is due or a node is being drained."""
        drain_deadline = self.ctx.preemption_deadline_collective()
        rank0 = self.ctx.rank == 0
        if drain_deadline is not None and rank0:
            log.info("a node of the worker group is being drained (%s): checkpoint at step %d now",
                     f"deadline in {drain_deadline / 1000 - time.time():.0f} s" if drain_deadline else
                     "no deadline given", state.step)
        if not due(state.step, self.every, self.stop_step) and drain_deadline is None:
            return
        last_val = validator.last
        report = {"step": state.step, "epoch": state.epoch, "images_seen": state.images_seen,
                  **{k: v for k, v in metrics.logged.items() if k.startswith(("train/", "val"))},
                  **{f"last_{k}": v for k, v in last_val.items()}, SCORE_KEY: score(self.objective, last_val)}
        tracker = metrics.tracker
        if tracker is not None:
            state.job_run_metrics = tracker.carried()
        location = self._save_collective(state, feed, validator, report)
        if location and tracker is not None:
            tracker.commit(state.step, location)
        if drain_deadline is not None and state.step < self.stop_step:
            if tracker is not None:  # the metrics sent while this group waits to be ended
                tracker.flush(10.0)
            if rank0:
                log.info("checkpoint for the drain saved; training resumes from it once Ray Train restarts the "
                         "worker group without the drained node")
            self.ctx.wait_for_restart(drain_deadline)

    def _save_collective(self, state: LoopState, feed, validator, report: dict) -> str | None:
        """The data position agreed by all ranks, the DeepSpeed state and the exported weights, reported to the
        context; on rank 0, where the checkpoint was committed (a path or storage URI), None if it was not."""
        record, bad_samples = feed.record_collective()
        state.set_epoch_record(record)
        state.bad_samples = asdict(bad_samples)
        ema = validator.ema_weights()
        with tempfile.TemporaryDirectory(prefix="vit-checkpoint-") as directory:
            save_checkpoint_collective(self.engine, directory, rank=self.ctx.rank, state=state,
                                       model_config=self.run.record(), export=self.objective.export,
                                       ema_weights=self.objective.export(ema) if ema is not None else None)
            location = self.ctx.report(report, directory)
        if self.ctx.rank == 0 and location:
            location = storage.to_uri(self.run.storage_path, location)
            log.info("checkpoint step %d: %s", state.step, location)
        return location
