"""Pretrained weights for a fine-tune: where they come from, whether they fit, and what is re-initialised.

`init_from` accepts a checkpoint directory of the pretrain job, a consolidated `model.safetensors`,
`runs:/<mlflow run id>` (that pretrain run's final checkpoint), `models:/<logged model id>` or
`models:/<registered name>/<version>` (that checkpoint), or a timm-format state_dict file (safetensors,
or `.pth`/`.pt`/`.bin` loaded with `weights_only=True`), each local or at a storage URI (`s3://…`). The
fine-tune model may be built at a higher resolution than the weights were trained at: the position
embeddings are resampled when the weights are loaded (bicubic, [class] slot kept). The head is dropped, to be
re-initialised, when the class count differs, the weights have none (an MAE encoder) or `finetune.reset_head` is
set. An MAE checkpoint's decoder and mask token are dropped (MAE's official `{"model": …}` files too), and a final
norm in the other place than the fine-tune's pooling wants starts fresh. Every other key must match in name and
shape, or the job stops naming them.
"""

import json
import logging
import math
import os
import pickle
import shutil
from dataclasses import dataclass

import pyarrow.fs as pafs
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.model.mae import DECODER_KEYS
from pipeline.train.checkpoint import CONFIG_FILE, WEIGHTS_FILE

log = logging.getLogger(__name__)

RUN_PREFIX = "runs:/"
HEAD_KEYS = ("head.weight", "head.bias")
FINAL_NORM_KEYS = ("norm.weight", "norm.bias", "fc_norm.weight", "fc_norm.bias")
POS_EMBED_KEY = "pos_embed"


@dataclass
class InitSource:
    """Where a fine-tune's weights come from, resolved on the driver before the model is built."""

    spec: str  # init_from as given
    state_dict: dict[str, torch.Tensor]
    parent_run_id: str = ""  # the pretrain run, for runs:/ specs and checkpoints that name theirs
    img_size: int = 0  # resolution the weights were trained at; 0 when it cannot be told
    model_id: str = ""  # the MLflow logged model of the weights, for runs:/ and models:/ specs


