"""How the driver creates, annotates and closes runs, and finds the runs made from a run.

Runs are created with `MlflowClient`, never with `mlflow.start_run`, so no run is left active in the driver
process: the driver hands the run id to the Train workers, which log metrics into it (metrics.py). Every
experiment created here gets the store's absolute artifact root for sqlite stores (store.artifact_root_for).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.tracking.run_record import (
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
    flatten_params,
    lineage_tags,
    truncate,
)
from pipeline.tracking.store import TrackingUnavailable, artifact_root_for

log = logging.getLogger(__name__)

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
# MLflow's UI opens an experiment of this kind on its runs table, not on the GenAI overview
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own: the UI shows the run under its parent
# the runs of jobs, not the runs of their attempts (attempts.py), which carry no pipeline.job tag
JOB_RUNS = "tags.`pipeline.job` LIKE '%'"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, experiment: str) -> str:
    """The id of `experiment`, created if missing (with the absolute artifact root for sqlite stores), of the
    kind that MLflow's UI opens on its training runs (unless someone gave it another kind)."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        root = artifact_root_for(uri)
        location = f"{root}/{_safe_dirname(experiment)}" if root else None
        try:
            return client.create_experiment(experiment, artifact_location=location,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException as exc:  # another job created it between the lookup and the create
            found = client.get_experiment_by_name(experiment)
            if found is None:
                raise TrackingUnavailable(f"cannot create MLflow experiment {experiment!r} in {uri}: {exc}") from exc
    if found.lifecycle_stage == "deleted":
        log.warning("MLflow experiment %r was deleted; restoring it to log into it", experiment)
        client.restore_experiment(found.experiment_id)
    if EXPERIMENT_KIND_TAG not in found.tags:
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return found.experiment_id


def _safe_dirname(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"


def start_job_run(
    *,
    uri: str,
    experiment: str,
    run_name: str,
    job: str,
    config: Mapping[str, Any] | Any,
    parent_run_id: str | None = None,
    extra_tags: Mapping[str, str] | None = None,
) -> str:
    """Create a RUNNING run with flattened params and lineage tags, leave it inactive here, return its id. A run
    made from `parent_run_id` is its child in MLflow's sense too (mlflow.parentRunId)."""
    from mlflow.entities import Param

    client = _client(uri)
    experiment_id = ensure_experiment(uri, experiment)
    tags = _context_tags()
    tags.update(lineage_tags(job, parent_run_id))
    if parent_run_id:
        tags[PARENT_RUN_TAG] = parent_run_id
    tags.update({str(key): str(value) for key, value in (extra_tags or {}).items()})
    tags = {key: truncate(value, MAX_TAG_VAL_LENGTH) for key, value in tags.items()}
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    params = [Param(key, value) for key, value in flatten_params(config).items()]
    try:
        for start in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, params=params[start : start + MAX_PARAMS_TAGS_PER_BATCH])
    except Exception:
        client.set_terminated(run_id, "FAILED")  # no half-made RUNNING run left behind
        raise
    return run_id


def _context_tags() -> dict[str, str]:
    """MLflow's own source tags (user, entry point), which `mlflow.start_run` would add and `create_run` does not."""
    try:
        from mlflow.tracking.context.registry import resolve_tags

        return {key: str(value) for key, value in resolve_tags({}).items()}
    except Exception:  # a context provider failing must not stop a job
        return {}


def run_page(uri: str, run_id: str) -> str:
    """Where to see the run: its page in MLflow's UI, in the model-training view (MLflow 3 opens an experiment on
    its GenAI overview unless told, whatever its kind), behind the `mlflow ui` command for a local store."""
    experiment_id = _client(uri).get_run(run_id).info.experiment_id
    page = f"/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/") + page
    return f"mlflow ui --backend-store-uri {uri}, then http://127.0.0.1:5000{page}"


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark the run FINISHED, FAILED or KILLED, with the end time of now."""
    if status not in RUN_STATUSES:
        raise ValueError(f"run status must be one of {', '.join(RUN_STATUSES)}, got {status!r}")
    _client(uri).set_terminated(run_id, status)


def child_run_ids(uri: str, parent_run_id: str) -> list[str]:
    """Ids of the runs whose `pipeline.parent_run_id` is `parent_run_id`, in any experiment, oldest first."""
    client = _client(uri)
    experiment_ids, token = [], None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        experiment_ids += [experiment.experiment_id for experiment in page]
        token = page.token
        if not token:
            break
    found = []
    for start in range(0, len(experiment_ids), 100):  # keep each query's experiment list short
        found += client.search_runs(
            experiment_ids[start : start + 100],
            filter_string=f"tags.`pipeline.parent_run_id` = '{parent_run_id}'",
            max_results=10_000,
        )
    return [run.info.run_id for run in sorted(found, key=lambda run: (run.info.start_time, run.info.run_id))]


def log_run_artifacts(uri: str, run_id: str, *, config_yaml: str | None = None,
                      figures: Mapping[str, Any] | None = None) -> list[str]:
    """Log the resolved config (`config.yaml`) and figures (`plots/<name>.png`); the artifact paths logged. The
    weights go into the final checkpoint's logged model (models.py), not the run's artifacts."""
    client = _client(uri)
    logged = []
    if config_yaml is not None:
        client.log_text(run_id, config_yaml, "config.yaml")
        logged.append("config.yaml")
    for name, figure in (figures or {}).items():
        artifact = f"plots/{name}" if Path(name).suffix else f"plots/{name}.png"
        client.log_figure(run_id, figure, artifact)
        logged.append(artifact)
    return logged
