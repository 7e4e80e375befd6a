"""Run lineage: which pretrain a fine-tune starts from and where its weights are, by run (`runs:/<run id>`:
its final checkpoint) or by logged model (`models:/<model id>`, `models:/<name>/<version>`: any checkpoint,
models.py). A run's children are listed by `pipeline.tracking.runs.child_run_ids`."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

from mlflow import MlflowClient

from pipeline import storage
from pipeline.tracking.models import CHECKPOINT_TAG, checkpoint_models, resolve_model


class LineageError(ValueError):
    """A run that cannot serve as requested (unknown, not a pretrain, no checkpoint); one line."""


WEIGHTS_FILES = ("model.safetensors", "model_ema.safetensors", "config.json")  # what a fine-tune needs of it


@dataclass
class PretrainRun:
    run_id: str
    run_name: str
    checkpoint_dir: str  # a local folder holding model.safetensors and config.json
    img_size: int
    downloaded: bool = False  # checkpoint_dir is a temporary copy (of remote storage or artifacts), the caller's
    model_id: str = ""  # the logged model of the checkpoint, when there is one


def pretrain_run(uri: str, run_id: str) -> PretrainRun:
    """The finished pretrain run `run_id` and a local folder with its final consolidated weights: its
    checkpoint folder (`pipeline.checkpoint`), with the weights copied from remote storage when it is a storage
    URI, or else the weights its final logged model holds."""
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
    models = checkpoint_models(client, run_id)
    final = models[-1] if models else None
    local, downloaded = _weights_folder(client, f"pretrain run {run_id}", run.data.tags.get(CHECKPOINT_TAG, ""),
                                        final)
    return PretrainRun(run_id=run_id, run_name=run.info.run_name, checkpoint_dir=local,
                       img_size=int(run.data.params.get("data.img_size", 0)), downloaded=downloaded,
                       model_id=final.model_id if final else "")


def model_checkpoint(uri: str, spec: str) -> PretrainRun:
    """The checkpoint of the logged model `spec` (models:/…) and a local folder with its weights."""
    try:
        model = resolve_model(uri, spec)
    except ValueError as err:
        raise LineageError(str(err)) from None
    client = MlflowClient(uri)
    run = client.get_run(model.source_run_id) if model.source_run_id else None
    local, downloaded = _weights_folder(client, f"model {spec}", model.tags.get(CHECKPOINT_TAG, ""), model)
    return PretrainRun(run_id=model.source_run_id or "", run_name=run.info.run_name if run else model.name,
                       checkpoint_dir=local, img_size=int(run.data.params.get("data.img_size", 0)) if run else 0,
                       downloaded=downloaded, model_id=model.model_id)


def _weights_folder(client, what: str, checkpoint: str, model) -> tuple[str, bool]:
    """(a local folder with the weights, whether it is a temporary copy): the checkpoint folder, copied when it is
    on remote storage, or else the artifacts of the logged model `model`."""
    try:
        reachable = bool(checkpoint) and storage.exists(storage.join(checkpoint, WEIGHTS_FILES[0]))
    except OSError as err:  # a store that refuses us: credentials, endpoint, network
        raise LineageError(f"{what}: cannot read its checkpoint {checkpoint}: {err}") from err
    if reachable and not storage.is_remote(checkpoint):
        return checkpoint, False
    if reachable:
        return storage.download(checkpoint, WEIGHTS_FILES, prefix="init-"), True
    names = {artifact.path for artifact in client.list_logged_model_artifacts(model.model_id)} if model else set()
    if WEIGHTS_FILES[0] not in names:
        raise LineageError(f"{what} has no weights: neither its checkpoint folder {checkpoint or '(none)'} nor a "
                           f"{WEIGHTS_FILES[0]} in its logged model is reachable")
    from mlflow.artifacts import download_artifacts

    target = tempfile.mkdtemp(prefix="init-")
    for name in WEIGHTS_FILES:
        if name in names:
            download_artifacts(artifact_uri=f"{model.artifact_location}/{name}", dst_path=target,
                               tracking_uri=client.tracking_uri)
    return target, True


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
