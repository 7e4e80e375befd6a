"""The Ray side of the seam (context.py): `RayTrainContext` and the Ray Train entry point.

Rank 0 builds each dataset and splits it into one stream per rank (`streaming_split`), which every rank
receives through a broadcast; the bad-sample ledgers are actors that rank 0 starts and every rank reads by
name. An error that no restart can cure ends the job as `JobFailed` (see launch.EndOnJobFailed).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import ray.train
import torch
import torch.distributed as dist

from pipeline.config import DataConfig
from pipeline.data.shard_set import ShardSet
from pipeline.train.context import JobFailed


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: `config` holds the resolved job and a reference to the init weights."""
    from pipeline.console import is_verbose, ray_data_console
    from pipeline.train.loop import run_training

    ray_data_console(is_verbose(config["run"].job.train.verbose))
    init_state = config.get("init_state")
    if isinstance(init_state, ray.ObjectRef):
        init_state = ray.get(init_state)
    try:
        run_training(config["run"], RayTrainContext(), init_state=init_state)
    except Exception as err:
        message = fatal_error(err)
        if message is None:
            raise
        raise JobFailed(message) from None


def fatal_error(err: BaseException) -> str | None:
    """The one-line message of an error in `err`'s chain that no restart can cure, or None. Ray wraps errors
    of tasks and actors (`RayTaskError.cause`), and a wrapper is an instance of its cause's class whose text is
    a whole traceback, so the message is taken from the innermost error."""
    from ray.exceptions import RayError

    from pipeline.config import ConfigError
    from pipeline.data.bad_samples import TooManyBadSamples
    from pipeline.train.checkpoint import CheckpointDamaged, CheckpointMismatch

    fatal = (JobFailed, ConfigError, TooManyBadSamples, FileNotFoundError, CheckpointMismatch, CheckpointDamaged)
    todo, seen = [err], set()
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, fatal) and not isinstance(current, RayError):
            return " ".join(str(current).split())
        todo += [getattr(current, "cause", None), current.__cause__, current.__context__]
    return None


class RayTrainContext:
    """The context inside a Ray Train worker (`train_loop_per_worker`)."""

    def __init__(self):
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.local_rank = context.get_local_rank()
        self.world_size = context.get_world_size()
        # collectives of CPU tensors (the per-step preemption check, the data position, window losses) go
        # through gloo: NCCL takes no CPU tensor, and a CPU tensor never syncs a GPU stream
        self.cpu_group = dist.new_group(backend="gloo") if self.world_size > 1 and dist.get_backend() != "gloo" \
            else None

    def preemption_deadline_collective(self) -> int | None:
        """None, or the reclaim deadline (UNIX ms; 0 when Ray was given none) of a node of this worker group that
        Ray is draining, once any rank has heard of it. A collective on every rank at every step (one gloo
        all-reduce of one number), so that all ranks checkpoint at the same step boundary."""
        from pipeline.internals import preemption_notice

        notice = preemption_notice()
        deadline = torch.tensor([-1 if notice is None else (notice.deadline_ms or 0)], dtype=torch.int64)
        if self.world_size > 1:
            dist.all_reduce(deadline, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return None if deadline.item() < 0 else int(deadline.item())

    def wait_for_restart(self, deadline_ms: int) -> None:
        """After the checkpoint a drain notice asked for: train no further step, which would only be redone, and
        wait for Ray Train to end this worker group at the deadline and restart it, from that checkpoint, on
        the nodes that stay (elastic) or on new ones. Ray charges that restart to
        FailureConfig.max_preemption_failures, not to train.max_failures."""
        # without a deadline, Ray Train waits 120 s after the notice
        limit_s = (deadline_ms / 1000 if deadline_ms else time.time() + 120) + 120
        while time.time() < limit_s:
            time.sleep(1)
        raise RuntimeError("a node of the worker group was drained, and the worker group was not restarted within "
                           "120 s of the drain's deadline")

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> str | None:
        """A barrier: every rank calls it equally often, each with its own checkpoint files (ZeRO shards).
        Returns, on rank 0, where Ray committed the checkpoint (a path on the storage's filesystem): the one a
        restart resumes from. None when it committed none, which happens when a rank is lost while its
        report is in flight; other ranks get None."""
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)
        if checkpoint is None or self.rank != 0:
            return None
        # blocks until Ray Train has processed every report in flight, this one included; in the order Ray keeps
        # them, by score with tracking.register_as (launch.checkpoint_config)
        committed = ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        ours = [c for c in committed if c.metrics.get("step") == metrics.get("step")]
        return ours[-1].checkpoint.path if ours else None

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[tuple[str | None, str | None]]:
        """The checkpoint Ray Train restores after a worker failure: (a local directory, its path on the storage's
        filesystem), or (None, None)."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None, None
            return
        with checkpoint.as_directory() as directory:
            yield directory, checkpoint.path

    def start_ledgers(self, count: int, max_bad_fraction: float, min_samples: int) -> list:
        """Rank 0 starts the ledgers, which live as long as it does; every rank learns their names, so that a
        dataset that fails over its bad-sample limit is told apart on every rank from a failure a restart may
        cure. A collective."""
        from pipeline.data.ledger import attach_ledger, start_ledger

        ledgers = [start_ledger(max_bad_fraction, min_samples) for _ in range(count)] if self.rank == 0 else None
        names = self._broadcast([ledger.name for ledger in ledgers] if ledgers else None)
        return ledgers or [attach_ledger(name, max_bad_fraction, min_samples) for name in names]

    def image_stream(self, shards: ShardSet, cfg: DataConfig, *, train: bool, num_classes: int | None, ledger,
                     equal: bool = True, shuffle_files: bool | None = None, first_epoch: int = 0,
                     skip: dict | None = None):
        """Rank 0 builds the dataset and splits it into `world_size` streams (`equal`: trimmed to the same
        row count); every rank gets its own, which it decodes itself with data.decode_device=gpu. A
        collective."""
        from pipeline.data.device_decode import on_device

        splits = None
        if self.rank == 0:
            from pipeline.data.datasets import build_image_dataset

            dataset = build_image_dataset(shards, cfg, train=train, num_classes=num_classes, ledger=ledger,
                                          shuffle_files=shuffle_files, first_epoch=first_epoch, skip=skip)
            splits = dataset.streaming_split(self.world_size, equal=equal)
        return on_device(self._broadcast(splits)[self.rank], cfg, train=train, ledger=ledger,
                         local_rank=self.local_rank, shard_uris=shards.uris)

    def _broadcast(self, value):
        if self.world_size == 1:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]
