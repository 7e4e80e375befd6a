import math

import pytest
import torch

from pipeline.model import build_model
from pipeline.train.optim import build_optimizer, build_param_groups, build_scheduler, lr_multiplier


def group_of(groups, name):
    return next(g for g in groups if name in g["param_names"])


def test_no_weight_decay_on_norms_biases_tokens_and_layer_scale():
    model = build_model("vit_demo_patch4_32", init_values=1e-5)
    groups = build_param_groups(model, lr=1e-3, weight_decay=0.05)
    for name in ("pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "blocks.1.ls1.gamma",
                 "norm.weight", "head.bias"):
        assert group_of(groups, name)["weight_decay"] == 0.0, name
    for name in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.3.mlp.fc2.weight", "head.weight"):
        assert group_of(groups, name)["weight_decay"] == 0.05, name
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_layer_wise_decay_scales_learning_rates_by_depth():
    model = build_model("vit_demo_patch4_32")  # depth 4 -> layers 0 (embeddings) .. 5 (head)
    decay, lr = 0.65, 1e-3
    groups = build_param_groups(model, lr=lr, weight_decay=0.05, layer_decay=decay)
    expected = {"patch_embed.proj.weight": 5, "cls_token": 5, "pos_embed": 5, "blocks.0.attn.qkv.weight": 4,
                "blocks.3.mlp.fc1.weight": 1, "head.weight": 0, "norm.weight": 0}
    for name, exponent in expected.items():
        assert group_of(groups, name)["lr"] == pytest.approx(lr * decay**exponent), name
    optimizer = build_optimizer(model, lr=lr, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8, layer_decay=decay)
    assert sorted({round(g["lr"], 12) for g in optimizer.param_groups}) == sorted(
        {round(lr * decay**k, 12) for k in range(6)})


def test_warmup_then_cosine():
    kwargs = {"warmup_steps": 10, "total_steps": 110, "min_lr_ratio": 0.1}
    assert lr_multiplier(0, **kwargs) == pytest.approx(0.1)
    assert lr_multiplier(9, **kwargs) == pytest.approx(1.0)
    assert lr_multiplier(60, **kwargs) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(110, **kwargs) == pytest.approx(0.1)
    model = build_model("vit_demo_patch4_32")
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    scheduler = build_scheduler(optimizer, **kwargs)
    before = model.pos_embed.detach().clone()
    for _ in range(10):
        model.pos_embed.grad = torch.ones_like(model.pos_embed)
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-3 * lr_multiplier(10, **kwargs))
    # AdamW's first steps move a weight by about lr x multiplier each (the update m / sqrt(v) is 1 here)
    moved = (before - model.pos_embed.detach()).mean().item()
    assert moved == pytest.approx(sum(1e-3 * lr_multiplier(step, **kwargs) for step in range(10)), rel=1e-3)
