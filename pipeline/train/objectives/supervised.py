"""Supervised classification: the ViT with its head, cross-entropy against the class labels (or mixup/cutmix's
class probabilities), label smoothing; evaluated by val loss, top-1 and top-5."""

import torch
import torch.nn.functional as F

from pipeline.config import JobConfig
from pipeline.model import VisionTransformer
from pipeline.train.evaluate import evaluate_collective
from pipeline.train.flops import model_flops_per_image
from pipeline.train.objectives import Evaluation


class Supervised:
    name = "supervised"
    needs_labels = True
    curves = ("train/loss", "val/top1")
    score_metric = "val/top1"
    higher_is_better = True

    def __init__(self, job: JobConfig, model_args: dict):
        self.model_args = model_args
        self.label_smoothing = job.optim.label_smoothing

    def build_module(self) -> VisionTransformer:
        return VisionTransformer(**self.model_args)

    def loss(self, module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(module(images).float(), targets, label_smoothing=self.label_smoothing)

    def forward_flops_per_image(self) -> int:
        return model_flops_per_image(self.model_args)

    def export(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state

    def eval_splits(self, run) -> dict:
        return {"val": (run.val_shards, len(run.classes))} if run.val_shards else {}

    def evaluate_collective(self, module, streams: dict, inputs, *, batch_size: int, world_size: int,
                            group=None) -> Evaluation:
        size = self.model_args["img_size"]
        return Evaluation(evaluate_collective(module, streams["val"], inputs, batch_size=batch_size,
                                              world_size=world_size, image_shape=(3, size, size)))

    def describe(self, metrics: dict[str, float]) -> str:
        line = f" | val top-1 {metrics['val/top1']:.3f} loss {metrics['val/loss']:.3f}"
        return line + (f" | ema top-1 {metrics['val_ema/top1']:.3f}" if "val_ema/top1" in metrics else "")

    def summary(self, metrics: dict[str, float]) -> str:
        return f"val top-1: {metrics.get('val/top1', float('nan')):.4f}"
