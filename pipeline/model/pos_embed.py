"""Resampling learned 1D position embeddings on their 2D patch grid.

The ViT paper fine-tunes at a higher resolution than it pretrains, with the same patch size, so the token grid
grows. The pretrained position embeddings keep their meaning only if they are interpolated in 2D over the old
grid, which is what this module does (bicubic, antialiased, in fp32), leaving prefix tokens ([class]) untouched.
"""

import logging
import math

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_size: tuple[int, int],
    old_size: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample a (1, prefix + H*W, D) position embedding from grid `old_size` to grid `new_size`.

    `num_prefix_tokens` counts the leading tokens that carry no grid position (the [class] token when the
    embedding includes it; 0 for `no_embed_class` models). `old_size` defaults to the square grid that the
    token count implies.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, tokens, dim), got {tuple(pos_embed.shape)}")
    num_grid_tokens = pos_embed.shape[1] - num_prefix_tokens
    if old_size is None:
        old_size = infer_square_grid(num_grid_tokens)
    old_size, new_size = tuple(old_size), tuple(new_size)
    if old_size[0] * old_size[1] != num_grid_tokens:
        raise ValueError(
            f"pos_embed has {num_grid_tokens} grid tokens (after {num_prefix_tokens} prefix tokens), "
            f"which does not match old grid {old_size}"
        )
    if old_size == new_size:
        return pos_embed

    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    # interpolate needs fp32 for bicubic+antialias and for accuracy under bf16 training
    grid = grid.float().reshape(1, old_size[0], old_size[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_size, mode=interpolation, antialias=antialias, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_size[0] * new_size[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def infer_square_grid(num_grid_tokens: int) -> tuple[int, int]:
    side = math.isqrt(num_grid_tokens)
    if side * side != num_grid_tokens:
        raise ValueError(
            f"cannot infer the grid of a position embedding with {num_grid_tokens} grid tokens: it is not square; "
            "pass old_size explicitly"
        )
    return side, side


def sincos_pos_embed_2d(embed_dim: int, grid_size: tuple[int, int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """MAE's fixed 2D sin-cos position embedding, (1, prefix + H*W, D) in fp32: the first half of the channels
    encodes a token's column and the second half its row, each as sines then cosines of D/4 frequencies
    1 / 10000^(i / (D/4)); prefix tokens ([class]) get zeros. Tokens are in row-major grid order, as the patch
    embedding flattens them."""
    if embed_dim % 4:
        raise ValueError(f"a 2D sin-cos position embedding needs a width divisible by 4, got {embed_dim}")
    height, width = grid_size
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                                indexing="ij")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    grid = torch.cat([encode(cols), encode(rows)], dim=1)
    prefix = torch.zeros(num_prefix_tokens, embed_dim, dtype=torch.float64)
    return torch.cat([prefix, grid]).float().unsqueeze(0)
