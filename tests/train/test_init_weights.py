"""init_from: timm-made state_dicts, checkpoints of ours, head reset, and architecture mismatches."""

import json
import re

import pytest
import timm
import torch
from safetensors.torch import save_file

from pipeline.config import ConfigError
from pipeline.model import build_model
from pipeline.train.engine import load_into_model
from pipeline.train.init_weights import check_init_weights, locate_init


def meta_state(name: str, **overrides) -> dict:
    with torch.device("meta"):
        return build_model(name, **overrides).state_dict()


def fit(spec: str, model_state: dict, *, reset_head: bool = False):
    return check_init_weights(locate_init(spec, ""), model_state, reset_head=reset_head)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_state_dict_at_224_fine_tunes_at_384(tmp_path, suffix):
    torch.manual_seed(0)
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    path = tmp_path / f"timm{suffix}"
    state = {k: v.contiguous() for k, v in theirs.state_dict().items()}
    torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))

    init = fit(str(path), meta_state("vit_tiny_patch16_224", img_size=384, num_classes=10))
    assert init.source_img_size == 224 and not init.reset_head
    model = build_model("vit_tiny_patch16_224", img_size=384, num_classes=10).eval()
    load_into_model(model, init.state_dict, reset_head=init.reset_head)
    assert model.pos_embed.shape == (1, 1 + 24 * 24, 192)
    assert torch.equal(model.head.weight, theirs.head.weight)
    assert torch.equal(model.blocks[11].mlp.fc2.weight, theirs.blocks[11].mlp.fc2.weight)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 384, 384))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_head_is_reset_exactly_when_it_should(tmp_path):
    torch.manual_seed(0)
    source = build_model("vit_demo_patch4_32")  # 10 classes
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_args": {"img_size": 32}, "mlflow_run_id": "abc"}))

    same = fit(str(tmp_path), meta_state("vit_demo_patch4_32", img_size=64))
    assert not same.reset_head and "head.weight" in same.state_dict
    assert same.parent_run_id == "abc" and same.source_img_size == 32
    asked = fit(str(tmp_path), meta_state("vit_demo_patch4_32", img_size=64), reset_head=True)
    assert asked.reset_head and "head.weight" not in asked.state_dict
    other_classes = fit(str(tmp_path / "model.safetensors"), meta_state("vit_demo_patch4_32", num_classes=3))
    assert other_classes.reset_head and "head.bias" not in other_classes.state_dict

    torch.manual_seed(1)
    model = build_model("vit_demo_patch4_32", num_classes=3)
    fresh_head = model.head.weight.detach().clone()
    load_into_model(model, other_classes.state_dict, reset_head=True)
    assert torch.equal(model.head.weight, fresh_head)  # kept its new initialisation
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_an_official_mae_checkpoint_fine_tunes_its_encoder_with_a_fresh_head_and_fc_norm(tmp_path):
    """MAE's released files hold {"model": state_dict}: the encoder's keys, and decoder_* and mask_token beside
    them (decoder_pos_embed too). Fine-tuned with average pooling, as MAE's recipe does, the encoder's weights
    load, the decoder and mask token are dropped, and the head and fc_norm start fresh (MAE drops `norm`)."""
    from pipeline.model.mae import MaskedAutoencoder

    torch.manual_seed(0)
    mae = MaskedAutoencoder(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, decoder_embed_dim=64,
                            decoder_depth=2, decoder_num_heads=4)
    state = {**mae.state_dict(), "pos_embed": mae.pos_embed, "decoder_pos_embed": mae.decoder_pos_embed}
    torch.save({"model": state, "epoch": 799}, tmp_path / "mae_pretrain_vit_demo.pth")
    assert any(key.startswith("decoder_") for key in state) and "mask_token" in state

    target = meta_state("vit_demo_patch4_32", img_size=64, num_classes=10, global_pool="avg")
    init = fit(str(tmp_path / "mae_pretrain_vit_demo.pth"), target)
    assert init.reset_head and init.source_img_size == 32
    assert set(init.state_dict) == {key for key in target if key not in ("head.weight", "head.bias", "fc_norm.weight",
                                                                          "fc_norm.bias")}
    torch.manual_seed(1)
    model = build_model("vit_demo_patch4_32", img_size=64, num_classes=10, global_pool="avg")
    fresh = {key: value.detach().clone() for key, value in model.state_dict().items()}
    load_into_model(model, init.state_dict, reset_head=init.reset_head)
    for key in ("head.weight", "fc_norm.weight", "fc_norm.bias"):
        assert torch.equal(model.state_dict()[key], fresh[key]), key
    assert torch.equal(model.blocks[3].mlp.fc1.weight, mae.blocks[3].mlp.fc1.weight)
    assert model.pos_embed.shape == (1, 1 + 16 * 16, 96)  # MAE's fixed 8x8 sin-cos, resampled to the 16x16 grid


