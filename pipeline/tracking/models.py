"""Checkpoints as MLflow logged models: one per committed checkpoint, which checkpoint is best, registration,
and the `models:/` URIs a fine-tune starts from.

Each checkpoint that Ray Train committed becomes a logged model of the job's run (an output of the run at its
step), made by rank 0 off the training thread (`CheckpointModels`). Its files stay where Ray put them: the
model is external, with the checkpoint's location in the tag `pipeline.checkpoint`, and the val metrics measured
by then are linked to it (with the val dataset), so that the UI's Models tab and `search_logged_models` can say
which checkpoint of which run is best. The final model also holds the consolidated weights (`model.safetensors`,
`config.json`) as its artifacts when the checkpoint is on this machine's disk (launch.record_outcome).

Where Ray deletes old checkpoints (`train.keep_checkpoints`), their models keep their metrics and point at a
folder that is gone; `tracking.register_as` makes Ray keep the best ones by val/top1 instead (launch.py).
"""

from __future__ import annotations

import json
import logging
import queue
import re
import tempfile
import threading
from collections.abc import Mapping

import numpy as np

from pipeline.internals import bounded_mlflow_http
from pipeline.tracking.run_record import flatten_params

log = logging.getLogger(__name__)

CHECKPOINT_TAG = "pipeline.checkpoint"  # where a checkpoint (or a run's final one) is: a local path or a URI
STEP_TAG = "pipeline.step"
MODEL_ID_TAG = "pipeline.model_id"  # on a registered version: the logged model it is
MODEL_TYPE = "vit-checkpoint"
MODEL_PREFIX = "models:/"
BEST_METRIC = "val/top1"


def create_checkpoint_model(client, *, experiment_id: str, run_id: str, name: str, step: int, location: str,
                            params: Mapping[str, str], val: Mapping[str, tuple[float, int, int]] | None = None,
                            val_dataset: tuple[str, str] | None = None) -> str:
    """An external logged model of the checkpoint at `location`, an output of `run_id` at `step`, with the val
    metrics `val` (key -> (value, step, timestamp_ms)) linked to it and to `val_dataset`; its id. It holds an
    MLmodel file only (as `mlflow.create_external_model` makes), so that it can be registered. It turns READY
    last, so a READY model has its metrics."""
    from mlflow.entities import LoggedModelOutput, Metric
    from mlflow.models.model import MLMODEL_FILE_NAME
    from mlflow.models.utils import get_external_mlflow_model_spec
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_IS_EXTERNAL

    model = client.create_logged_model(experiment_id, name=name, source_run_id=run_id, params=dict(params),
                                       model_type=MODEL_TYPE, tags={MLFLOW_MODEL_IS_EXTERNAL: "true",
                                                                    CHECKPOINT_TAG: location, STEP_TAG: str(step)})
    dataset_name, dataset_digest = val_dataset or (None, None)
    if val:
        client.log_batch(run_id, metrics=[Metric(key, value, timestamp_ms, at, model_id=model.model_id,
                                                 dataset_name=dataset_name, dataset_digest=dataset_digest)
                                          for key, (value, at, timestamp_ms) in val.items()])
    with tempfile.TemporaryDirectory(prefix="mlmodel-") as folder:
        get_external_mlflow_model_spec(model).save(f"{folder}/{MLMODEL_FILE_NAME}")
        client.log_model_artifacts(model.model_id, folder)
    client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
    return model.model_id


def checkpoint_models(client, run_id: str, *, ready: bool = True) -> list:
    """The logged models of the run's checkpoints, by step: the READY ones, or (`ready=False`) all of them."""
    from mlflow.entities import LoggedModelStatus

    experiment_id = client.get_run(run_id).info.experiment_id
    models, token = [], None
    while True:
        page = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'",
                                           max_results=100, page_token=token)
        models += [model for model in page if model.tags.get(STEP_TAG) and
                   (model.status == LoggedModelStatus.READY or not ready)]
        token = page.token
        if not token:
            break
    return sorted(models, key=lambda model: int(model.tags[STEP_TAG]))


def latest_value(model, key: str) -> float | None:
    """The value of `key` linked to the model at its highest step, or None."""
    values = [(m.step, m.timestamp, m.value) for m in (model.metrics or []) if m.key == key]
    return max(values)[2] if values else None


def best_checkpoint_model(client, run_id: str, metric: str = BEST_METRIC, higher_is_better: bool = True):
    """The run's checkpoint model with the best `metric` (the later one on a tie), or None when no checkpoint
    has it."""
    sign = 1 if higher_is_better else -1
    scored = [(sign * value, int(model.tags[STEP_TAG]), model) for model in checkpoint_models(client, run_id)
              if (value := latest_value(model, metric)) is not None]
    return max(scored, key=lambda item: item[:2])[2] if scored else None


