"""What a run learns. An objective owns the module it trains around `pipeline.model.VisionTransformer`, its loss on
a batch and what a batch must hold, its evaluation, its FLOPs per image and the weights it exports; the loop
(pipeline/train/loop.py) knows none of them. `train.objective` names one:

    supervised   class labels, cross-entropy (mixup/cutmix, label smoothing); val loss, top-1, top-5
    mae          masked autoencoding of the images alone (He et al., 2021); val reconstruction loss against the
                 predict-the-mean baseline, a k-NN top-1 monitor where the shards have labels, a reconstruction PNG

    objective = build_objective(job, model_args)      # job: as resolved (resolved_job.py)
    module = objective.build_module()                  # what DeepSpeed wraps (engine.py)
    loss = objective.loss(engine, images, targets)     # one micro-batch: normalised images, InputPipeline's targets
    evaluation = objective.evaluate_collective(engine, streams, inputs, batch_size=…, world_size=…, group=…)
    weights = objective.export(full_state_dict)        # model.safetensors, with timm's keys
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn

from pipeline.config import JobConfig


@dataclass
class Evaluation:
    metrics: dict[str, float]  # val/... summed over every rank
    images: dict[str, np.ndarray] = field(default_factory=dict)  # on rank 0: name -> (H, W, 3) uint8, for MLflow


class Objective(Protocol):
    name: str
    model_args: dict  # VisionTransformer(**model_args) is the model whose weights it exports
    needs_labels: bool  # every training sample must carry a class label
    curves: tuple[str, ...]  # the metrics of the run's curves PNG
    score_metric: str  # the val metric that ranks checkpoints (tracking.register_as, Ray's checkpoint order) ...
    higher_is_better: bool  # ... and which way

    def build_module(self) -> nn.Module: ...

    def loss(self, module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def forward_flops_per_image(self) -> int: ...

    def export(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def eval_splits(self, run) -> dict: ...

    def evaluate_collective(self, module, streams: dict, inputs, *, batch_size: int, world_size: int,
                            group=None) -> Evaluation: ...

    def describe(self, metrics: dict[str, float]) -> str: ...  # a step line's part: " | val top-1 0.912 …"

    def summary(self, metrics: dict[str, float]) -> str: ...  # a job's last line: "val top-1: 0.9123"


def objective_type(name: str) -> type:
    """The class of the objective `train.objective` names (config.OBJECTIVES)."""
    if name == "mae":
        from pipeline.train.objectives.mae import MaskedAutoencoding

        return MaskedAutoencoding
    from pipeline.train.objectives.supervised import Supervised

    return Supervised


def build_objective(job: JobConfig, model_args: dict) -> Objective:
    """The objective `job.train.objective` names, around the ViT of `model_args` (a preset's arguments; the
    objective's `model_args` are what it builds: MAE's encoder has no head)."""
    return objective_type(job.train.objective)(job, model_args)


def score(objective: Objective, metrics: dict[str, float]) -> float:
    """A checkpoint's rank from its latest val metrics, higher better: -inf before the first evaluation."""
    value = metrics.get(objective.score_metric)
    if value is None:
        return float("-inf")
    return value if objective.higher_is_better else -value
