"""AdamW parameter groups and the learning-rate schedule.

- No weight decay on norms, biases, LayerScale gammas, `pos_embed` and `cls_token` (timm's and the ViT
  recipes' rule: decaying them toward zero only hurts).
- Layer-wise learning-rate decay (BEiT/MAE fine-tuning): with L = depth + 1 layers, the patch embedding and
  the tokens are layer 0, block i is layer i + 1, and the final norm and head are layer L; a parameter's
  learning rate is lr x layer_decay ** (L - layer). layer_decay = 1 turns it off.
- Linear warmup from 0 to the peak, then cosine decay to `min_lr`, both in steps.
"""

import math
import re

import torch
from torch import nn


def layer_id(name: str, depth: int) -> int:
    """Layer index of parameter `name` for layer-wise decay: 0 embeddings, i + 1 for blocks.i, depth + 1 rest."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    match = re.match(r"blocks\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    return depth + 1


def no_weight_decay(name: str, param: nn.Parameter, skip: set[str]) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or name in skip


def build_param_groups(model: nn.Module, *, lr: float, weight_decay: float, layer_decay: float = 1.0
                       ) -> list[dict]:
    """Param groups for torch.optim.AdamW, each with its `lr`, `weight_decay` and the `lr_scale` it came from."""
    depth = len(model.blocks)
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_id(name, depth) if layer_decay != 1.0 else depth + 1
        decay = not no_weight_decay(name, param, skip)
        group = groups.get((layer, decay))
        if group is None:
            lr_scale = layer_decay ** (depth + 1 - layer)
            group = groups[(layer, decay)] = {
                "params": [], "param_names": [], "lr": lr * lr_scale, "lr_scale": lr_scale, "layer": layer,
                "weight_decay": weight_decay if decay else 0.0,
            }
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[key] for key in sorted(groups)]


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float, layer_decay: float = 1.0, fused: bool = False) -> torch.optim.AdamW:
    """torch AdamW over our param groups; `fused` (CUDA) runs the update as one kernel per group."""
    groups = build_param_groups(model, lr=lr, weight_decay=weight_decay, layer_decay=layer_decay)
    # torch's AdamW ignores extra keys such as param_names and lr_scale, and keeps them in its state
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                             fused=fused or None)


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Factor on each group's peak lr at `step` (0-based): linear warmup, then cosine to min_lr_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                    min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    def multiplier(step: int) -> float:
        return lr_multiplier(step, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
