import pytest
import torch
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

from pipeline.model import PRESETS, build_model, flops_per_image, preset_kwargs


def vit_forward_flops(dim: int, depth: int, tokens: int, patch_pixels: int, num_classes: int) -> int:
    """Hand count: patch conv, full blocks, a last block that updates only the [class] token, and the head."""
    mlp = 8 * dim * dim
    full_block = tokens * (3 * dim * dim + dim * dim + mlp) + 2 * tokens * tokens * dim
    last_block = tokens * 3 * dim * dim + 2 * tokens * dim + dim * dim + mlp
    macs = (tokens - 1) * dim * patch_pixels + (depth - 1) * full_block + last_block + dim * num_classes
    return 2 * macs


def test_flops_per_image_vit_b16_matches_the_hand_count():
    model = build_model("vit_base_patch16_224")
    assert flops_per_image(model) == vit_forward_flops(768, 12, 197, 3 * 16 * 16, 1000)
    assert 32e9 < flops_per_image(model) < 36e9  # ~17.6 GMACs in the ViT paper's count, less the last block


def test_flops_for_avg_pool_counts_every_token_in_every_block():
    model = build_model("vit_demo_patch4_32", global_pool="avg", class_token=False)
    dim, tokens = 96, 64
    block = tokens * 12 * dim * dim + 2 * tokens * tokens * dim
    assert flops_per_image(model) == 2 * (tokens * dim * 48 + 4 * block + dim * 10)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_with_timm_layout(name):
    kwargs = preset_kwargs(name)
    with torch.device("meta"):  # no memory for the large presets
        ours = build_model(name)
        if "stem_widths" not in kwargs:
            theirs = TimmVisionTransformer(**kwargs)
            assert {k: v.shape for k, v in ours.state_dict().items()} == {
                k: v.shape for k, v in theirs.state_dict().items()}
    assert ours.patch_embed.img_size == (kwargs["img_size"],) * 2


def test_preset_overrides_apply():
    model = build_model("vit_demo_patch4_32", img_size=64, num_classes=3)
    assert model.patch_embed.grid_size == (16, 16) and model.head.out_features == 3
