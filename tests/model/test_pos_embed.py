import pytest
import torch
from timm.layers import resample_abs_pos_embed

from pipeline.model import resample_pos_embed


@pytest.mark.parametrize("old_grid,new_grid", [(14, 24), (8, 16)])
@pytest.mark.parametrize("num_prefix_tokens", [1, 0])
def test_resample_matches_timm(old_grid, new_grid, num_prefix_tokens):
    torch.manual_seed(0)
    pos_embed = torch.randn(1, num_prefix_tokens + old_grid * old_grid, 32)
    ours = resample_pos_embed(pos_embed, (new_grid, new_grid), num_prefix_tokens=num_prefix_tokens)
    theirs = resample_abs_pos_embed(pos_embed, (new_grid, new_grid), num_prefix_tokens=num_prefix_tokens)
    assert ours.shape == (1, num_prefix_tokens + new_grid * new_grid, 32)
    assert (ours - theirs).abs().max().item() <= 1e-6
    assert torch.equal(ours[:, :num_prefix_tokens], pos_embed[:, :num_prefix_tokens])


def test_resample_non_square_and_bf16_is_computed_in_fp32():
    torch.manual_seed(0)
    pos_embed = torch.randn(1, 1 + 6 * 4, 16)
    out = resample_pos_embed(pos_embed.bfloat16(), (12, 8), old_size=(6, 4))
    reference = resample_pos_embed(pos_embed, (12, 8), old_size=(6, 4))
    assert out.dtype == torch.bfloat16 and out.shape == (1, 1 + 96, 16)
    assert (out.float() - reference).abs().max().item() < 0.05


def test_resample_rejects_grids_that_do_not_fit():
    with pytest.raises(ValueError, match="not square"):
        resample_pos_embed(torch.randn(1, 1 + 24, 8), (8, 8))
    with pytest.raises(ValueError, match="does not match old grid"):
        resample_pos_embed(torch.randn(1, 1 + 24, 8), (8, 8), old_size=(5, 5))
