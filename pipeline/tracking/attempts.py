"""One value per step in the job's run, however often its worker group restarts; live curves meanwhile.

After a lost worker or a resize, Ray Train restarts the worker group from the latest committed checkpoint and
the steps since it are trained again. MLflow cannot delete a metric value, so a run that had received every
step as it happened would hold two values for each redone step, and its curves would zig-zag. So rank 0
logs each step's metrics twice:
- live, at once, into a run of this attempt, a child of the job's run (`mlflow.parentRunId`), named
  "<run> attempt N" and tagged with its world size and first step. It shows progress within
  `train.log_every_n_steps`; a lost attempt's run keeps what it trained, and ends FAILED or KILLED.
- into the job's run when the checkpoint that holds those steps is committed (`commit(step)`), with the
  timestamps they were logged at. A restart resumes from a committed checkpoint, so the job's run never
  receives a step twice. The last step is always a checkpoint, so a finished run holds every step.
- A worker can be lost between Ray committing a checkpoint and rank 0 committing its steps' metrics. So each
  attempt starts by copying, into the job's run, the steps up to the checkpoint it resumes from that the job's
  run lacks, from the runs of the earlier attempts (the latest that has each step: the one that went on).

Both go through `MetricLogger` (metrics.py), so logging and commits never wait on the tracking store; only an
attempt's start does (creating its run, copying missing steps), each request bounded to 10 s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from pipeline.internals import bounded_mlflow_http
from pipeline.tracking.metrics import MetricLogger

log = logging.getLogger(__name__)

ATTEMPT_OF_TAG = "pipeline.attempt_of"  # on an attempt's run: the job's run id
ATTEMPT_TAG = "pipeline.attempt"


class AttemptMetrics:
    """Rank 0's metric sink for one attempt of a job's run.

    metrics = AttemptMetrics(uri, run_id, run_name="pretrain-…", world_size=2, start_step=40)
    metrics.log({"train/loss": 1.9}, step=41)   # live, into the attempt's run
    metrics.commit(60)                          # steps <= 60 into the job's run (checkpoint 60 committed)
    metrics.close("FINISHED")
    """

    def __init__(self, uri: str, run_id: str, *, run_name: str, world_size: int, start_step: int):
        self.uri = uri
        self.run_id = run_id
        self.committed = MetricLogger(uri, run_id)
        self.attempt_run_id, earlier = start_attempt_run(uri, run_id, run_name=run_name, world_size=world_size,
                                                         start_step=start_step)
        self.live = MetricLogger(uri, self.attempt_run_id) if self.attempt_run_id else None
        self.pending: list[tuple[dict, int, int]] = []  # (metrics, step, timestamp_ms) not yet committed
        if earlier and start_step:
            for metrics, step, timestamp_ms in uncommitted_steps(uri, run_id, earlier, start_step):
                self.committed.log(metrics, step, timestamp_ms)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        timestamp_ms = time.time_ns() // 1_000_000
        if self.live is not None:
            self.live.log(metrics, step, timestamp_ms)
        self.pending.append((dict(metrics), step, timestamp_ms))

    def commit(self, step: int) -> None:
        """The checkpoint at `step` is committed: its steps' metrics go into the job's run."""
        keep = []
        for metrics, at, timestamp_ms in self.pending:
            if at <= step:
                self.committed.log(metrics, at, timestamp_ms)
            else:
                keep.append((metrics, at, timestamp_ms))
        self.pending = keep

    def close(self, status: str) -> None:
        """Flush both; the attempt's run ends with `status`. Metrics not committed stay in the attempt's run."""
        self.committed.close()
        if self.live is not None:
            self.live.close()
            _terminate(self.uri, self.attempt_run_id, status)


def start_attempt_run(uri: str, run_id: str, *, run_name: str, world_size: int, start_step: int
                      ) -> tuple[str | None, list[str]]:
    """A child run of `run_id` for this attempt, and the earlier attempts' runs, oldest first; earlier attempts
    still RUNNING (their workers were lost) end KILLED. (None, []), with a warning, when the tracking store cannot
    be reached: training goes on, and the job's run still receives every committed step."""
    from mlflow.tracking import MlflowClient

    try:
        with bounded_mlflow_http(10):
            client = MlflowClient(tracking_uri=uri)
            parent = client.get_run(run_id)
            earlier = sorted(client.search_runs([parent.info.experiment_id],
                                                filter_string=f"tags.`{ATTEMPT_OF_TAG}` = '{run_id}'",
                                                max_results=1000),
                             key=lambda run: int(run.data.tags.get(ATTEMPT_TAG, 0)))
            for run in earlier:
                if run.info.status == "RUNNING":
                    client.set_terminated(run.info.run_id, "KILLED")
            number = len(earlier) + 1
            tags = {"mlflow.parentRunId": run_id, ATTEMPT_OF_TAG: run_id, ATTEMPT_TAG: str(number),
                    "pipeline.world_size": str(world_size), "pipeline.start_step": str(start_step)}
            run = client.create_run(parent.info.experiment_id, run_name=f"{run_name} attempt {number}", tags=tags)
            return run.info.run_id, [r.info.run_id for r in earlier]
    except Exception as exc:  # a tracking outage must not stop training
        log.warning("MLflow run for this attempt not created (%s); live metrics go to the console only",
                    " ".join(str(exc).split())[:200])
        return None, []


def uncommitted_steps(uri: str, run_id: str, earlier: list[str], up_to: int) -> list[tuple[dict, int, int]]:
    """(metrics, step, timestamp_ms) of the steps <= `up_to` that the job's run lacks, per metric, from the
    latest of the `earlier` attempts' runs that holds each. Nothing, with a warning, if the store cannot be read."""
    from mlflow.tracking import MlflowClient

    try:
        with bounded_mlflow_http(10):
            client = MlflowClient(tracking_uri=uri)
            keys = set().union(*(client.get_run(attempt).data.metrics for attempt in earlier))
            out: dict[tuple[int, int], dict] = {}
            for key in sorted(keys):
                have = {m.step for m in client.get_metric_history(run_id, key)}
                found: dict[int, tuple[float, int]] = {}
                for attempt in earlier:  # oldest first: a later attempt's value replaces an earlier one's
                    for m in client.get_metric_history(attempt, key):
                        if m.step <= up_to and m.step not in have:
                            found[m.step] = (m.value, m.timestamp)
                for step, (value, timestamp_ms) in found.items():
                    out.setdefault((step, timestamp_ms), {})[key] = value
    except Exception as exc:
        log.warning("steps up to %d not copied into MLflow run %s (%s)", up_to, run_id,
                    " ".join(str(exc).split())[:200])
        return []
    if out:
        log.info("MLflow: %d steps up to %d copied into the job's run from the lost attempt's run", len(
            {step for step, _ in out}), up_to)
    return [(metrics, step, timestamp_ms) for (step, timestamp_ms), metrics in sorted(out.items())]


def _terminate(uri: str, run_id: str, status: str) -> None:
    from mlflow.tracking import MlflowClient

    try:
        with bounded_mlflow_http(10):
            MlflowClient(tracking_uri=uri).set_terminated(run_id, status)
    except Exception as exc:
        log.warning("MLflow attempt run %s not closed (%s)", run_id, " ".join(str(exc).split())[:200])
