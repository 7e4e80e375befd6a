"""MLflow tracking: where runs are stored, how they are created and tagged, step metrics, curves.

- resolve_tracking_uri, check_tracking_reachable (runs): an absolute store, checked before Ray starts.
- start_job_run, log_run_artifacts, finish_run (runs): the driver's side of a run, with lineage tags.
- child_run_ids (runs): the runs made from a run, through their pipeline.parent_run_id tag.
- MetricLogger (metrics): rank 0's step metrics, batched off the training thread, kept through outages.
- metric_histories, plot_curves (plots): curves of several runs, one subplot per metric.
"""

from pipeline.tracking.metrics import MetricLogger
from pipeline.tracking.runs import (
    TrackingUnavailable,
    artifact_root_for,
    check_tracking_reachable,
    child_run_ids,
    finish_run,
    flatten_params,
    log_run_artifacts,
    resolve_tracking_uri,
    start_job_run,
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
