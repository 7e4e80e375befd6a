"""MLflow tracking: where runs are stored, how they are created and tagged, step metrics, curves.

- resolve_tracking_uri, check_tracking_reachable, artifact_root_for (store): an absolute store and its artifact
  root, checked before Ray starts.
- flatten_params, lineage_tags (run_record): a run's config as flat params, and its lineage tags.
- start_job_run, log_run_artifacts, finish_run (runs): the driver's side of a run, with lineage tags.
- child_run_ids (runs): the runs made from a run, through their pipeline.parent_run_id tag; run_page (runs): where
  to see a run in MLflow's UI.
- log_datasets (datasets): a run's shards as MLflow datasets, with a digest of their content.
- CheckpointModels, register_best, resolve_model (models): each committed checkpoint a logged model, the best one
  registered, models:/ URIs resolved.
- MetricLogger (metrics): rank 0's step metrics, batched off the training thread, kept through outages.
- AttemptMetrics (attempts): live metrics in a child run per attempt of the worker group, and each step once in
  the job's run, when its checkpoint is committed (which also makes its logged model); JOB_RUNS (runs) filters the
  attempts out of a search.
- metric_histories, plot_curves (plots): curves of several runs, one subplot per metric.
"""

from pipeline.tracking.metrics import MetricLogger
from pipeline.tracking.run_record import flatten_params
from pipeline.tracking.runs import child_run_ids, finish_run, log_run_artifacts, start_job_run
from pipeline.tracking.store import (
    TrackingUnavailable,
    artifact_root_for,
    check_tracking_reachable,
    resolve_tracking_uri,
)

__all__ = [
    "MetricLogger",
    "TrackingUnavailable",
    "artifact_root_for",
    "check_tracking_reachable",
    "child_run_ids",
    "finish_run",
    "flatten_params",
    "log_run_artifacts",
    "resolve_tracking_uri",
    "start_job_run",
]
