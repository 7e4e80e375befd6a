"""One value per step in the job's run, however often its worker group restarts; live curves meanwhile.

After a lost worker or a resize, Ray Train restarts the worker group from the latest committed checkpoint and
the steps since it are trained again. MLflow cannot delete a metric value, so a run that had received every
step as it happened would hold two values for each redone step, and its curves would zig-zag. So rank 0
logs each step's metrics twice:
- live, at once, into a run of this attempt, a child of the job's run (`mlflow.parentRunId`), named
  "<run> attempt N" and tagged with its world size and first step. It shows progress within
  `train.log_every_n_steps`; a lost attempt's run keeps what it had sent, and ends FAILED or KILLED.
- into the job's run when the checkpoint that holds those steps is committed (`commit(step)`), with the
  timestamps they were logged at. A restart resumes from a committed checkpoint, so the job's run never
  receives a step twice. The last step is always a checkpoint, so a finished run holds every step.
- A worker can be lost after Ray committed a checkpoint and before rank 0 committed its steps' metrics, or
  before the sender had shipped them (metrics.py sends every 2 s). So each checkpoint carries the metrics of
  the job's run that are not yet known to be stored (`carried()`, in the loop state), and the attempt that
  resumes from it logs those of them that the job's run lacks before anything else. A checkpoint of another
  run (`train.resume_from`) carries nothing into this one.

A commit also hands the checkpoint to `CheckpointModels` (models.py), which makes its logged model off the training
thread, with the latest val metrics linked to it; the attempt that resumes from a checkpoint makes its model if
the lost attempt had not.

All of it goes through `MetricLogger` (metrics.py) and that model maker, so logging and commits never wait on the
tracking store; only an attempt's start does (creating its run, reading which carried steps the job's run has),
each request bounded to 10 s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from pipeline.internals import bounded_mlflow_http
from pipeline.tracking.metrics import MetricLogger
from pipeline.tracking.models import CheckpointModels
from pipeline.tracking.runs import PARENT_RUN_TAG, finish_run

log = logging.getLogger(__name__)

ATTEMPT_OF_TAG = "pipeline.attempt_of"  # on an attempt's run: the job's run id
ATTEMPT_TAG = "pipeline.attempt"

VAL_PREFIXES = ("val/", "val_ema/")

Entry = tuple[dict, int, int]  # (metrics, step, timestamp_ms)


class AttemptMetrics:
    """Rank 0's metric sink for one attempt of a job's run, and the maker of its checkpoints' logged models.

    metrics = AttemptMetrics(uri, run_id, run_name="pretrain-…", world_size=2, start_step=40,
                             carried=state.job_run_metrics,     # from the checkpoint resumed from
                             model_params={"preset": "vit_small_patch16_224"}, val_dataset=("digits/val", "3f…"),
                             resumed_location="/runs/pretrain-…/checkpoint_000001")
    metrics.log({"train/loss": 1.9}, step=41)   # live, into the attempt's run
    state.job_run_metrics = metrics.carried()   # into the checkpoint at step 60
    metrics.commit(60, location)                # steps <= 60 into the job's run (checkpoint 60 committed), and
                                                # a logged model of the checkpoint (models.py)
    metrics.close("FINISHED")
    """

    def __init__(self, uri: str, run_id: str, *, run_name: str, world_size: int, start_step: int,
                 carried: dict | None = None, model_params: Mapping[str, str] | None = None,
                 val_dataset: tuple[str, str] | None = None, resumed_location: str | None = None):
        self.uri = uri
        self.run_id = run_id
        self.committed = MetricLogger(uri, run_id)
        self.attempt_run_id = start_attempt_run(uri, run_id, run_name=run_name, world_size=world_size,
                                                start_step=start_step)
        self.live = MetricLogger(uri, self.attempt_run_id) if self.attempt_run_id else None
        self.models = CheckpointModels(uri, run_id, run_name=run_name, params=model_params,
                                       val_dataset=val_dataset) if model_params is not None else None
        self.pending: list[Entry] = []  # logged, not yet committed
        self.unconfirmed: list[tuple[int, list[Entry]]] = []  # (committed's mark, entries): committed, maybe unsent
        self.last_val: dict[str, tuple[float, int, int]] = {}  # val metric -> (value, step, timestamp_ms), latest
        if carried and carried.get("run_id") == run_id:  # a checkpoint of this run, not train.resume_from's
            entries = [(metrics, step, timestamp_ms) for step, timestamp_ms, metrics in carried["steps"]
                       if step <= start_step]
            self._commit(missing_from_run(uri, run_id, entries))
            self.last_val = {key: tuple(value) for key, value in carried.get("val", {}).items()}
            if self.models is not None and resumed_location:
                self.models.add(start_step, resumed_location, self.last_val, unless_made=True)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        timestamp_ms = time.time_ns() // 1_000_000
        if self.live is not None:
            self.live.log(metrics, step, timestamp_ms)
        self.pending.append((dict(metrics), step, timestamp_ms))
        self.last_val.update({key: (value, step, timestamp_ms) for key, value in metrics.items()
                              if key.startswith(VAL_PREFIXES)})

    def log_images(self, images: Mapping, step: int) -> None:
        """An evaluation's pictures (key -> (H, W, 3) uint8) into the job's run, off the training thread."""
        if self.models is not None:
            self.models.add_images(step, images)

    def carried(self) -> dict:
        """For the checkpoint being saved: the metrics of the job's run not yet known to be stored there, which
        the attempt that resumes from it logs if the job's run lacks them, and the latest val metrics."""
        settled = self.committed.settled
        self.unconfirmed = [(mark, entries) for mark, entries in self.unconfirmed if mark > settled]
        entries = [entry for _, committed in self.unconfirmed for entry in committed] + self.pending
        return {"run_id": self.run_id, "val": self.last_val,
                "steps": [[step, timestamp_ms, metrics] for metrics, step, timestamp_ms in entries]}

    def commit(self, step: int, location: str | None = None) -> None:
        """The checkpoint at `step` is committed (at `location`): its steps' metrics go into the job's run, and
        it becomes a logged model with the val metrics measured by then."""
        self._commit([entry for entry in self.pending if entry[1] <= step])
        self.pending = [entry for entry in self.pending if entry[1] > step]
        if self.models is not None and location:
            self.models.add(step, location, self.last_val)

    def _commit(self, entries: list[Entry]) -> None:
        for metrics, step, timestamp_ms in entries:
            self.committed.log(metrics, step, timestamp_ms)
        if entries:
            self.unconfirmed.append((self.committed.accepted, entries))

    def flush(self, timeout_s: float) -> None:
        """Send what both runs and the models have been given, waiting at most `timeout_s` in all (before a drain's
        deadline)."""
        deadline = time.monotonic() + timeout_s
        if self.models is not None:
            self.models.flush(timeout_s)
        self.committed.flush(max(0.0, deadline - time.monotonic()))
        if self.live is not None:
            self.live.flush(max(0.0, deadline - time.monotonic()))

    def close(self, status: str) -> None:
        """Flush all; the attempt's run ends with `status`. Metrics not committed stay in the attempt's run."""
        if self.models is not None:
            self.models.close()
        self.committed.close()
        if self.live is not None:
            self.live.close()
            _terminate(self.uri, self.attempt_run_id, status)


