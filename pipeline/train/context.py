"""The one seam between the training loop and what runs it.

The loop (loop.py) talks to a `TrainContext` and to nothing of Ray:

    rank, local_rank, world_size
    report(metrics, checkpoint_dir)       a barrier: every rank calls it equally often; where it was committed
    latest_checkpoint()                   the checkpoint to restart from (a context manager): (a folder on this
                                          machine, where it is stored), or (None, None)
    start_ledgers(count, ...)             bad-sample ledgers, one per dataset (a collective)
    image_stream(shards, cfg, ...)        this rank's stream of decoded rows of a ShardSet (a collective)
    preemption_deadline_collective()      None, or the deadline of a drain of one of the group's nodes
    wait_for_restart(deadline_ms)         after the checkpoint a drain asked for: until the group is restarted

`RayTrainContext` (ray_context.py) does it on Ray Train and Ray Data: rank 0 builds the dataset and
`streaming_split`s it, and the ledgers are actors. `LocalContext` runs the same `run_training` in one
process without Ray: the same tar reader and decode functions (data/local_stream.py), in-process ledgers,
a gloo process group of one for DeepSpeed, and checkpoints copied under a folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from pipeline.config import DataConfig
from pipeline.data.shard_set import ShardSet


class JobFailed(RuntimeError):
    """A failure that no restart can cure (bad data over the limit, a config error, a missing file or
    checkpoint). A worker raises it with a one-line message; the driver ends the job with that line instead of
    spending `train.max_failures` on restarts that would fail the same way."""


class TrainContext(Protocol):
    rank: int
    local_rank: int
    world_size: int
    cpu_group: object  # the process group for collectives of CPU tensors (gloo); None: the default group

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> str | None: ...

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[tuple[str | None, str | None]]: ...

    def preemption_deadline_collective(self) -> int | None: ...

    def wait_for_restart(self, deadline_ms: int) -> None: ...

    def start_ledgers(self, count: int, max_bad_fraction: float, min_samples: int) -> list: ...

    def image_stream(self, shards: ShardSet, cfg: DataConfig, *, train: bool, num_classes: int | None, ledger,
                     equal: bool = True, shuffle_files: bool | None = None, first_epoch: int = 0,
                     skip: dict | None = None): ...


class LocalContext:
    """One process, world size 1, no Ray: reports are kept in `reports`, checkpoints are copied under
    `storage_dir`, and `streams` holds every stream the loop asked for (with the shard order of each epoch).

        ctx = LocalContext(tmp_path)
        state = run_training(run, ctx)
    """

    rank = 0
    local_rank = 0
    world_size = 1
    cpu_group = None

    def __init__(self, storage_dir: str | Path, resume_from: str | Path | None = None):
        self.storage_dir = Path(storage_dir)
        self.resume_from = Path(resume_from) if resume_from else None
        self.reports: list[dict] = []
        self.checkpoints: list[Path] = []
        self.streams: list = []
        self._join_process_group()

    def _join_process_group(self) -> None:
        """A gloo process group of one, which DeepSpeed joins (as it joins Ray Train's). It stays for the life of
        the process: DeepSpeed keeps a handle on the first group it joined."""
        import torch.distributed as dist

        if dist.is_initialized():
            return
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> str | None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is None:
            return None
        target = self.storage_dir / f"checkpoint_{len(self.checkpoints):06d}"
        shutil.copytree(checkpoint_dir, target)
        self.checkpoints.append(target)
        return str(target)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[tuple[str | None, str | None]]:
        latest = self.checkpoints[-1] if self.checkpoints else self.resume_from
        yield (str(latest), str(latest)) if latest else (None, None)

    def preemption_deadline_collective(self) -> int | None:
        return None  # one process on this machine: nothing drains it

    def wait_for_restart(self, deadline_ms: int) -> None:
        raise RuntimeError("LocalContext is never drained")

    def start_ledgers(self, count: int, max_bad_fraction: float, min_samples: int) -> list:
        from pipeline.data.bad_samples import LocalLedger

        return [LocalLedger(max_bad_fraction, min_samples) for _ in range(count)]

    def image_stream(self, shards: ShardSet, cfg: DataConfig, *, train: bool, num_classes: int | None, ledger,
                     equal: bool = True, shuffle_files: bool | None = None, first_epoch: int = 0,
                     skip: dict | None = None):
        from pipeline.data.device_decode import on_device
        from pipeline.data.local_stream import LocalImageStream

        stream = LocalImageStream(shards, cfg, train=train, num_classes=num_classes, ledger=ledger,
                                  shuffle_files=shuffle_files, first_epoch=first_epoch, skip=skip)
        self.streams.append(stream)
        return on_device(stream, cfg, train=train, ledger=ledger, local_rank=self.local_rank,
                         shard_uris=shards.uris)
