"""The one seam between the training loop and Ray Train.

The loop talks to a `TrainContext`: its rank and world size, `report(metrics, checkpoint_dir)` and
`latest_checkpoint()`. `RayTrainContext` adapts that to `ray.train`; `LocalContext` runs the same loop in one
process (world size 1, no Ray), so the loop can be unit-tested and debugged without a cluster.
"""

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path


class JobFailed(RuntimeError):
    """A failure that no restart can cure (bad data over the limit, a config error, a missing file or
    checkpoint). A worker raises it with a one-line message; the driver ends the job with that line instead of
    spending `train.max_failures` on restarts that would fail the same way."""


def fatal_error(err: BaseException) -> str | None:
    """The one-line message of an error in `err`'s chain that no restart can cure, or None. Ray wraps errors
    of tasks and actors (`RayTaskError.cause`), and a wrapper is an instance of its cause's class whose text is
    a whole traceback, so the message is taken from the innermost error."""
    from ray.exceptions import RayError

    from pipeline.config import ConfigError
    from pipeline.data.bad_samples import TooManyBadSamples
    from pipeline.train.checkpoint import CheckpointMismatch

    fatal = (JobFailed, ConfigError, TooManyBadSamples, FileNotFoundError, CheckpointMismatch)
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


class LocalContext:
    """Single-process context: reports are kept in memory, checkpoints are copied under `storage_dir`."""

    rank = 0
    local_rank = 0
    world_size = 1

    def __init__(self, storage_dir: str | Path, resume_from: str | Path | None = None):
        self.storage_dir = Path(storage_dir)
        self.reports: list[dict] = []
        self.checkpoints: list[Path] = []
        self.resume_from = Path(resume_from) if resume_from else None

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            target = self.storage_dir / f"checkpoint_{len(self.checkpoints):06d}"
            shutil.copytree(checkpoint_dir, target)
            self.checkpoints.append(target)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        latest = self.checkpoints[-1] if self.checkpoints else self.resume_from
        yield str(latest) if latest else None


class RayTrainContext:
    """The context inside a Ray Train worker (`train_loop_per_worker`)."""

    def __init__(self):
        import ray.train

        self._train = ray.train
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.local_rank = context.get_local_rank()
        self.world_size = context.get_world_size()

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        """A barrier: every rank calls it equally often, each with its own checkpoint files (ZeRO shards)."""
        checkpoint = self._train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        self._train.report(metrics, checkpoint=checkpoint)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        """The checkpoint Ray Train restores after a worker failure, as a local directory, or None."""
        checkpoint = self._train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield directory
