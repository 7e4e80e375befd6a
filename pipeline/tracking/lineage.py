"""Run lineage: which pretrain a fine-tune starts from and where that run's weights are. A run's children
are listed by `pipeline.tracking.runs.child_run_ids`."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

from mlflow import MlflowClient

from pipeline import storage

RUN_PREFIX = "runs:/"


class LineageError(ValueError):
    """A run that cannot serve as requested (unknown, not a pretrain, no checkpoint); one line."""


CHECKPOINT_TAG = "pipeline.checkpoint"  # where a run's final checkpoint is: a local path or a storage URI
WEIGHTS_FILES = ("model.safetensors", "model_ema.safetensors", "config.json")  # what a fine-tune needs of it


@dataclass
class PretrainRun:
    run_id: str
    run_name: str
    checkpoint_dir: str  # a local folder holding model.safetensors and config.json
    img_size: int
    downloaded: bool = False  # checkpoint_dir is a temporary copy (of remote storage or artifacts), the caller's


def pretrain_run(uri: str, run_id: str) -> PretrainRun:
    """The finished pretrain run `run_id` and a local folder with its final consolidated weights: its
    checkpoint folder (`pipeline.checkpoint`), with the weights copied from remote storage when it is a storage
    URI, or else the weights it logged to MLflow."""
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise LineageError(f"no MLflow run {run_id!r} in {uri}") from err
    job = run.data.tags.get("pipeline.job", "")
    if job != "pretrain":
        raise LineageError(f"run {run_id} is a {job or 'non-pipeline'!r} run, not a pretrain run; fine-tune from "
                           "a run of jobs/pretrain.py")
    if run.info.status != "FINISHED":
        raise LineageError(f"pretrain run {run_id} is {run.info.status}, not FINISHED: it has no final checkpoint")
    checkpoint = run.data.tags.get(CHECKPOINT_TAG, "")
    try:
        reachable = bool(checkpoint) and storage.exists(storage.join(checkpoint, WEIGHTS_FILES[0]))
    except OSError as err:  # a store that refuses us: credentials, endpoint, network
        raise LineageError(f"pretrain run {run_id}: cannot read its checkpoint {checkpoint}: {err}") from err
    if not reachable:
        local = _download_weights(client, run_id)
    elif storage.is_remote(checkpoint):
        local = storage.download(checkpoint, WEIGHTS_FILES, prefix=f"init-{run_id[:8]}-")
    else:
        local = checkpoint
    return PretrainRun(run_id=run_id, run_name=run.info.run_name, checkpoint_dir=local,
                       img_size=int(run.data.params.get("data.img_size", 0)), downloaded=local != checkpoint)


def _download_weights(client, run_id: str) -> str:
    """The run's `weights/` artifacts in a local folder, for checkpoints this machine cannot see."""
    names = {artifact.path for artifact in client.list_artifacts(run_id, "weights")}
    if "weights/model.safetensors" not in names:
        raise LineageError(f"pretrain run {run_id} has no checkpoint: neither its pipeline.checkpoint folder nor "
                           "a weights/model.safetensors artifact is reachable")
    target = tempfile.mkdtemp(prefix=f"init-{run_id[:8]}-")
    return client.download_artifacts(run_id, "weights", target)


def latest_pretrain_run_id(uri: str, experiment: str) -> str | None:
    """The newest FINISHED pretrain run of `experiment`, or None."""
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], filter_string="tags.`pipeline.job` = 'pretrain' and "
                              "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"],
                              max_results=1)
    return runs[0].info.run_id if runs else None
