import pytest
import torch
from safetensors.torch import save_file

from pipeline.model import build_model
from pipeline.train.checkpoint import CheckpointMismatch, check_compatible


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    save_file({k: v.contiguous() for k, v in build_model("vit_demo_patch4_32", embed_dim=48).state_dict().items()},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatch) as err:
        check_compatible(tmp_path, build_model("vit_demo_patch4_32"))
    message = str(err.value)
    assert "different model" in message
    assert "pos_embed: checkpoint (1, 65, 48) vs model (1, 65, 96)" in message
    assert "more" in message  # more than ten keys differ; the rest are counted


def test_checkpoint_from_a_deeper_model_lists_missing_and_extra_keys(tmp_path):
    deeper = build_model("vit_demo_patch4_32", depth=5)
    save_file({k: v.contiguous() for k, v in deeper.state_dict().items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatch, match=r"blocks\.4\.attn\.qkv\.weight: not in model"):
        check_compatible(tmp_path, build_model("vit_demo_patch4_32"))
    with torch.device("meta"):
        same = build_model("vit_demo_patch4_32", depth=5)
    check_compatible(tmp_path, same)  # same shapes: no error
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        check_compatible(tmp_path / "elsewhere", same)
