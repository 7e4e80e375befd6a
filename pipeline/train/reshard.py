"""Resume a DeepSpeed ZeRO checkpoint on another number of ranks.

ZeRO-1/2/3 save each rank's partition of the fp32 weights and of the Adam moments, and DeepSpeed loads such a
checkpoint only at the data-parallel world size that saved it (github.com/deepspeedai/DeepSpeed/issues/5405).
DeepSpeed's universal checkpoint holds every parameter and moment whole, and its ZeRO optimizers cut their own
partitions out of it at any world size. So a checkpoint of another world size is converted by DeepSpeed's own
converter (deepspeed/checkpoint/ds_to_universal.py) into a temporary folder and loaded from there; one of the
current world size loads as it always has, with no conversion.

The conversion runs once per machine, by the rank of local rank 0, into a fresh folder under the temporary
directory (TMPDIR, or `scratch_dir`); the machine's other ranks load from that folder, and it is removed once
they all have. The checkpoint folder is only read: it may be the committed checkpoint that other ranks read.
Ranks that cannot see their local rank 0's folder (no such rank, or two of them, on a host name) convert for
themselves.

DeepSpeed's converter unpickles its inputs without `weights_only`, so every file it reads is first loaded
through the engine's own weights-only checkpoint engine (pipeline/internals.py): a file that holds anything
else is refused before the converter sees it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.internals import universal_checkpoint_loading

log = logging.getLogger(__name__)

SCRATCH_PREFIX = "vit-reshard-"
OWNER_FILE = "owner"  # in a conversion folder: the token that tells its machine's ranks it is the one they see
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")  # ZeRO 0-2, ZeRO-3


class ReshardError(RuntimeError):
    """A checkpoint of another world size that cannot be converted for this one."""


@dataclass(frozen=True)
class SavedLayout:
    """What DeepSpeed's rank-0 model-states file records of the run that saved a checkpoint."""

    world_size: int  # data-parallel ranks
    zero_stage: int
    parallel_dims: dict  # tensor/pipeline degrees, {} from DeepSpeed versions that did not record them