def test_mismatched_architecture_and_bad_paths_are_clear_errors(tmp_path):
    deeper = build_model("vit_demo_patch4_32", depth=6)
    save_file({k: v.contiguous() for k, v in deeper.state_dict().items()}, str(tmp_path / "deep.safetensors"))
    with pytest.raises(ConfigError, match=r"different architecture .*blocks\.4\.attn\.qkv\.weight: not in the model"):
        fit(str(tmp_path / "deep.safetensors"), meta_state("vit_demo_patch4_32"))
    wider = build_model("vit_demo_patch4_32", embed_dim=48)
    save_file({k: v.contiguous() for k, v in wider.state_dict().items()}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ConfigError, match=r"cls_token: weights \(1, 1, 48\) vs model \(1, 1, 96\)"):
        fit(str(tmp_path / "wide.safetensors"), meta_state("vit_demo_patch4_32"))
    with pytest.raises(ConfigError, match="does not exist"):
        fit(str(tmp_path / "nope.pth"), meta_state("vit_demo_patch4_32"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="without model.safetensors"):
        fit(str(tmp_path / "empty"), meta_state("vit_demo_patch4_32"))
    torch.save({"step": 3}, tmp_path / "not_weights.pth")
    with pytest.raises(ConfigError, match="does not hold a state_dict of tensors"):
        fit(str(tmp_path / "not_weights.pth"), meta_state("vit_demo_patch4_32"))
    torch.save({"model": build_model("vit_demo_patch4_32")}, tmp_path / "pickled.pth")  # a whole pickled module
    with pytest.raises(ConfigError) as refused:
        fit(str(tmp_path / "pickled.pth"), meta_state("vit_demo_patch4_32"))
    assert str(refused.value) == (f"init_from: {tmp_path}/pickled.pth is not a plain tensor file: it holds pickled "
                                  "Python objects, which are not loaded (weights_only=True); save a state_dict of "
                                  "tensors or safetensors")


def damaged(folder, kind: str):
    """A weights file as a full disk, a killed copy or a wrong path leaves it."""
    whole = folder / "whole.safetensors"
    save_file({k: v.contiguous() for k, v in build_model("vit_demo_patch4_32").state_dict().items()}, str(whole))
    torch.save(build_model("vit_demo_patch4_32").state_dict(), folder / "whole.pth")
    data = {"safetensors cut in half": whole.read_bytes()[:whole.stat().st_size // 2],
            "safetensors cut in its header": whole.read_bytes()[:40],
            "garbage": bytes(range(256)) * 64, "empty": b"",
            "json": json.dumps({"model_args": {"depth": 4}}).encode(),
            "pth cut in half": (folder / "whole.pth").read_bytes()[:(folder / "whole.pth").stat().st_size // 2]}[kind]
    path = folder / ("weights.pth" if kind in ("empty", "json") else "weights.safetensors")
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("kind,says", [
    ("safetensors cut in half", r"is a safetensors file cut short: its tensors need [\d,]+ bytes, and the file holds "
                                r"[\d,]+$"),
    ("safetensors cut in its header", r"is a safetensors file cut short: its header alone is [\d,]+ bytes, and the "
                                      r"file holds 40$"),
    ("garbage", r"is neither a safetensors nor a torch file \(it begins b'\\x00\\x01.*\): give a safetensors file"),
    ("empty", r"is empty \(0 bytes\)$"),
    ("json", r"is JSON text, not weights: give a safetensors file or a torch state_dict"),
    ("pth cut in half", r"is a torch file cut short or damaged \(PytorchStreamReader failed reading zip archive"),
])
def test_a_damaged_weights_file_is_one_line_naming_it_and_what_is_wrong(tmp_path, kind, says):
    path = damaged(tmp_path, kind)
    with pytest.raises(ConfigError) as refused:
        fit(str(path), meta_state("vit_demo_patch4_32"))
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"init_from: {path} "), message
    assert re.search(says, message), message


def test_weights_on_s3_are_read_from_a_checkpoint_folder_or_a_file(tmp_path, s3_store):
    import pyarrow.fs as pafs

    from pipeline import storage

    torch.manual_seed(0)
    source = build_model("vit_demo_patch4_32")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_args": {"img_size": 32}, "mlflow_run_id": "abc"}))
    uri = s3_store.uri("init", tmp_path.name, "checkpoint_000001")
    fs, path = storage.resolve(uri)
    pafs.copy_files(str(tmp_path), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)

    for spec in (uri, f"{uri}/model.safetensors"):
        init = fit(spec, meta_state("vit_demo_patch4_32", img_size=64))
        assert (init.source_img_size, init.parent_run_id, init.source) == (32, "abc", spec)
        assert torch.equal(init.state_dict["blocks.3.mlp.fc1.weight"], source.blocks[3].mlp.fc1.weight)
    with pytest.raises(ConfigError, match=f"init_from: {uri}/nope does not exist"):
        fit(f"{uri}/nope", meta_state("vit_demo_patch4_32"))
