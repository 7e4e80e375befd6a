"""Our ViT against timm's: same state_dict layout, same init, same outputs; plus training-mode behaviour."""

import pytest
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

from pipeline.model import VisionTransformer, build_model

SMALL = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=7)

PARITY_CONFIGS = {
    "class_token": dict(global_pool="token"),
    "avg_fc_norm": dict(global_pool="avg", fc_norm=None),
    "avg_no_fc_norm": dict(global_pool="avg", fc_norm=False),
    "layer_scale": dict(init_values=1e-5),
    "no_embed_class": dict(no_embed_class=True),
    "no_head": dict(num_classes=0),
    "no_class_token": dict(class_token=False, global_pool="avg"),
    "non_square": dict(img_size=(32, 48)),
    "patch_norm_no_qkv_bias": dict(embed_norm=True, qkv_bias=False),
}


def timm_kwargs(kwargs: dict) -> dict:
    if kwargs.pop("embed_norm", False):
        kwargs["embed_norm_layer"] = "layernorm"
    return kwargs


def build_pair(**overrides):
    kwargs = {**SMALL, **overrides}
    return VisionTransformer(**kwargs), TimmVisionTransformer(**timm_kwargs(dict(kwargs)))


@pytest.mark.parametrize("name", PARITY_CONFIGS)
def test_state_dict_layout_and_outputs_match_timm_both_ways(name):
    torch.manual_seed(0)
    ours, theirs = build_pair(**PARITY_CONFIGS[name])
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert list(ours_sd) == list(theirs_sd)
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in theirs_sd.items()}

    images = torch.randn(3, 3, *ours.patch_embed.img_size)
    ours.load_state_dict(theirs_sd, strict=True)  # timm's random init into ours
    ours.eval(), theirs.eval()
    with torch.no_grad():
        assert (ours(images) - theirs(images)).abs().max().item() <= 1e-5
        assert (ours.forward_features(images) - theirs.forward_features(images)).abs().max().item() <= 1e-5
        pre_ours = ours.forward_head(ours.forward_features(images), pre_logits=True)
        assert (pre_ours - theirs.forward_head(theirs.forward_features(images), pre_logits=True)).abs().max() <= 1e-5

    torch.manual_seed(1)
    fresh, theirs = build_pair(**PARITY_CONFIGS[name])
    theirs.load_state_dict(fresh.state_dict(), strict=True)  # ours into timm's
    fresh.eval(), theirs.eval()
    with torch.no_grad():
        assert (fresh(images) - theirs(images)).abs().max().item() <= 1e-5
    expected_width = SMALL["num_classes"] if PARITY_CONFIGS[name].get("num_classes", 1) else SMALL["embed_dim"]
    assert fresh(images).shape == (3, expected_width)


def test_default_init_matches_timm_statistics():
    torch.manual_seed(0)
    ours, theirs = build_pair(embed_dim=192, num_heads=3, init_values=1e-4)
    theirs_sd = theirs.state_dict()
    for key, ours_value in ours.state_dict().items():
        theirs_value = theirs_sd[key]
        if ours_value.numel() == 1 or key.endswith("gamma") or ".norm" in key or key.startswith("norm"):
            assert torch.equal(ours_value, theirs_value), key  # constants: LayerNorm ones/zeros, LayerScale
            continue
        assert ours_value.std().item() == pytest.approx(theirs_value.std().item(), rel=0.15, abs=1e-7), key
        assert ours_value.abs().max() <= theirs_value.abs().max() * 1.5 + 1e-6, key
    assert ours.cls_token.std().item() < 1e-5
    assert ours.pos_embed.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.count_nonzero(ours.blocks[0].mlp.fc1.bias) == 0


