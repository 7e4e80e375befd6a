"""MAE's module: the loss against the published formula written out sample by sample and patch by patch, the
per-sample masking, the encoder's FLOPs as the visible count sets them, and the exported encoder in timm."""

import itertools

import pytest
import timm
import torch

from pipeline.model import VisionTransformer, flops_per_image, preset_kwargs
from pipeline.model.mae import MaskedAutoencoder, encoder_args, encoder_weights

SMALL = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
DECODER = dict(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_the_loss_is_the_published_formula_over_masked_patches(norm_pix):
    torch.manual_seed(0)
    model = MaskedAutoencoder(**SMALL, **DECODER, norm_pix_loss=norm_pix).eval()
    images = torch.randn(3, 3, 16, 16)
    noise = torch.rand(3, 16)
    loss, pred, mask = model(images, noise=noise)

    p, side, visible = 4, 4, round(16 * 0.25)
    total, count = 0.0, 0
    for n in range(3):
        kept = set(noise[n].argsort()[:visible].tolist())  # the lowest noise stays visible
        for row, col in itertools.product(range(side), range(side)):
            patch = row * side + col
            assert mask[n, patch] == (0.0 if patch in kept else 1.0)
            if patch in kept:
                continue
            # the patch's pixels, row by row, each pixel's channels together: what the decoder predicts
            target = images[n, :, row * p:(row + 1) * p, col * p:(col + 1) * p].permute(1, 2, 0).reshape(-1)
            if norm_pix:
                mean = sum(target.tolist()) / len(target)
                var = sum((x - mean) ** 2 for x in target.tolist()) / (len(target) - 1)
                target = (target - mean) / (var + 1e-6) ** 0.5
            total += sum((a - b) ** 2 for a, b in zip(pred[n, patch].tolist(), target.tolist(), strict=True)) / 48
            count += 1
    assert count == 3 * 12
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_masking_keeps_round_n_times_one_minus_ratio_patches_different_per_sample():
    torch.manual_seed(0)
    for ratio, patches in ((0.75, 16), (0.6, 16), (0.9, 64), (0.3, 64)):
        side = int(patches ** 0.5)
        model = MaskedAutoencoder(**{**SMALL, "img_size": 4 * side}, **DECODER, mask_ratio=ratio)
        _, _, mask = model(torch.randn(8, 3, 4 * side, 4 * side))
        visible = round(patches * (1 - ratio))
        assert model.num_visible == visible
        assert (mask.sum(dim=1) == patches - visible).all()
        assert len({tuple(row.tolist()) for row in mask}) == 8  # a mask of its own per sample
    with pytest.raises(ValueError, match="leaves 0 of 16 patches visible"):
        MaskedAutoencoder(**SMALL, **DECODER, mask_ratio=0.97)


def test_the_encoder_runs_on_the_visible_patches_only():
    args = preset_kwargs("vit_small_patch16_224")
    dim, depth, patches = args["embed_dim"], args["depth"], 196
    for ratio in (0.25, 0.5, 0.75, 0.9):
        with torch.device("meta"):
            model = MaskedAutoencoder(**args, decoder_embed_dim=256, decoder_depth=2, decoder_num_heads=8,
                                      mask_ratio=ratio)
        tokens = model.num_visible + 1  # and the [class] token
        # patch embedding of every patch, then per block qkv, proj, fc1, fc2 (12 D^2 per token) and the attention
        macs = patches * 3 * 16 * 16 * dim + depth * (12 * dim * dim * tokens + 2 * tokens * tokens * dim)
        assert flops_per_image(model, parts=(model.patch_embed, model.blocks)) == 2 * macs, ratio
    with torch.device("meta"):
        supervised = flops_per_image(VisionTransformer(**args))
        mae = flops_per_image(MaskedAutoencoder(**args, decoder_embed_dim=256, decoder_depth=2, decoder_num_heads=8))
    assert supervised / mae > 2.5  # the whole step: a quarter of the encoder, and a light decoder


@pytest.mark.parametrize("preset,pool", [("vit_base_patch16_224", "token"), ("vit_tiny_patch16_224", "avg")])
def test_the_exported_encoder_loads_strictly_into_timm_with_equal_features(preset, pool):
    torch.manual_seed(0)
    args = preset_kwargs(preset, global_pool=pool)
    model = MaskedAutoencoder(**args)  # MAE's decoder: 512 wide, 8 blocks, 16 heads
    for param in model.parameters():  # trained-looking weights, not the init's zeros and ones
        param.data.add_(torch.randn_like(param) * 0.02)
    weights = encoder_weights(model.state_dict(), args["embed_dim"], (14, 14))
    assert not any(key.startswith(("decoder_", "mask_token")) for key in weights)
    ours = VisionTransformer(**encoder_args(args))
    ours.load_state_dict(weights, strict=True)
    reference = timm.create_model(preset, pretrained=False, num_classes=0, global_pool=pool, fc_norm=False)
    reference.load_state_dict(weights, strict=True)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference.eval()(images)
        torch.testing.assert_close(ours.eval()(images), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(model.eval()(images, pooled=True), expected, rtol=0, atol=1e-5)
