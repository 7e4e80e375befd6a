"""The Vision Transformer of "An Image is Worth 16x16 Words" (Dosovitskiy et al., ICLR 2021), as timm writes it.

An image of H x W x C becomes N = HW / P^2 flattened patches, each projected to D dimensions by a Conv2d whose
kernel equals its stride. A learnable [class] token is prepended, learnable 1D position embeddings are added,
and pre-norm Transformer blocks follow:

    x = x + drop_path1(ls1(attn(norm1(x))))
    x = x + drop_path2(ls2(mlp(norm2(x))))

The [class] token (or the mean of the patch tokens) goes through fc_norm and the head. The `state_dict` keys,
shapes and default initialisation equal those of `timm.models.vision_transformer.VisionTransformer` built with
the same arguments, so weights move both ways. This module is single-device plain torch: distribution,
precision and checkpoint sharding are applied from outside (pipeline.train).
"""

import logging
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.model.hybrid import ResNetStem
from pipeline.model.pos_embed import infer_square_grid, resample_pos_embed

log = logging.getLogger(__name__)

GLOBAL_POOLS = ("token", "avg")
LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def to_2tuple(value: int | tuple[int, int]) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class PatchEmbed(nn.Module):
    """Image to patch tokens: Conv2d with kernel = stride = patch, optionally after a hybrid CNN stem.

    With a stem, `patch_size` counts in feature-map pixels, so one token covers `stem.reduction * patch_size`
    image pixels per side. Output is (B, N, D), or (B, H', W', D) with `output_nhwc` for dynamic sizes.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        norm_layer=None,
        stem_widths: tuple[int, ...] | None = None,
        strict_img_size: bool = True,
        output_nhwc: bool = False,
    ):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.in_chans = in_chans
        self.strict_img_size = strict_img_size
        self.output_nhwc = output_nhwc
        self.backbone = ResNetStem(in_chans, tuple(stem_widths)) if stem_widths else None
        stem_reduction = self.backbone.reduction if self.backbone is not None else 1
        # image pixels per token along each side
        self.pixels_per_token = tuple(stem_reduction * p for p in self.patch_size)
        for side, size, step in zip(("height", "width"), self.img_size, self.pixels_per_token, strict=True):
            if size <= 0 or size % step:
                stem_note = f" times the stem reduction {stem_reduction}" if self.backbone is not None else ""
                raise ValueError(f"img_size {side} {size} is not divisible by patch size {self.patch_size}{stem_note}")
        self.grid_size = tuple(s // step for s, step in zip(self.img_size, self.pixels_per_token, strict=True))
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        proj_in_chans = self.backbone.out_chans if self.backbone is not None else in_chans
        self.proj = nn.Conv2d(proj_in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
        _, channels, height, width = x.shape
        if channels != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channels, got {channels} (input {tuple(x.shape)})")
        if self.strict_img_size:
            if (height, width) != self.img_size:
                raise ValueError(
                    f"input size {(height, width)} does not match the model's img_size {self.img_size}; build the "
                    "model at that size (pretrained position embeddings are resampled on load) or set "
                    "dynamic_img_size=True"
                )
        elif height % self.pixels_per_token[0] or width % self.pixels_per_token[1]:
            raise ValueError(
                f"input size {(height, width)} is not divisible by {self.pixels_per_token} pixels per token"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if self.backbone is not None:
            x = self.backbone(x)
        x = self.proj(x)
        x = x.permute(0, 2, 3, 1) if self.output_nhwc else x.flatten(2).transpose(1, 2)
        return self.norm(x)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and torch's scaled_dot_product_attention."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, num_queries: int | None = None) -> torch.Tensor:
        """Attend from every token, or only from the first `num_queries` tokens (keys and values stay all)."""
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if num_queries is not None:
            q = q[:, :, :num_queries]
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(batch, q.shape[2], dim)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class LayerScale(nn.Module):
    """Per-channel learnable residual scale (CaiT), which helps deeper image transformers train."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, scaling survivors by 1 / keep."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * mask.div_(keep_prob) if keep_prob > 0.0 else x * mask

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Block(nn.Module):
    """Pre-norm Transformer encoder block: LN -> MSA -> LayerScale -> DropPath, LN -> MLP -> LayerScale -> DropPath."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, init_values: float | None = None,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, num_queries: int | None = None) -> torch.Tensor:
        """With `num_queries`, only the first tokens are updated and returned; the others serve as keys/values."""
        if num_queries is None:
            x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        else:
            x = x[:, :num_queries] + self.drop_path1(self.ls1(self.attn(self.norm1(x), num_queries)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class VisionTransformer(nn.Module):
    """ViT with timm's arguments, defaults and state_dict layout.

    `global_pool` is "token" (the [class] token) or "avg" (mean of patch tokens). `fc_norm=None` puts the final
    norm after pooling for "avg" and before it for "token", as timm does. `num_classes=0` drops the head.
    `drop_path_rate` rises linearly from 0 over the blocks. `stem_widths` turns on the hybrid CNN stem.
    A state_dict whose position embedding was trained on another grid is resampled on load.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: float | None = None,
        class_token: bool = True,
        no_embed_class: bool = False,
        fc_norm: bool | None = None,
        dynamic_img_size: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        embed_norm: bool = False,
        stem_widths: tuple[int, ...] | None = None,
    ):
        super().__init__()
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if num_classes < 0 or depth < 1:
            raise ValueError(f"num_classes must be >= 0 and depth >= 1, got {num_classes} and {depth}")
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm

        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = self.num_features = embed_dim
        self.num_prefix_tokens = 1 if class_token else 0
        self.no_embed_class = no_embed_class
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(
            img_size, patch_size, in_chans, embed_dim,
            norm_layer=LayerNorm if embed_norm else None,
            stem_widths=stem_widths,
            strict_img_size=not dynamic_img_size,
            output_nhwc=dynamic_img_size,
        )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        drop_path_rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # also under a meta device
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                  attn_drop=attn_drop_rate, init_values=init_values, drop_path=rate)
            for rate in drop_path_rates
        ])
        self.norm = LayerNorm(embed_dim) if not use_fc_norm else nn.Identity()
        self.fc_norm = LayerNorm(embed_dim) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        self.init_weights()
        self.register_load_state_dict_pre_hook(resample_pos_embed_on_load)

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's default init: trunc-normal(0.02) linears with zero bias, tiny [class] token."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them."""
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        pos_embed = self.pos_embed
        if self.dynamic_img_size:
            batch, height, width, dim = x.shape
            pos_embed = resample_pos_embed(
                pos_embed, (height, width), self.patch_embed.grid_size,
                num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens,
            )
            x = x.reshape(batch, height * width, dim)
        if self.no_embed_class:
            # DeiT-3 / big_vision: position embeddings cover patches only, so add first, then prepend [class]
            x = x + pos_embed
            if self.cls_token is not None:
                x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        else:
            # original ViT: position embeddings include the [class] slot, so prepend first, then add
            if self.cls_token is not None:
                x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            x = x + pos_embed
        return self.pos_drop(x)

    def run_blocks(self, x: torch.Tensor, blocks: nn.Sequential) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            for block in blocks:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        return blocks(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._pos_embed(self.patch_embed(x))
        return self.norm(self.run_blocks(x, self.blocks))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "token":
            return x[:, 0]
        return x[:, self.num_prefix_tokens:].mean(dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool != "token":
            return self.forward_head(self.forward_features(x))
        # Only the [class] token reaches the head, so the last block updates (and the final norm sees) it alone:
        # the same logits as forward_head(forward_features(x)), ~1/depth less compute in forward and backward.
        x = self.run_blocks(self._pos_embed(self.patch_embed(x)), self.blocks[:-1])
        last = self.blocks[-1]
        if self.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(last, x, 1, use_reentrant=False)
        else:
            x = last(x, num_queries=1)
        return self.forward_head(self.norm(x))


def resample_pos_embed_on_load(module: VisionTransformer, state_dict, prefix, *args) -> None:
    """Load-time hook: resample a position embedding trained on another grid to this model's grid."""
    key = prefix + "pos_embed"
    if key not in state_dict:
        return
    source = state_dict[key]
    target_shape = module.pos_embed.shape
    if source.shape == target_shape:
        return
    num_prefix_tokens = 0 if module.no_embed_class else module.num_prefix_tokens
    if source.ndim != 3 or source.shape[-1] != target_shape[-1]:
        raise ValueError(f"{key}: shape {tuple(source.shape)} cannot be resampled to {tuple(target_shape)}")
    old_size = infer_square_grid(source.shape[1] - num_prefix_tokens)
    state_dict[key] = resample_pos_embed(source, module.patch_embed.grid_size, old_size, num_prefix_tokens)
    log.info("resampled %s from grid %s to %s", key, old_size, module.patch_embed.grid_size)
