"""Named model presets (timm's names and sizes) and a FLOPs count for throughput and MFU reporting."""

import torch
from torch import nn

from pipeline.model.vit import Attention, VisionTransformer

_TINY = dict(embed_dim=192, depth=12, num_heads=3)
_SMALL = dict(embed_dim=384, depth=12, num_heads=6)
_BASE = dict(embed_dim=768, depth=12, num_heads=12)
_LARGE = dict(embed_dim=1024, depth=24, num_heads=16)
# the demo/test model: 32 px digits, 4 px patches -> 8x8 grid; small enough to train on 2 CPU cores in minutes
_DEMO = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, num_classes=10)

PRESETS: dict[str, dict] = {
    "vit_demo_patch4_32": _DEMO,
    "vit_demo_hybrid_patch1_32": {**_DEMO, "patch_size": 1, "stem_widths": (32, 64)},
    "vit_tiny_patch16_224": {**_TINY, "patch_size": 16},
    "vit_small_patch16_224": {**_SMALL, "patch_size": 16},
    "vit_small_patch32_224": {**_SMALL, "patch_size": 32},
    "vit_base_patch16_224": {**_BASE, "patch_size": 16},
    "vit_base_patch32_224": {**_BASE, "patch_size": 32},
    "vit_large_patch16_224": {**_LARGE, "patch_size": 16},
    "vit_large_patch14_224": {**_LARGE, "patch_size": 14},
    # R50+ViT-B/16-style hybrid: a stride-16 ResNet stem, then 1x1 patches on its 14x14 feature map
    "vit_base_hybrid_patch1_224": {**_BASE, "patch_size": 1, "stem_widths": (64, 128, 256, 512)},
}


# MAE's decoder (He et al.): 512 wide, 8 blocks, 16 heads for ViT-B/L/H. For Ti and S, whose blocks cost 4-16x less
# than B's, a decoder whose per-token cost against its encoder's is about that of MAE's decoder against ViT-L (8 %);
# a small one for the demo
MAE_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
MAE_DECODERS: dict[str, dict] = {
    "vit_demo_patch4_32": dict(decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4),
    "vit_tiny_patch16_224": dict(decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
    "vit_small_patch16_224": dict(decoder_embed_dim=256, decoder_depth=2, decoder_num_heads=8),
    "vit_small_patch32_224": dict(decoder_embed_dim=256, decoder_depth=2, decoder_num_heads=8),
}


def preset_kwargs(name: str, **overrides) -> dict:
    """The VisionTransformer arguments of preset `name`, with `overrides` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return {"img_size": 224, **PRESETS[name], **overrides}


def build_model(name: str, **overrides) -> VisionTransformer:
    """Build preset `name`; `overrides` replace any VisionTransformer argument (img_size=384, num_classes=…)."""
    return VisionTransformer(**preset_kwargs(name, **overrides))


@torch.no_grad()
def flops_per_image(model: VisionTransformer, img_size: int | tuple[int, int] | None = None, *,
                    parts: tuple[nn.Module, ...] = ()) -> int:
    """Forward FLOPs of one image (2 x multiply-accumulates of convs, linears and attention matmuls); with `parts`,
    of the modules inside those only (an MAE's encoder: its patch embedding and blocks).

    Norms, activations and softmax are left out, as in the ViT paper's and the MFU literature's counts.
    Counted from one real batch-1 forward with hooks, so the hybrid stem, any img_size and the class-token
    shortcut of the last block are counted as they run.
    """
    height, width = model.patch_embed.img_size if img_size is None else (
        img_size if isinstance(img_size, tuple) else (img_size, img_size))
    macs = 0

    def count(module, inputs, output):
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            macs += output.numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, nn.Linear):
            macs += output.numel() * module.in_features
        elif isinstance(module, Attention):
            _, keys, dim = inputs[0].shape
            macs += 2 * output.shape[1] * keys * dim  # q @ k^T and attn @ v over all heads

    counted = (nn.Conv2d, nn.Linear, Attention)
    handles = [m.register_forward_hook(count) for part in (parts or (model,)) for m in part.modules()
               if isinstance(m, counted)]
    param = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        if (height, width) != model.patch_embed.img_size and not model.dynamic_img_size:
            raise ValueError(f"img_size {(height, width)} differs from the model's {model.patch_embed.img_size}; "
                             "build the model at that size")
        model(torch.zeros(1, model.patch_embed.in_chans, height, width, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return 2 * macs
