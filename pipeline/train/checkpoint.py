"""Checkpoints: DeepSpeed's own to resume, plus consolidated fp32 weights to fine-tune, export and load in timm.

A checkpoint directory holds:

    deepspeed/            every rank's ZeRO shards (model, optimizer, scheduler, loop state) to resume from
    model.safetensors     the full fp32 weights with timm key names, gathered from the ZeRO partitions
    model_ema.safetensors the exponential moving average of the weights, when the run keeps one
    config.json           the resolved job: model arguments (`VisionTransformer(**model_args)`), classes, the job
    train_state.json      the loop and data position: step, epoch, the samples of the epoch accounted for
    checksums/            rank-NNNNN.json a rank: size and CRC-32 of every file that rank wrote, checked at resume

Every rank writes into its own local directory and reports it; Ray Train merges the ranks' files into one
checkpoint in storage. Nothing is unpickled without `weights_only=True`, DeepSpeed's own files included. A ZeRO
checkpoint of another world size resumes through DeepSpeed's universal format (pipeline/train/reshard.py), whose
converter and loader unpickle freely: the checkpoint's files are loaded weights-only first, and what the
converter writes stays in a private temporary folder.
"""

import contextlib
import json
import shutil
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.fs as pafs
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline import storage
from pipeline.data.epochs import EpochRecord
from pipeline.train.reshard import default_local_rank, load_resharded_collective, needs_reshard, saved_layout

DEEPSPEED_TAG = "deepspeed"
WEIGHTS_FILE = "model.safetensors"
EMA_WEIGHTS_FILE = "model_ema.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "train_state.json"
CHECKSUMS_DIR = "checksums"
# in each checkpoint's report: its objective's score, higher better (val/top1; MAE's -val/loss); -inf before an eval
SCORE_KEY = "checkpoint_score"


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch in progress
    shards_done: list[str] = field(default_factory=list)  # shards of `epoch` whose every sample is accounted for
    samples_done: dict[str, str] = field(default_factory=dict)  # the other started shards: bitmaps (epochs.py)
    images_seen: int = 0  # training images consumed, all ranks
    world_size: int = 0  # of the attempt that saved it
    bad_samples: dict = field(default_factory=dict)  # the train ledger's totals (BadSampleReport) at the record
    job_run_metrics: dict = field(default_factory=dict)  # rank 0's, not yet known stored (tracking/attempts.py)

    def advance(self, epoch: int, images: int) -> None:
        """One optimizer step more, of `images` training images, in `epoch`."""
        self.step += 1
        self.epoch = epoch
        self.images_seen += images

    def epoch_record(self) -> EpochRecord:
        return EpochRecord.from_json(asdict(self))

    def set_epoch_record(self, record: EpochRecord) -> None:
        data = record.to_json()
        self.epoch, self.shards_done, self.samples_done = data["epoch"], data["shards_done"], data["samples_done"]


class CheckpointMismatch(ValueError):
    """The checkpoint was made by a model of another shape."""


class CheckpointDamaged(ValueError):
    """A checkpoint's file is missing, cut short or changed since it was saved, and no whole one can stand in."""


def gather_full_state_dict(engine) -> dict[str, torch.Tensor]:
    """fp32 weights with the model's key names, assembled from ZeRO partitions. A collective: call on every
    rank in the same order; every rank gets the result."""
    from deepspeed.utils import safe_get_full_fp32_param

    weights = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)  # None when DeepSpeed keeps no separate fp32 copy (ZeRO-0, fp32)
        weights[name] = (param if full is None else full).detach().float().cpu().contiguous()
    for name, buffer in engine.module.named_buffers():
        weights[name] = buffer.detach().cpu().contiguous()
    return weights