@dataclass
class InitWeights:
    state_dict: dict[str, torch.Tensor]  # what the model loads; no head keys when the head is re-initialised
    source: str  # the init_from spec as given
    parent_run_id: str = ""
    source_img_size: int = 0
    reset_head: bool = False
    model_id: str = ""


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A safetensors or torch state_dict file, told apart by their bytes (not the suffix); torch files are
    unpickled with weights_only=True only. A file that is neither, or is cut short, is a one-line ConfigError."""
    kind, problem = weights_file_kind(path)
    if problem:
        raise ConfigError(f"init_from: {path} {problem}")
    if kind == "safetensors":
        try:
            return load_file(path)
        except SafetensorError as err:
            raise ConfigError(f"init_from: {path} is a damaged safetensors file ({err})") from None
    try:
        with open(path, "rb") as file:  # a file object: torch.load would hand a .safetensors name to safetensors
            loaded = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            raise ConfigError(f"init_from: {path} is not a plain tensor file: it holds pickled Python objects, "
                              "which are not loaded (weights_only=True); save a state_dict of tensors or "
                              "safetensors") from None
        raise ConfigError(f"init_from: {path} is a damaged torch file ({' '.join(str(err).split())})") from None
    except (EOFError, RuntimeError) as err:  # a zip archive or pickle stream that ends early
        reason = " ".join(str(err).split(". ")[0].split()) or "it ends early"
        raise ConfigError(f"init_from: {path} is a torch file cut short or damaged ({reason})") from None
    for key in ("state_dict", "model", "module"):  # common wrappers around a state_dict
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(torch.is_tensor(v) for v in loaded.values()):
        raise ConfigError(f"init_from: {path} does not hold a state_dict of tensors")
    return loaded


def weights_file_kind(path: str) -> tuple[str, str]:
    """("safetensors" | "torch", "") for a file that looks whole, else ("", what is wrong with it), from its size
    and first bytes: a safetensors file is an 8-byte header length, a JSON header and the tensors' bytes it lists;
    a torch file is a zip archive (torch.save) or a pickle stream (the legacy format)."""
    size = os.path.getsize(path)
    if size == 0:
        return "", "is empty (0 bytes)"
    with open(path, "rb") as file:
        head = file.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else 0
        first = file.read(1)
        if first == b"{" and header_len:
            if 8 + header_len > size:
                return "", (f"is a safetensors file cut short: its header alone is {header_len:,} bytes, and the "
                            f"file holds {size:,}")
            try:
                header = json.loads(first + file.read(header_len - 1))
                tensor_bytes = max([entry["data_offsets"][1] for key, entry in header.items()
                                    if key != "__metadata__"], default=0)
            except (ValueError, KeyError, TypeError, IndexError):
                return "", "is a damaged safetensors file: its header is not the JSON table of tensors"
            if 8 + header_len + tensor_bytes > size:
                return "", (f"is a safetensors file cut short: its tensors need {8 + header_len + tensor_bytes:,} "
                            f"bytes, and the file holds {size:,}")
            return "safetensors", ""
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "torch", ""
    if head.lstrip()[:1] in (b"{", b"["):
        return "", "is JSON text, not weights: give a safetensors file or a torch state_dict (.pth, .pt, .bin)"
    return "", (f"is neither a safetensors nor a torch file (it begins {head[:8]!r}): give a safetensors file or "
                "a torch state_dict (.pth, .pt, .bin)")


def locate_init(spec: str, tracking_uri: str) -> InitSource:
    """Read the weights `init_from` names, local or on any storage URI, and what is known of their origin."""
    from pipeline.tracking.models import MODEL_PREFIX

    parent_run_id, img_size, model_id = "", 0, ""
    if spec.startswith((RUN_PREFIX, MODEL_PREFIX)):
        from pipeline.tracking.lineage import LineageError, model_checkpoint, pretrain_run

        try:
            run = pretrain_run(tracking_uri, spec[len(RUN_PREFIX):].strip("/").split("/")[0]) if \
                spec.startswith(RUN_PREFIX) else model_checkpoint(tracking_uri, spec)
        except LineageError as err:
            raise ConfigError(f"init_from: {err}") from err
        path, parent_run_id, img_size = os.path.join(run.checkpoint_dir, WEIGHTS_FILE), run.run_id, run.img_size
        model_id, copy = run.model_id, run.checkpoint_dir if run.downloaded else None
    else:
        path, copy = _local_weights_file(spec)
    try:
        state = read_state_dict(path)
        config_path = os.path.join(os.path.dirname(path), CONFIG_FILE)
        config = json.loads(open(config_path).read()) if os.path.exists(config_path) else {}
    finally:
        if copy is not None:  # the weights are in memory now
            shutil.rmtree(copy, ignore_errors=True)
    img_size = img_size or int(config.get("model_args", {}).get("img_size", 0)) or _trained_img_size(state)
    return InitSource(spec=spec, state_dict=state, parent_run_id=parent_run_id or config.get("mlflow_run_id", ""),
                      img_size=img_size, model_id=model_id)


def _local_weights_file(spec: str) -> tuple[str, str | None]:
    """The weights file of a checkpoint folder or weights file on this machine, and the temporary folder it
    was copied into from remote storage (with the checkpoint's config.json), if it was."""
    try:
        kind = storage.file_type(spec)
    except OSError as err:  # a store that refuses us: credentials, endpoint, network
        raise ConfigError(f"init_from: cannot read {spec}: {err}") from err
    if kind == pafs.FileType.Directory:
        if not storage.exists(storage.join(spec, WEIGHTS_FILE)):
            raise ConfigError(f"init_from: {spec} is a folder without {WEIGHTS_FILE}: not a checkpoint of this "
                              "pipeline")
        if not storage.is_remote(spec):
            return os.path.join(spec, WEIGHTS_FILE), None
        folder = storage.download(spec, (WEIGHTS_FILE, CONFIG_FILE), prefix="init-")
        return os.path.join(folder, WEIGHTS_FILE), folder
    if kind != pafs.FileType.File:
        raise ConfigError(f"init_from: {spec} does not exist (give a checkpoint folder, a weights file, "
                          "runs:/<run id> or models:/<model id>)")
    if not storage.is_remote(spec):
        return spec, None
    folder = storage.download(storage.parent(spec), (storage.basename(spec), CONFIG_FILE), prefix="init-")
    return os.path.join(folder, storage.basename(spec)), folder


def _trained_img_size(state: dict[str, torch.Tensor]) -> int:
    """A plain ViT's resolution from its weights: the position-embedding grid times the patch; 0 otherwise
    (a hybrid's stem makes the patch count in feature-map pixels)."""
    if POS_EMBED_KEY not in state or "patch_embed.proj.weight" not in state or any(
            key.startswith("patch_embed.backbone") for key in state):
        return 0
    return math.isqrt(state[POS_EMBED_KEY].shape[1]) * state["patch_embed.proj.weight"].shape[-1]


def fresh_keys(state: dict[str, torch.Tensor], model_state: dict[str, torch.Tensor], *, reset_head: bool) -> set[str]:
    """The model's keys that keep their own initialisation rather than come from `state`: the head when it is new
    (`reset_head`, or weights without one), and the final norm where the weights had theirs in the other place."""
    fresh = {key for key in HEAD_KEYS if key in model_state and (reset_head or key not in state)}
    return fresh | {key for key in FINAL_NORM_KEYS if key in model_state and key not in state}


def check_init_weights(source: InitSource, model_state: dict[str, torch.Tensor], *, reset_head: bool) -> InitWeights:
    """Check the weights fit the model whose (meta) state_dict is `model_state`, and decide the head.

    An MAE checkpoint's decoder and mask token (its own or MAE's official layout) are dropped: the encoder is what
    is fine-tuned. Weights with the final norm in the other place than the model's (`norm` before pooling, as MAE's
    encoder and a [class]-token model have it, against `fc_norm` after average pooling, or the other way) drop
    theirs, and the model's starts fresh, as MAE's fine-tuning does."""
    state = source.state_dict
    decoder = [key for key in state if key.startswith(DECODER_KEYS) and key not in model_state]
    moved_norm = [key for key in state if key in FINAL_NORM_KEYS and key not in model_state]
    if decoder:
        log.info("init_from: the MAE decoder and mask token (%d tensors) are dropped; the encoder is fine-tuned",
                 len(decoder))
    if moved_norm:
        log.info("init_from: the weights' final norm (%s) is not in this model's place (%s): it starts fresh",
                 moved_norm[0].split(".")[0], "fc_norm, after average pooling" if "fc_norm.weight" in model_state
                 else "norm, before pooling")
    state = {key: value for key, value in state.items() if key not in {*decoder, *moved_norm}}
    head_differs = any(key in state and key in model_state and state[key].shape != model_state[key].shape
                       for key in HEAD_KEYS)
    drop_head = reset_head or head_differs or not any(key in state for key in HEAD_KEYS)
    fresh = fresh_keys(state, model_state, reset_head=drop_head)
    problems = []
    for key, expected in model_state.items():
        if key in fresh:
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
        raise ConfigError(f"init_from: {source.spec} was trained with a different architecture (depth or width "
                          f"mismatch, {len(problems)} keys): {shown}")
    if drop_head:
        state = {key: value for key, value in state.items() if key not in HEAD_KEYS}
    return InitWeights(state_dict=state, source=source.spec, parent_run_id=source.parent_run_id,
                       source_img_size=source.img_size, reset_head=drop_head, model_id=source.model_id)