def start_attempt_run(uri: str, run_id: str, *, run_name: str, world_size: int, start_step: int) -> str | None:
    """A child run of `run_id` for this attempt; earlier attempts still RUNNING (their workers were lost) end
    KILLED. None, with a warning, when the tracking store cannot be reached: training goes on, and the job's run
    still receives every committed step."""
    from mlflow.tracking import MlflowClient

    try:
        with bounded_mlflow_http(10):
            client = MlflowClient(tracking_uri=uri)
            parent = client.get_run(run_id)
            earlier = client.search_runs([parent.info.experiment_id],
                                         filter_string=f"tags.`{ATTEMPT_OF_TAG}` = '{run_id}'", max_results=1000)
            for run in earlier:
                if run.info.status == "RUNNING":
                    client.set_terminated(run.info.run_id, "KILLED")
            number = len(earlier) + 1
            tags = {PARENT_RUN_TAG: run_id, ATTEMPT_OF_TAG: run_id, ATTEMPT_TAG: str(number),
                    "pipeline.world_size": str(world_size), "pipeline.start_step": str(start_step)}
            run = client.create_run(parent.info.experiment_id, run_name=f"{run_name} attempt {number}", tags=tags)
            return run.info.run_id
    except Exception as exc:  # a tracking outage must not stop training
        log.warning("MLflow run for this attempt not created (%s); live metrics go to the console only",
                    " ".join(str(exc).split())[:200])
        return None


def missing_from_run(uri: str, run_id: str, entries: list[Entry]) -> list[Entry]:
    """The `entries` with the metrics that the run lacks at their steps. All of them, with a warning, when the
    store cannot be read: they wait in the logger's queue, and a SQL-backed store (sqlite, a database behind
    `mlflow server`) keeps one of identical (key, step, timestamp, value) metrics."""
    from mlflow.tracking import MlflowClient

    if not entries:
        return []
    try:
        with bounded_mlflow_http(10):
            client = MlflowClient(tracking_uri=uri)
            have = {key: {m.step for m in client.get_metric_history(run_id, key)}
                    for key in sorted(set().union(*(metrics for metrics, _, _ in entries)))}
    except Exception as exc:
        log.warning("MLflow run %s not read (%s); the steps up to %d that the checkpoint carries are logged again",
                    run_id, " ".join(str(exc).split())[:200], max(step for _, step, _ in entries))
        return entries
    missing = [({key: value for key, value in metrics.items() if step not in have[key]}, step, timestamp_ms)
               for metrics, step, timestamp_ms in entries]
    missing = [entry for entry in missing if entry[0]]
    if missing:
        log.info("MLflow: %d steps up to %d copied into the job's run from the checkpoint", len(missing),
                 max(step for _, step, _ in missing))
    return missing


def _terminate(uri: str, run_id: str, status: str) -> None:
    """`finish_run`, bounded, a warning instead of an error: a tracking outage must not fail a finished attempt."""
    try:
        with bounded_mlflow_http(10):
            finish_run(uri, run_id, status)
    except Exception as exc:
        log.warning("MLflow attempt run %s not closed (%s)", run_id, " ".join(str(exc).split())[:200])
