"""Evaluation and the weights' EMA: when an evaluation is due, the objective's eval streams, and the EMA that is
updated every step and evaluated beside the raw weights.

    validator = Validator(run, ctx, engine, objective, inputs, ledger, ema_weights=…, stop_step=…)
    validator.after_step()                  # every step: the EMA, when the run keeps one
    evaluation = validator.validate(step)   # None unless due; a collective when due
    validator.last                          # the latest val metrics, for checkpoints
"""

from __future__ import annotations

import torch

from pipeline.train.ema import WeightEMA
from pipeline.train.engine import eager_forward
from pipeline.train.objectives import Evaluation
from pipeline.train.progress import due


class Validator:
    """The eval splits the objective asks for are streamed once each (not trimmed to equal lengths, so every image
    counts) and read again at every evaluation: every `train.eval_every_n_steps` and at the last step."""

    def __init__(self, run, ctx, engine, objective, inputs, ledger, *,
                 ema_weights: dict[str, torch.Tensor] | None = None, stop_step: int):
        job = run.job
        self.ctx, self.engine, self.objective, self.inputs = ctx, engine, objective, inputs
        self.every, self.stop_step = job.train.eval_every_n_steps, stop_step
        self.batch_size = job.train.micro_batch_size_per_worker()
        self.ema = WeightEMA(engine.module, job.finetune.ema_decay) if job.finetune.ema_decay else None
        if self.ema is not None and ema_weights is not None:
            self.ema.load_state_dict(ema_weights)
        self.streams = {name: ctx.image_stream(shards, job.data, train=False, num_classes=num_classes, ledger=ledger,
                                               equal=False)
                        for name, (shards, num_classes) in objective.eval_splits(run).items()}
        self.last: dict[str, float] = {}

    def after_step(self) -> None:
        if self.ema is not None:
            self.ema.update()

    def validate(self, step: int) -> Evaluation | None:
        """The objective's evaluation of the raw weights and, with an EMA, val_ema/* of the averaged ones, when
        one is due at `step` (a collective then)."""
        if not self.streams or not due(step, self.every, self.stop_step):
            return None
        kwargs = {"batch_size": self.batch_size, "world_size": self.ctx.world_size, "group": self.ctx.cpu_group}
        with eager_forward(self.engine):
            evaluation = self.objective.evaluate_collective(self.engine, self.streams, self.inputs, **kwargs)
            if self.ema is not None:
                with self.ema.applied():
                    averaged = self.objective.evaluate_collective(self.engine, self.streams, self.inputs, **kwargs)
                evaluation.metrics.update({key.replace("val/", "val_ema/"): value
                                           for key, value in averaged.metrics.items()})
        self.last = evaluation.metrics
        return evaluation

    def ema_weights(self) -> dict[str, torch.Tensor] | None:
        return self.ema.state_dict() if self.ema is not None else None
