import pytest
import torch

from pipeline.model import VisionTransformer, build_model


def test_hybrid_demo_preset_shapes_grid_and_backward():
    torch.manual_seed(0)
    model = build_model("vit_demo_hybrid_patch1_32")
    stem = model.patch_embed.backbone
    assert stem.reduction == 4 and model.patch_embed.grid_size == (8, 8)
    assert model.pos_embed.shape == (1, 1 + 64, 96)
    features = stem(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 64, 8, 8)
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 2])).backward()
    assert stem.root[0].weight.grad.abs().sum() > 0  # gradients reach the CNN
    assert model.patch_embed.proj.weight.shape == (96, 64, 1, 1)
    assert any(key.startswith("patch_embed.backbone.") for key in model.state_dict())


def test_hybrid_patch_size_counts_in_feature_map_pixels():
    model = VisionTransformer(img_size=64, patch_size=2, embed_dim=32, depth=1, num_heads=2, num_classes=3,
                              stem_widths=(16, 32))
    assert model.patch_embed.grid_size == (8, 8)  # 64 px / (stem 4 x patch 2)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    with pytest.raises(ValueError, match="stem reduction 4"):
        VisionTransformer(img_size=60, patch_size=2, embed_dim=32, depth=1, num_heads=2, stem_widths=(16, 32))


def test_hybrid_pos_embed_resamples_to_a_larger_image():
    torch.manual_seed(0)
    low = build_model("vit_demo_hybrid_patch1_32")
    high = build_model("vit_demo_hybrid_patch1_32", img_size=64)
    high.load_state_dict(low.state_dict())
    assert high.patch_embed.grid_size == (16, 16) and high.pos_embed.shape == (1, 1 + 256, 96)
    assert torch.isfinite(high.eval()(torch.randn(1, 3, 64, 64))).all()