def register_best(uri: str, run_id: str, name: str, metric: str = BEST_METRIC, higher_is_better: bool = True):
    """Register the run's best checkpoint (by `metric`: the objective's, val/top1 for a classifier) as a new
    version of the registered model `name`; the ModelVersion, or None (with a warning) when no checkpoint was
    evaluated."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    client = MlflowClient(uri)
    best = best_checkpoint_model(client, run_id, metric, higher_is_better)
    if best is None:
        log.warning("tracking.register_as=%s: no checkpoint of run %s has %s, nothing registered", name, run_id,
                    metric)
        return None
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):  # a later run registers again
            raise
    # as mlflow.register_model does, with the source it resolves models:/<id> to (a SQL registry resolves that
    # through the global tracking URI) and the model id as a version tag too (a SQL registry keeps none)
    version = client.create_model_version(name, best.artifact_location, run_id=run_id, model_id=best.model_id,
                                          tags={STEP_TAG: best.tags[STEP_TAG], MODEL_ID_TAG: best.model_id})
    linked = json.loads(best.tags.get(MLFLOW_MODEL_VERSIONS, "[]")) + [{"name": name, "version": str(version.version)}]
    client.set_logged_model_tags(best.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(linked)})
    log.info("registered %s version %s: the checkpoint at step %s (%s %.4f), models:/%s", name, version.version,
             best.tags[STEP_TAG], metric, latest_value(best, metric), best.model_id)
    return version


def resolve_model(uri: str, spec: str):
    """The logged model `models:/<model id>`, `models:/<registered name>/<version>` or `models:/<name>@<alias>`
    names; ValueError, in one line, when there is none."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri)
    body = spec[len(MODEL_PREFIX):].strip("/")
    try:
        if "@" in body:
            version = client.get_model_version_by_alias(*body.split("@", 1))
        elif re.fullmatch(r".+/\d+", body):
            version = client.get_model_version(*body.rsplit("/", 1))
        else:
            version = None
        model_id = (version.model_id or version.tags.get(MODEL_ID_TAG)) if version else body
        if not model_id:
            raise ValueError(f"{spec} is a registered version without a logged model")
        return client.get_logged_model(model_id)
    except MlflowException as err:
        raise ValueError(f"no MLflow model {spec} in {uri}: {' '.join(str(err.message).split())[:200]}") from None


class CheckpointModels:
    """Rank 0's logged models of committed checkpoints, and the pictures of its evaluations, sent by one background
    thread in order, so that training never waits on the tracking store for them (a few requests each, bounded to
    10 s). A store that is down costs a warning per checkpoint or picture, not training.

    models = CheckpointModels(uri, run_id, run_name="pretrain-…", params={...}, val_dataset=("digits/val", "3f…"))
    models.add(300, "s3://…/checkpoint_000002", {"val/top1": (0.78, 300, 1764…)})
    models.close()
    """

    def __init__(self, uri: str, run_id: str, *, run_name: str, params: Mapping, val_dataset: tuple[str, str] | None):
        self.uri, self.run_id, self.run_name, self.params = uri, run_id, run_name, flatten_params(params)
        self.val_dataset = val_dataset
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"mlflow-models-{run_id[:8]}", daemon=True)
        self._thread.start()

    def add(self, step: int, location: str, val: Mapping[str, tuple[float, int, int]], *,
            unless_made: bool = False) -> None:
        """The checkpoint at `step` was committed at `location`; `val`: key -> (value, step, timestamp_ms) of the
        val metrics measured by then. `unless_made`: only if the run has no model of that step yet (the checkpoint
        an attempt resumes from, whose model its lost predecessor may not have made)."""
        self._queue.put((step, location, dict(val), unless_made))

    def add_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """An evaluation's pictures at `step` (key -> (H, W, 3) uint8), as MLflow images of the job's run: the run
        page shows each key's picture at every step."""
        self._queue.put((step, None, dict(images), False))

    def _run(self) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import LoggedModelStatus

        client, experiment_id = None, None
        while (item := self._queue.get()) is not None:
            step, location, val, unless_made = item
            try:
                with bounded_mlflow_http(10):
                    client = client or MlflowClient(tracking_uri=self.uri)
                    if location is None:
                        for key, image in val.items():
                            client.log_image(self.run_id, image, key=key, step=step)
                        continue
                    experiment_id = experiment_id or client.get_run(self.run_id).info.experiment_id
                    if unless_made:
                        made = [m for m in checkpoint_models(client, self.run_id, ready=False)
                                if int(m.tags[STEP_TAG]) == step]
                        if any(m.status == LoggedModelStatus.READY for m in made):
                            continue
                        for model in made:  # its maker was lost half-way
                            client.finalize_logged_model(model.model_id, "FAILED")
                    create_checkpoint_model(client, experiment_id=experiment_id, run_id=self.run_id,
                                            name=f"{self.run_name}-step-{step}", step=step, location=location,
                                            params=self.params, val=val, val_dataset=self.val_dataset)
            except Exception as exc:  # a tracking outage must not stop training
                log.warning("MLflow %s at step %d not %s (%s)", "logged model of the checkpoint" if location else
                            "pictures of the evaluation", step, "made" if location else "logged",
                            " ".join(str(exc).split())[:200])
            finally:
                self._queue.task_done()

    def flush(self, timeout_s: float) -> bool:
        """Wait at most `timeout_s` for the models asked for so far; True when they are all done."""
        done = threading.Event()
        threading.Thread(target=lambda: (self._queue.join(), done.set()), daemon=True).start()
        return done.wait(timeout_s)

    def close(self, timeout_s: float = 30) -> None:
        self._queue.put(None)
        self._thread.join(timeout_s)