def test_dynamic_img_size_resamples_pos_embed_per_forward_like_timm():
    torch.manual_seed(0)
    ours, theirs = build_pair(dynamic_img_size=True)
    theirs.load_state_dict(ours.state_dict())
    ours.eval(), theirs.eval()
    images = torch.randn(2, 3, 48, 64)  # 6x8 grid on a model built for 4x4
    with torch.no_grad():
        out = ours(images)
        assert (out - theirs(images)).abs().max().item() <= 1e-5
    assert out.shape == (2, SMALL["num_classes"])


def test_drop_path_is_identity_in_eval_and_changes_outputs_in_train():
    torch.manual_seed(0)
    model = VisionTransformer(**SMALL, drop_path_rate=0.5)
    plain = VisionTransformer(**SMALL)
    plain.load_state_dict(model.state_dict())
    rates = [block.drop_path1.drop_prob for block in model.blocks[1:]]
    assert rates == pytest.approx([0.25, 0.5])  # linear from 0 over the blocks; block 0 has none
    images = torch.randn(8, 3, 32, 32)
    model.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(model(images), plain(images))
        model.train()
        torch.manual_seed(1)
        first = model(images)
        torch.manual_seed(2)
        second = model(images)
    assert (first - second).abs().max().item() > 1e-3
    assert (first - plain(images)).abs().max().item() > 1e-3


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_gradient_checkpointing_gives_the_same_gradients(global_pool):
    torch.manual_seed(0)
    plain = VisionTransformer(**SMALL, global_pool=global_pool, drop_path_rate=0.2, proj_drop_rate=0.1)
    checkpointed = VisionTransformer(**SMALL, global_pool=global_pool, drop_path_rate=0.2, proj_drop_rate=0.1)
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.set_grad_checkpointing(True)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for model in (plain, checkpointed):
        torch.manual_seed(3)  # same dropout / drop-path draws; checkpoint replays the RNG state
        torch.nn.functional.cross_entropy(model(images), labels).backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
    assert plain.pos_embed.grad.abs().sum() > 0


def test_class_token_shortcut_matches_full_forward_in_training_gradients():
    torch.manual_seed(0)
    model = VisionTransformer(**SMALL, init_values=0.1)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    fast = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    full_logits = model.forward_head(model.forward_features(images))
    torch.nn.functional.cross_entropy(full_logits, labels).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(fast[name], p.grad, atol=1e-6), name


def test_pos_embed_trained_at_224_loads_into_a_384_model():
    torch.manual_seed(0)
    kwargs = dict(patch_size=16, embed_dim=48, depth=2, num_heads=3, num_classes=5)
    low = VisionTransformer(img_size=224, **kwargs)
    high = VisionTransformer(img_size=384, **kwargs)
    high.load_state_dict(low.state_dict(), strict=True)
    assert high.pos_embed.shape == (1, 1 + 24 * 24, 48)
    expected = resample_abs_pos_embed(low.pos_embed.detach(), (24, 24), (14, 14), num_prefix_tokens=1)
    assert (high.pos_embed.detach() - expected).abs().max().item() <= 1e-6
    assert torch.equal(high.pos_embed[:, 0], low.pos_embed[:, 0])  # the [class] slot is not interpolated
    with torch.no_grad():
        out = high.eval()(torch.randn(2, 3, 384, 384))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="not divisible by patch size"):
        VisionTransformer(**{**SMALL, "img_size": 30})
    model = VisionTransformer(**SMALL)
    with pytest.raises(ValueError, match=r"input size \(48, 48\) does not match the model's img_size \(32, 32\)"):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="not divisible"):
        VisionTransformer(**SMALL, dynamic_img_size=True)(torch.randn(1, 3, 36, 32))
    with pytest.raises(ValueError, match="unknown model preset 'vit_huge'; known presets: .*vit_base_patch16_224"):
        build_model("vit_huge")
    with pytest.raises(ValueError, match="global_pool"):
        VisionTransformer(**SMALL, global_pool="max")
    state = model.state_dict()
    del state["head.weight"], state["blocks.0.attn.qkv.bias"]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*blocks.0.attn.qkv.bias.*head.weight"):
        VisionTransformer(**SMALL).load_state_dict(state, strict=True)
