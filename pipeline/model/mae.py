"""The masked autoencoder of "Masked Autoencoders Are Scalable Vision Learners" (He et al., 2021) around our ViT.

The encoder is the ViT itself, with timm's keys. Per sample, a random `mask_ratio` of the patch tokens is dropped
before the blocks (sort uniform noise, keep the first N(1 - ratio)), so the blocks see the visible patches and
the [class] token only. A light decoder (`decoder_*`: its own width, depth and heads) maps the encoded tokens to
its width, puts one learnt mask token at every masked position, adds its position embeddings and predicts each
patch's pixels. The loss is the MSE over the masked patches only; with `norm_pix_loss` each target patch is
normalised by its own mean and variance. Position embeddings are fixed 2D sin-cos in the encoder and the
decoder, as MAE's.

    model = MaskedAutoencoder(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12)
    loss, pred, mask = model(images)       # normalised (B, 3, H, W); pred (B, N, p*p*3); mask 1 where masked
    features = model(images, pooled=True)  # the whole image through the encoder, pooled by `global_pool`

The state_dict has MAE's own layout: the encoder's keys, and `mask_token` and `decoder_*` beside them.
`encoder_weights(state, …)` keeps the encoder alone, which loads strictly into `VisionTransformer(**encoder_args)`
(`num_classes=0`, the final norm before pooling) and into timm's ViT of the same arguments.
"""

import torch
from torch import nn

from pipeline.model.pos_embed import sincos_pos_embed_2d
from pipeline.model.vit import Block, LayerNorm, VisionTransformer

DECODER_KEYS = ("decoder_", "mask_token")  # prefixes of the keys that are not the encoder's