def save_checkpoint_collective(engine, directory: str | Path, *, rank: int, state: LoopState, model_config: dict,
                               ema_weights: dict[str, torch.Tensor] | None = None,
                               export: Callable[[dict], dict] | None = None) -> None:
    """Every rank (a collective): DeepSpeed shards, then the gathered weights (`export`ed: an objective's, such as
    MAE's encoder alone); rank 0 also writes the files that need one copy."""
    directory = Path(directory)
    engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG, client_state={"loop_state": asdict(state)})
    weights = gather_full_state_dict(engine)
    if export is not None:
        weights = export(weights)
    if rank == 0:
        save_file(weights, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        if ema_weights is not None:
            save_file(ema_weights, str(directory / EMA_WEIGHTS_FILE), metadata={"format": "pt"})
        (directory / CONFIG_FILE).write_text(json.dumps(model_config, indent=2, sort_keys=True))
        (directory / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    write_checksums(directory, rank)


def file_crc32(path: str | Path) -> int:
    crc = 0
    with open(path, "rb") as file:
        while chunk := file.read(8 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_checksums(directory: Path, rank: int) -> None:
    """checksums/rank-NNNNN.json: [bytes, CRC-32] of each file this rank wrote into `directory` (its own folder,
    which Ray Train merges with the other ranks' into the checkpoint)."""
    files = sorted(path for path in directory.rglob("*") if path.is_file())
    entries = {path.relative_to(directory).as_posix(): [path.stat().st_size, file_crc32(path)] for path in files}
    (directory / CHECKSUMS_DIR).mkdir(exist_ok=True)
    (directory / CHECKSUMS_DIR / f"rank-{rank:05d}.json").write_text(json.dumps(entries, indent=1, sort_keys=True))


def checkpoint_problem(directory: str, *, part: tuple[int, int] = (0, 1), contents: bool = True,
                       required: bool = False) -> str | None:
    """What is wrong with a checkpoint folder (local, or a storage URI with `contents=False`) by the checksums its
    ranks wrote: a rank's checksums or a file missing, a file of another size than at save, or (`contents`) of
    another CRC-32. None when all agree, and for a folder saved without checksums unless they are `required`.
    `part` = (i, n): check the files of every n-th rank's checksums from the i-th, so that n workers share the
    reading."""
    fs, root = storage.resolve(directory)
    try:
        lists = sorted(info.base_name for info in fs.get_file_info(pafs.FileSelector(f"{root}/{CHECKSUMS_DIR}"))
                       if info.base_name.startswith("rank-"))
    except FileNotFoundError:
        return "it has no checksums" if required else None
    try:
        saved_ranks = read_checkpoint_json(directory, STATE_FILE)["world_size"]
    except (FileNotFoundError, ValueError, KeyError) as err:
        return f"{STATE_FILE} is missing or damaged ({' '.join(str(err).split())[:200]})"
    if len(lists) != saved_ranks:
        return f"it was saved by {saved_ranks} ranks, and {CHECKSUMS_DIR}/ holds the lists of {len(lists)}"
    index, count = part
    for name in lists[index::count]:
        entries = read_checkpoint_json(directory, f"{CHECKSUMS_DIR}/{name}")
        infos = fs.get_file_info([f"{root}/{path}" for path in entries])
        for (path, (size, crc)), info in zip(entries.items(), infos, strict=True):
            if info.type != pafs.FileType.File:
                return f"{path} is missing"
            if info.size != size:
                return f"{path} is {info.size:,} bytes, against {size:,} when saved"
            if contents and file_crc32(f"{root}/{path}") != crc:
                return f"{path} is not what was saved: its CRC-32 differs"
    return None


def read_checkpoint_json(checkpoint: str, name: str):
    """The JSON file `name` of a checkpoint folder, local or at a storage URI."""
    fs, root = storage.resolve(checkpoint)
    with fs.open_input_stream(f"{root}/{name}") as file:
        return json.loads(file.read())


def weight_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a safetensors file, local or at any storage URI, from its header alone (the first few
    KiB: an 8-byte length, then JSON)."""
    fs, fs_path = storage.resolve(path)
    with fs.open_input_file(fs_path) as f:
        length = int.from_bytes(f.read(8), "little")
        if not 0 < length <= min(f.size() - 8, 100 << 20):
            raise ValueError(f"{path} is not a safetensors file")
        header = json.loads(f.read(length))
    return {key: tuple(entry["shape"]) for key, entry in header.items() if key != "__metadata__"}


def check_compatible(directory: str | Path, model: nn.Module) -> None:
    """Raise CheckpointMismatch naming every key whose presence or shape differs from `model`'s. `directory`
    may be local or a storage URI."""
    path = storage.join(str(directory), WEIGHTS_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(f"{directory} is not a checkpoint of this pipeline: {WEIGHTS_FILE} is missing")
    saved = weight_shapes(path)
    # under ZeRO-3 a rank holds a partition of each parameter; ds_shape is the whole parameter's shape
    expected = {key: tuple(getattr(value, "ds_shape", value.shape))
                for key, value in model.state_dict(keep_vars=True).items()}
    problems = [f"{key}: checkpoint {saved[key]} vs model {expected[key]}"
                for key in expected if key in saved and saved[key] != expected[key]]
    problems += [f"{key}: missing from checkpoint" for key in expected if key not in saved]
    problems += [f"{key}: not in model" for key in saved if key not in expected]
    if problems:
        shown = "; ".join(problems[:10]) + (f"; … {len(problems) - 10} more" if len(problems) > 10 else "")
        raise CheckpointMismatch(f"checkpoint {directory} was made by a different model ({len(problems)} keys "
                                 f"differ): {shown}")


def load_checkpoint(engine, directory: str | Path, *, local_rank: int | None = None,
                    scratch_dir: str | Path | None = None, weights_model: nn.Module | None = None) -> LoopState:
    """Restore model, optimizer, scheduler and the loop state from a checkpoint directory (every rank: a
    collective). A ZeRO checkpoint saved by another number of ranks is converted on the way, once per machine
    (pipeline/train/reshard.py): `local_rank` (default: the engine's, from LOCAL_RANK) says which rank of this
    machine converts, `scratch_dir` (default: the temporary directory) where. `directory` is only read.
    `weights_model` (default: the engine's module) is the model whose weights its model.safetensors must hold:
    an objective that exports part of its module (MAE: the encoder) passes that part."""
    check_compatible(directory, engine.module if weights_model is None else weights_model)
    if not (Path(directory) / DEEPSPEED_TAG).is_dir():
        raise FileNotFoundError(f"{directory} holds no DeepSpeed state ({DEEPSPEED_TAG}/): cannot resume from it")
    layout = saved_layout(Path(directory) / DEEPSPEED_TAG, engine.checkpoint_engine.load)
    if needs_reshard(engine, layout):
        load_path, client_state = load_resharded_collective(
            engine, directory, DEEPSPEED_TAG, layout,
            local_rank=default_local_rank(engine) if local_rank is None else local_rank, scratch_dir=scratch_dir)
    else:
        load_path, client_state = engine.load_checkpoint(str(directory), tag=DEEPSPEED_TAG)
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint to resume from in {directory}")
    return LoopState(**client_state["loop_state"])


def kept_checkpoints(folder: str) -> list[str]:
    """The checkpoint folders in a run's folder (a path or storage URI), newest first: the ones Ray Train keeps
    (checkpoint_<time>), or LocalContext's (checkpoint_<number>); [] when the folder does not exist."""
    fs, path = storage.resolve(folder)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path))
    except FileNotFoundError:
        return []
    names = sorted((info.base_name for info in infos if info.type == pafs.FileType.Directory and
                    info.base_name.startswith("checkpoint_")), reverse=True)
    return [storage.join(folder, name) for name in names]


def kept_before(location: str) -> list[str]:
    """The checkpoint folders beside `location` that are older than it, newest first."""
    name = storage.basename(location)
    return [older for older in kept_checkpoints(storage.parent(location)) if storage.basename(older) < name]


@contextlib.contextmanager
def local_checkpoint(location: str) -> Iterator[str]:
    """A checkpoint folder on this machine: `location` itself, or a temporary copy of a remote one (storage
    URI), deleted afterwards."""
    if not storage.is_remote(location):
        yield location
        return
    local = storage.download(location, prefix="checkpoint-")
    try:
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The consolidated weights of a checkpoint directory or a `model.safetensors` file."""
    path = Path(path)
    return load_file(str(path / WEIGHTS_FILE if path.is_dir() else path))
