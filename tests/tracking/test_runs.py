"""Runs with params and lineage tags, their children, their end, their artifacts: sqlite and a real server."""

from __future__ import annotations

import importlib.metadata
import subprocess
import uuid
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline.tracking.run_record import flatten_params
from pipeline.tracking.runs import child_run_ids, finish_run, log_run_artifacts, start_job_run

REPO_ROOT = Path(__file__).resolve().parents[2]


def _unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


# ---- runs -------------------------------------------------------------------------------------------


def test_start_job_run_logs_params_and_lineage_tags(any_store, job_config):
    experiment = _unique("vit-test")
    parent = start_job_run(uri=any_store, experiment=experiment, run_name="pre", job="pretrain", config=job_config)
    child = start_job_run(
        uri=any_store,
        experiment=experiment,
        run_name="ft",
        job="finetune",
        config={**job_config, "model": {**job_config["model"], "img_size": 64}},
        parent_run_id=parent,
        extra_tags={"pipeline.init_from": f"runs:/{parent}"},
    )
    assert mlflow.active_run() is None  # the driver holds no active run
    client = MlflowClient(tracking_uri=any_store)
    run = client.get_run(child)
    assert run.info.status == "RUNNING"
    assert run.info.run_name == "ft"
    assert run.data.params == flatten_params({**job_config, "model": {**job_config["model"], "img_size": 64}})
    assert run.data.params["model.img_size"] == "64"
    tags = run.data.tags
    assert tags["pipeline.job"] == "finetune"
    assert tags["pipeline.parent_run_id"] == parent
    assert tags["pipeline.init_from"] == f"runs:/{parent}"
    head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert tags["pipeline.git_commit"] == (head.stdout.strip() if head.returncode == 0 else "unknown")
    for package in ("torch", "ray", "deepspeed", "mlflow"):
        assert tags[f"pipeline.version.{package}"] == importlib.metadata.version(package)
    assert "pipeline.parent_run_id" not in client.get_run(parent).data.tags
    assert client.get_run(parent).info.experiment_id == run.info.experiment_id  # the experiment was reused
    other = start_job_run(
        uri=any_store, experiment=_unique("elsewhere"), run_name="ft2", job="finetune", config={}, parent_run_id=parent
    )
    assert child_run_ids(any_store, parent) == [child, other]  # across experiments, oldest first
    assert child_run_ids(any_store, child) == []

    finish_run(any_store, child, "FAILED")
    finish_run(any_store, parent)
    assert client.get_run(child).info.status == "FAILED"
    assert client.get_run(parent).info.status == "FINISHED"
    assert client.get_run(parent).info.end_time is not None


def test_sqlite_experiments_get_an_absolute_artifact_location(sqlite_uri):
    run_id = start_job_run(uri=sqlite_uri, experiment="lineage/vit b16", run_name="r", job="pretrain", config={})
    client = MlflowClient(tracking_uri=sqlite_uri)
    experiment = client.get_experiment_by_name("lineage/vit b16")
    store_dir = Path(sqlite_uri[len("sqlite:///") :]).parent
    assert experiment.artifact_location == (store_dir / "mlartifacts" / "lineage_vit_b16").as_uri()
    assert client.get_run(run_id).info.artifact_uri == f"{experiment.artifact_location}/{run_id}/artifacts"


def test_server_experiments_keep_the_servers_artifact_location(server):
    experiment = _unique("served")
    start_job_run(uri=server.uri, experiment=experiment, run_name="r", job="pretrain", config={})
    location = MlflowClient(tracking_uri=server.uri).get_experiment_by_name(experiment).artifact_location
    assert location.startswith("mlflow-artifacts:/")


def test_more_params_than_one_request_holds(sqlite_uri):
    config = {"grid": {f"p{i:03d}": i for i in range(250)}}  # MLflow takes 100 params per request
    run_id = start_job_run(uri=sqlite_uri, experiment="wide", run_name="r", job="pretrain", config=config)
    params = MlflowClient(tracking_uri=sqlite_uri).get_run(run_id).data.params
    assert len(params) == 250 and params["grid.p249"] == "249"


def test_finish_run_rejects_unknown_status(sqlite_uri):
    with pytest.raises(ValueError, match="FINISHED, FAILED, KILLED"):
        finish_run(sqlite_uri, "0" * 32, "DONE")


def test_log_run_artifacts_config_and_figures(any_store, tmp_path):
    from pipeline.tracking.plots import plot_curves

    run_id = start_job_run(uri=any_store, experiment=_unique("artifacts"), run_name="r", job="pretrain", config={})
    figure = plot_curves({"r": {"train/loss": [(0, 2.0), (10, 1.0)], "val/top1": [(10, 0.5)]}})
    logged = log_run_artifacts(any_store, run_id, config_yaml="model:\n  img_size: 32\n", figures={"curves": figure})
    assert logged == ["config.yaml", "plots/curves.png"]
    out = Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="", tracking_uri=any_store, dst_path=str(tmp_path / "dl")
        )
    )
    assert (out / "config.yaml").read_text() == "model:\n  img_size: 32\n"
    assert (out / "plots" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
