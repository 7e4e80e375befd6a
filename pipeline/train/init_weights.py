"""Pretrained weights for a fine-tune: where they come from, whether they fit, and what is re-initialised.

`init_from` accepts a checkpoint directory of the pretrain job, a consolidated `model.safetensors`,
`runs:/<mlflow run id>` (that pretrain run's final checkpoint), or a timm-format state_dict file (safetensors,
or `.pth`/`.pt`/`.bin` loaded with `weights_only=True`). The fine-tune model may be built at a higher
resolution than the weights were trained at: the position embeddings are resampled when the weights are
loaded (bicubic, [class] slot kept). The head is dropped, to be re-initialised, when the class count differs
or `finetune.reset_head` is set. Every other key must match in name and shape, or the job stops naming them.
"""

import json
import math
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file

from pipeline.config import ConfigError
from pipeline.train.checkpoint import CONFIG_FILE, WEIGHTS_FILE

HEAD_KEYS = ("head.weight", "head.bias")
POS_EMBED_KEY = "pos_embed"


@dataclass
class InitWeights:
    state_dict: dict[str, torch.Tensor]  # what the model loads; no head keys when the head is re-initialised
    source: str  # the init_from spec as given
    parent_run_id: str = ""  # the pretrain run, for runs:/ specs and checkpoints that name theirs
    source_img_size: int = 0  # resolution the weights were trained at, when known
    reset_head: bool = False
    source_config: dict = field(default_factory=dict)  # config.json of the source checkpoint, when there is one


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A safetensors or torch state_dict file; torch files are unpickled with weights_only=True only."""
    if path.endswith(".safetensors"):
        return load_file(path)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):  # common wrappers around a state_dict
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(torch.is_tensor(v) for v in loaded.values()):
        raise ConfigError(f"init_from: {path} does not hold a state_dict of tensors")
    return loaded


def locate(spec: str, tracking_uri: str) -> tuple[str, str, int]:
    """init_from -> (weights file, parent run id or "", source img_size or 0)."""
    if spec.startswith("runs:/"):
        from pipeline.tracking.lineage import LineageError, pretrain_run

        run_id = spec[len("runs:/"):].strip("/").split("/")[0]
        try:
            run = pretrain_run(tracking_uri, run_id)
        except LineageError as err:
            raise ConfigError(f"init_from: {err}") from err
        return os.path.join(run.checkpoint_dir, WEIGHTS_FILE), run.run_id, run.img_size
    if os.path.isdir(spec):
        path = os.path.join(spec, WEIGHTS_FILE)
        if not os.path.exists(path):
            raise ConfigError(f"init_from: {spec} is a folder without {WEIGHTS_FILE}: not a checkpoint of this "
                              "pipeline")
        return path, "", 0
    if not os.path.exists(spec):
        raise ConfigError(f"init_from: {spec} does not exist (give a checkpoint folder, a weights file or "
                          "runs:/<run id>)")
    return spec, "", 0


def load_init_weights(spec: str, tracking_uri: str, model_state: dict[str, torch.Tensor], *,
                      reset_head: bool) -> InitWeights:
    """Resolve `spec`, check the weights fit the model whose (meta) state_dict is `model_state`, decide the head."""
    path, parent_run_id, source_img_size = locate(spec, tracking_uri)
    state = read_state_dict(path)
    config_path = os.path.join(os.path.dirname(path), CONFIG_FILE)
    source_config = json.loads(open(config_path).read()) if os.path.exists(config_path) else {}
    if not source_img_size and source_config:
        source_img_size = int(source_config.get("model_args", {}).get("img_size", 0))
    if not source_img_size and POS_EMBED_KEY in state:  # a bare state_dict: the grid tells the resolution
        patch = model_state["patch_embed.proj.weight"].shape[-1] if "patch_embed.proj.weight" in model_state else 0
        grid = math.isqrt(state[POS_EMBED_KEY].shape[1])
        source_img_size = grid * patch if patch else 0

    head_differs = any(key in state and key in model_state and state[key].shape != model_state[key].shape
                       for key in HEAD_KEYS)
    drop_head = reset_head or head_differs
    problems = []
    for key, expected in model_state.items():
        if key in HEAD_KEYS and drop_head:
            continue
        if key not in state:
            problems.append(f"{key}: missing from the weights")
        elif key != POS_EMBED_KEY and state[key].shape != expected.shape:
            problems.append(f"{key}: weights {tuple(state[key].shape)} vs model {tuple(expected.shape)}")
        elif key == POS_EMBED_KEY and state[key].shape[-1] != expected.shape[-1]:
            problems.append(f"{key}: width {state[key].shape[-1]} vs model {expected.shape[-1]}")
    problems += [f"{key}: not in the model" for key in state if key not in model_state and key not in HEAD_KEYS]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; … {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ConfigError(f"init_from: {spec} was trained with a different architecture (depth or width "
                          f"mismatch, {len(problems)} keys): {shown}")
    if drop_head:
        state = {key: value for key, value in state.items() if key not in HEAD_KEYS}
    return InitWeights(state_dict=state, source=spec, parent_run_id=parent_run_id or source_config.get(
        "mlflow_run_id", ""), source_img_size=source_img_size, reset_head=drop_head, source_config=source_config)