def encoder_args(vit_args: dict) -> dict:
    """The VisionTransformer arguments of an MAE encoder: no head, and the final norm before pooling (`norm`, as
    MAE's encoder and timm's `num_classes=0` ViT have it), whatever the pooling."""
    return {**vit_args, "num_classes": 0, "fc_norm": False}


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches in row-major grid order, each flattened row by row, channels last."""
    batch, channels, height, width = images.shape
    x = images.reshape(batch, channels, height // patch, patch, width // patch, patch)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(batch, (height // patch) * (width // patch), -1)


def unpatchify(patches: torch.Tensor, patch: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """The inverse of `patchify`."""
    batch = patches.shape[0]
    x = patches.reshape(batch, grid[0], grid[1], patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(batch, channels, grid[0] * patch, grid[1] * patch)


def pixel_targets(images: torch.Tensor, patch: int, norm_pix: bool) -> torch.Tensor:
    """What the decoder predicts, in fp32: each patch's pixels, normalised by the patch's own mean and (unbiased)
    variance with `norm_pix`, as MAE's `norm_pix_loss`."""
    target = patchify(images.float(), patch)
    if norm_pix:
        target = (target - target.mean(dim=-1, keepdim=True)) / (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()
    return target


class MaskedAutoencoder(VisionTransformer):
    def __init__(self, *, mask_ratio: float = 0.75, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, norm_pix_loss: bool = True, **vit_args):
        if vit_args.get("stem_widths"):
            raise ValueError("MAE masks patches before the encoder, and a hybrid CNN stem (stem_widths) would see "
                             "the masked pixels: use a plain patch embedding")
        if not vit_args.get("class_token", True) or vit_args.get("no_embed_class") or vit_args.get("dynamic_img_size"):
            raise ValueError("MAE's encoder keeps the [class] token with its position slot at a fixed image size "
                             "(class_token=True, no_embed_class=False, dynamic_img_size=False)")
        super().__init__(**encoder_args(vit_args))
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        if decoder_depth < 1 or decoder_embed_dim < 1 or decoder_embed_dim % decoder_num_heads:
            raise ValueError(f"the decoder's width {decoder_embed_dim} must be divisible by its heads "
                             f"{decoder_num_heads}, and its depth {decoder_depth} >= 1")
        num_patches = self.patch_embed.num_patches
        self.num_visible = round(num_patches * (1.0 - mask_ratio))
        if not 0 < self.num_visible < num_patches:
            raise ValueError(f"mask_ratio {mask_ratio} leaves {self.num_visible} of {num_patches} patches visible")
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch = self.patch_embed.patch_size[0]
        if self.patch_embed.patch_size[1] != self.patch:
            raise ValueError(f"MAE predicts square patches; patch_size is {self.patch_embed.patch_size}")
        grid = self.patch_embed.grid_size
        # fixed, not learnt: buffers outside the state_dict, so nothing is saved, decayed or partitioned for them
        del self.pos_embed
        self.register_buffer("pos_embed", sincos_pos_embed_2d(self.embed_dim, grid), persistent=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_embed = nn.Linear(self.embed_dim, decoder_embed_dim)
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(decoder_embed_dim, grid), persistent=False)
        mlp_ratio = vit_args.get("mlp_ratio", 4.0)
        self.decoder_blocks = nn.Sequential(*[Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True)
                                              for _ in range(decoder_depth)])
        self.decoder_norm = LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch * self.patch * self.patch_embed.in_chans)
        self.init_mae_weights()

    @torch.no_grad()
    def init_mae_weights(self) -> None:
        """MAE's init: xavier-uniform linears and patch projection (as a linear), normal(0.02) tokens."""
        weight = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def no_weight_decay(self) -> set[str]:
        return {*super().no_weight_decay(), "mask_token"}

    def random_masking(self, x: torch.Tensor, noise: torch.Tensor | None = None):
        """Keep `num_visible` tokens of each sample, those of the lowest noise. Returns the visible tokens, the
        mask (B, N) with 1 where masked, and the permutation that puts tokens back in grid order."""
        batch, num_patches, dim = x.shape
        if noise is None:
            noise = torch.rand(batch, num_patches, device=x.device)
        ids_shuffle = noise.argsort(dim=1)
        ids_restore = ids_shuffle.argsort(dim=1)
        visible = x.gather(1, ids_shuffle[:, :self.num_visible, None].expand(-1, -1, dim))
        mask = torch.ones(batch, num_patches, device=x.device)
        mask[:, :self.num_visible] = 0
        return visible, mask.gather(1, ids_restore), ids_restore

    def forward_encoder(self, images: torch.Tensor, noise: torch.Tensor | None = None):
        x = self.patch_embed(images) + self.pos_embed[:, 1:]
        x, mask, ids_restore = self.random_masking(x, noise)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return self.norm(self.run_blocks(torch.cat([cls, x], dim=1), self.blocks)), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)
        batch, tokens, width = x.shape
        masked = self.mask_token.expand(batch, ids_restore.shape[1] + 1 - tokens, -1)
        patches = torch.cat([x[:, 1:], masked], dim=1).gather(1, ids_restore[..., None].expand(-1, -1, width))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        return self.decoder_pred(self.decoder_norm(self.run_blocks(x, self.decoder_blocks)))[:, 1:]

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        per_patch = ((pred.float() - pixel_targets(images, self.patch, self.norm_pix_loss)) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None, pooled: bool = False):
        """(loss, pred, mask) of a masked reconstruction (the mask drawn from `noise` (B, N) when given), or with
        `pooled` the encoder's pooled features of the whole image."""
        if pooled:
            return self.pool(self.forward_features(images))
        latent, mask, ids_restore = self.forward_encoder(images, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(images, pred, mask), pred, mask


def encoder_weights(state: dict[str, torch.Tensor], embed_dim: int, grid_size: tuple[int, int]
                    ) -> dict[str, torch.Tensor]:
    """The encoder's part of a MaskedAutoencoder's state_dict (its decoder and mask token dropped), with the fixed
    position embedding in fp32: the keys and shapes of `VisionTransformer(**encoder_args(...))`."""
    encoder = {key: value for key, value in state.items() if not key.startswith(DECODER_KEYS)}
    encoder["pos_embed"] = sincos_pos_embed_2d(embed_dim, grid_size)
    return encoder