def saved_layout(tag_dir: str | Path, load=None) -> SavedLayout:
    """Read from the pickle of rank 0's model-states file alone: its tensors are memory-mapped, not read, so
    this costs milliseconds whatever the model's size. `load` (the engine's `checkpoint_engine.load`) reads a
    file that memory-mapped weights-only loading cannot."""
    tag_dir = Path(tag_dir)
    path = next((tag_dir / name for name in MODEL_STATES if (tag_dir / name).is_file()), None)
    if path is None:
        raise FileNotFoundError(f"{tag_dir} holds no DeepSpeed model states ({' or '.join(MODEL_STATES)})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        if load is None:
            raise
        state = load(str(path), map_location="cpu")
    try:
        world_size = int(state["dp_world_size"])
        zero_stage = int(state["ds_config"].get("zero_optimization", {}).get("stage", 0))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ReshardError(f"{path} does not record the world size and ZeRO stage that saved it ({err!r})") from err
    return SavedLayout(world_size, zero_stage, dict(state.get("checkpoint_parallel_dimensions") or {}))


def needs_reshard(engine, layout: SavedLayout) -> bool:
    """ZeRO-0 keeps the optimizer state whole, which any world size loads; ZeRO-1/2/3 need the world size that
    saved them. `seq_dp_world_size` is the world size DeepSpeed's own loader compares."""
    if layout.zero_stage == 0 or layout.world_size == engine.seq_dp_world_size:
        return False
    stage = engine.zero_optimization_stage()
    # DeepSpeed's universal load restores the weights through the ZeRO optimizer alone (a ZeRO-0 engine would
    # silently keep its fresh ones), and ZeRO-3 writes and reads its universal files unlike ZeRO-1/2
    if stage == 0 or (stage == 3) != (layout.zero_stage == 3):
        raise ReshardError(f"a ZeRO-{layout.zero_stage} checkpoint of {layout.world_size} ranks resumes on "
                           f"{engine.seq_dp_world_size} ranks only at " +
                           ("ZeRO-3" if layout.zero_stage == 3 else "ZeRO-1 or 2") + f", not ZeRO-{stage}")
    return True


def check_convertible(tag_dir: Path, layout: SavedLayout) -> None:
    """What this pipeline's engines never save and the conversion would get wrong or fail on obscurely."""
    degrees = {k: v for k, v in layout.parallel_dims.items() if k in ("tp_degree", "pp_degree") and v != 1}
    if degrees:
        raise ReshardError(f"{tag_dir} was saved with model parallelism ({degrees}): only data-parallel ZeRO "
                           "checkpoints are resharded here")
    if (tag_dir / "offloaded_tensors").exists():
        raise ReshardError(f"{tag_dir} holds NVMe-offloaded optimizer state, which cannot be resharded")
    optim_files = sorted(tag_dir.glob("*zero_pp_rank_*_mp_rank_*_optim_states.pt"))
    if len(optim_files) != layout.world_size:
        raise ReshardError(f"{tag_dir} records {layout.world_size} ranks but holds {len(optim_files)} ZeRO "
                           "optimizer files: the checkpoint is incomplete")


def check_weights_only(engine, tag_dir: Path) -> None:
    """Load every file the converter will read through the engine's weights-only checkpoint engine, so that
    DeepSpeed's converter, which unpickles with `weights_only=False`, only meets what that allows."""
    for path in sorted(tag_dir.glob("*.pt")):
        try:
            engine.checkpoint_engine.load(str(path), map_location="cpu")
        except Exception as err:
            raise ReshardError(f"{path} cannot be loaded with weights_only=True, so it is not converted: "
                               f"{err}") from err


def convert_to_universal(engine, tag_dir: str | Path, out_dir: str | Path, layout: SavedLayout) -> None:
    """DeepSpeed's universal checkpoint of the ZeRO checkpoint `tag_dir`, written as `out_dir/<tag>` (the
    layout `engine.load_checkpoint(out_dir, tag=<tag>)` reads with universal loading on). Its progress
    prints go to the debug log, or into the error when it fails."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tag_dir, out_dir = Path(tag_dir), Path(out_dir)
    check_convertible(tag_dir, layout)
    check_weights_only(engine, tag_dir)
    args = argparse.Namespace(
        input_folder=str(tag_dir), output_folder=str(out_dir / tag_dir.name),
        num_extract_workers=1, num_merge_workers=1,  # in this process: a pool would fork a training worker
        keep_temp_folder=False, strict=True,
        inject_missing_state=True)  # its version marker, which only model-parallel engines save
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            ds_to_universal(args)
    except Exception as err:
        tail = "\n".join(output.getvalue().splitlines()[-20:])
        raise ReshardError(f"DeepSpeed could not convert {tag_dir} (ZeRO-{layout.zero_stage}, {layout.world_size} "
                           f"ranks) to a universal checkpoint: {type(err).__name__}: {err}\n{tail}") from err
    log.debug("ds_to_universal %s:\n%s", tag_dir, output.getvalue())


def _all_gather(obj) -> list:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _status(error: BaseException | None) -> str | None:
    return f"{type(error).__name__}: {error}" if error is not None else None


def _raise_own_or_first(error: BaseException | None, statuses: list, what: str) -> None:
    """After a collective that carried every rank's status: this rank's own error, else the first other's."""
    if error is not None:
        raise error
    failed = [(rank, status) for rank, status in enumerate(statuses) if status]
    if failed:
        rank, status = failed[0]
        more = f" and {len(failed) - 1} more" if len(failed) > 1 else ""
        raise ReshardError(f"{what} failed on rank {rank}{more}: {status}")


@contextlib.contextmanager
def universal_copy_collective(engine, directory: str | Path, tag: str, layout: SavedLayout, *, local_rank: int,
                              scratch_dir: str | Path | None = None) -> Iterator[Path]:
    """A collective: every rank gets a folder holding the universal conversion of `directory/tag`, made by its
    machine's local rank 0 (or by itself when it cannot see that rank's folder), and removed on exit. A
    conversion that fails on any rank raises on every rank, so that none waits on another forever."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    host = socket.gethostname()
    own: Path | None = None

    def new_folder() -> tuple[Path, str]:
        folder = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=scratch_dir))
        token = uuid.uuid4().hex
        (folder / OWNER_FILE).write_text(token)
        return folder, token

    try:
        token, error = None, None
        if local_rank == 0:
            try:
                own, token = new_folder()
            except OSError as err:
                error = err
        peers = _all_gather((host, local_rank, str(own) if own else None, token, _status(error)))
        _raise_own_or_first(error, [peer[4] for peer in peers], "making a folder for the conversion")
        owners = [(path, tok) for peer_host, peer_local, path, tok, _ in peers if peer_host == host and peer_local == 0]
        visible = len(owners) == 1 and _is_token(Path(owners[0][0]), owners[0][1])
        source = own or (Path(owners[0][0]) if visible else None)
        start = time.perf_counter()
        try:
            if source is None:  # no local rank 0 on this host name, two, or one whose folder is not here
                own, _ = new_folder()
                source = own
            if own is not None:
                convert_to_universal(engine, Path(directory) / tag, own, layout)
                log.debug("rank %d converted %s into %s in %.1f s", rank, Path(directory) / tag, own,
                          time.perf_counter() - start)
        except Exception as err:
            error = err
        _raise_own_or_first(error, _all_gather(_status(error)), "converting the checkpoint to DeepSpeed's "
                            "universal format")
        if rank == 0:
            log.info("resharding checkpoint of %d ranks to %d: converted in %.1f s", layout.world_size,
                     engine.seq_dp_world_size, time.perf_counter() - start)
        yield source
    finally:
        if own is not None:
            shutil.rmtree(own, ignore_errors=True)


def _is_token(folder: Path, token: str) -> bool:
    try:
        return (folder / OWNER_FILE).read_text() == token
    except OSError:
        return False


def restore_param_groups(engine, universal_dir: Path) -> None:
    """ZeRO-3's universal loader gives every param group the hyperparameters of the first saved one
    (stage3.py, load_hp_checkpoint_state_from_checkpoint_dir_stage3): with the weight-decay and no-decay
    groups of build_param_groups, all would lose or all would get weight decay. Each group gets its own back
    from the converted optimizer state, which keeps them all."""
    state = engine.checkpoint_engine.load(str(universal_dir / "zero" / "optimizer_state.pt"), map_location="cpu")
    saved = state["param_groups"]
    groups = engine.optimizer.optimizer.param_groups
    if len(saved) != len(groups):
        raise ReshardError(f"the checkpoint has {len(saved)} optimizer param groups, the engine {len(groups)}")
    for group, saved_group in zip(groups, saved, strict=True):
        group.update({key: value for key, value in saved_group.items() if key != "params"})


def load_resharded_collective(engine, directory: str | Path, tag: str, layout: SavedLayout, *,
                              local_rank: int, scratch_dir: str | Path | None = None):
    """Every rank: `engine.load_checkpoint` of the universal conversion of `directory/tag`. Returns its
    (load_path, client_state)."""
    with universal_copy_collective(engine, directory, tag, layout, local_rank=local_rank,
                                   scratch_dir=scratch_dir) as universal:
        error, result = None, (None, None)
        try:
            with universal_checkpoint_loading(engine):
                result = engine.load_checkpoint(str(universal), tag=tag)
            if engine.zero_optimization_stage() == 3:
                restore_param_groups(engine, universal / tag)
        except Exception as err:
            error = err
        # the folder goes once every rank of its machine has read it
        _raise_own_or_first(error, _all_gather(_status(error)), "loading the universal checkpoint")
    return result


def default_local_rank(engine) -> int:
    """DeepSpeed's engine takes it from LOCAL_RANK, which Ray Train and torchrun set."""
    local_rank = getattr(engine, "local_rank", None)
    return int(local_rank if local_rank is not None else os.environ.get("LOCAL_RANK", 0))
