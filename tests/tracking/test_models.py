"""Checkpoints as MLflow logged models (pipeline/tracking/models.py), on a sqlite store and a real `mlflow server`:
one per committed checkpoint with its step, location and the val metrics measured by then; the attempt that
resumes from a checkpoint makes its model only if its predecessor did not; registration picks the best val/top1;
`models:/` URIs resolve to the checkpoint's weights, from its folder or from the model's artifacts."""

import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from safetensors.torch import load_file, save_file

from pipeline.tracking.attempts import AttemptMetrics
from pipeline.tracking.lineage import LineageError, model_checkpoint
from pipeline.tracking.models import (
    CHECKPOINT_TAG,
    MODEL_ID_TAG,
    STEP_TAG,
    checkpoint_models,
    register_best,
    resolve_model,
)
from pipeline.tracking.runs import start_job_run

VAL = ("digits/val", "0123456789abcdef")


def train(metrics: AttemptMetrics, steps: range, top1: dict[int, float], folder: Path) -> None:
    """Log `steps`, with val metrics where `top1` has the step, and commit a checkpoint every 2 steps."""
    for step in steps:
        metrics.log({"train/loss": 3.0 - 0.1 * step, **({"val/top1": top1[step]} if step in top1 else {})}, step)
        if step % 2 == 0:
            (folder / f"checkpoint_{step}").mkdir(parents=True)
            metrics.commit(step, str(folder / f"checkpoint_{step}"))


def test_each_committed_checkpoint_is_one_logged_model_with_its_val_metrics(any_store, job_config, tmp_path):
    client = MlflowClient(any_store)
    run_id = start_job_run(uri=any_store, experiment="models", run_name="pretrain-m", job="pretrain",
                           config=job_config)
    params = {"kind": "pretrain", "model_args": {"depth": 2, "img_size": 32}}
    first = AttemptMetrics(any_store, run_id, run_name="pretrain-m", world_size=2, start_step=0, model_params=params,
                           val_dataset=VAL)
    train(first, range(1, 6), {2: 0.5, 4: 0.8}, tmp_path)
    carried = first.carried()  # the checkpoint at step 4 (the loop saves it before Ray commits it)
    first.flush(30)
    # step 5 was trained, and its checkpoint never committed: the attempt is lost here
    second = AttemptMetrics(any_store, run_id, run_name="pretrain-m", world_size=1, start_step=4, carried=carried,
                            model_params=params, val_dataset=VAL, resumed_location=str(tmp_path / "checkpoint_4"))
    train(second, range(5, 9), {6: 0.7, 8: 0.6}, tmp_path / "again")
    second.close("FINISHED")

    models = checkpoint_models(client, run_id)
    assert [int(m.tags[STEP_TAG]) for m in models] == [2, 4, 6, 8]  # step 4 once, though two attempts had it
    assert [m.tags[CHECKPOINT_TAG] for m in models] == [str(tmp_path / "checkpoint_2"), str(tmp_path / "checkpoint_4"),
                                                         str(tmp_path / "again" / "checkpoint_6"),
                                                         str(tmp_path / "again" / "checkpoint_8")]
    assert all(m.source_run_id == run_id and m.status == LoggedModelStatus.READY for m in models)
    assert models[0].params == {"kind": "pretrain", "model_args.depth": "2", "model_args.img_size": "32"}
    linked = [[(m.key, m.step, m.value, m.dataset_name, m.dataset_digest) for m in model.metrics] for model in models]
    assert linked == [[("val/top1", 2, 0.5, *VAL)], [("val/top1", 4, 0.8, *VAL)], [("val/top1", 6, 0.7, *VAL)],
                      [("val/top1", 8, 0.6, *VAL)]]
    # the run lists them as its outputs at their steps; its val/top1 history holds each value once
    outputs = client.get_run(run_id).outputs.model_outputs
    assert sorted((o.step, o.model_id) for o in outputs) == [(int(m.tags[STEP_TAG]), m.model_id) for m in models]
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val/top1")) == \
        [(2, 0.5), (4, 0.8), (6, 0.7), (8, 0.6)]

    # registration: the best val/top1 (step 4), whatever came after
    version = register_best(any_store, run_id, "digits-vit")
    stored = client.get_model_version("digits-vit", str(version.version))
    assert (stored.name, str(stored.version), stored.tags[MODEL_ID_TAG], stored.run_id) == \
        ("digits-vit", "1", models[1].model_id, run_id)
    assert json.loads(client.get_logged_model(models[1].model_id).tags["mlflow.modelVersions"]) == \
        [{"name": "digits-vit", "version": "1"}]  # what the model's page in the UI lists
    assert resolve_model(any_store, "models:/digits-vit/1").model_id == models[1].model_id
    assert str(register_best(any_store, run_id, "digits-vit").version) == "2"  # a name registered before
    assert resolve_model(any_store, f"models:/{models[3].model_id}").tags[STEP_TAG] == "8"
    with pytest.raises(ValueError, match="no MLflow model models:/m-missing"):
        resolve_model(any_store, "models:/m-missing")


def test_a_models_weights_come_from_its_checkpoint_or_else_its_artifacts(any_store, job_config, tmp_path):
    client = MlflowClient(any_store)
    run_id = start_job_run(uri=any_store, experiment="models", run_name="pretrain-w", job="pretrain",
                           config=job_config)
    metrics = AttemptMetrics(any_store, run_id, run_name="pretrain-w", world_size=1, start_step=0, model_params={})
    checkpoint = tmp_path / "checkpoint_2"
    checkpoint.mkdir()
    weights = {"pos_embed": torch.randn(1, 5, 8)}
    save_file(weights, str(checkpoint / "model.safetensors"))
    (checkpoint / "config.json").write_text("{}")
    metrics.log({"train/loss": 1.0}, 2)
    metrics.commit(2, str(checkpoint))
    metrics.close("FINISHED")
    [model] = checkpoint_models(client, run_id)

    found = model_checkpoint(any_store, f"models:/{model.model_id}")
    assert (found.checkpoint_dir, found.downloaded, found.run_id, found.model_id) == \
        (str(checkpoint), False, run_id, model.model_id)
    client.log_model_artifacts(model.model_id, str(checkpoint))  # as the final checkpoint's model holds them
    (checkpoint / "model.safetensors").unlink()  # Ray deleted the folder's files: the artifacts serve
    found = model_checkpoint(any_store, f"models:/{model.model_id}")
    assert found.downloaded and torch.equal(load_file(f"{found.checkpoint_dir}/model.safetensors")["pos_embed"],
                                            weights["pos_embed"])
    # a checkpoint whose folder holds no weights, and a model without artifacts: a clear error
    other = AttemptMetrics(any_store, run_id, run_name="pretrain-w", world_size=1, start_step=0, model_params={})
    other.log({"train/loss": 1.0}, 4)
    (tmp_path / "gone").mkdir()
    other.commit(4, str(tmp_path / "gone"))
    other.close("FINISHED")
    with pytest.raises(LineageError, match="has no weights: neither its checkpoint folder .*gone"):
        model_checkpoint(any_store, f"models:/{checkpoint_models(client, run_id)[-1].model_id}")
