"""Store resolution, reachability checks, params, runs with lineage tags, artifacts: sqlite and a real server."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from pipeline.tracking import runs
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

REPO_ROOT = Path(__file__).resolve().parents[2]

CONFIG = {
    "model": {"preset": "tiny", "img_size": 32, "patch_size": 4, "drop_path": 0.0},
    "optim": {"lr": 3e-4, "betas": (0.9, 0.999), "layer_decay": None},
    "data": {"train": "data/digits/train-{000000..000003}.tar", "mean": [0.5, 0.5, 0.5]},
    "train": {"steps": 600, "zero_stage": 2, "bf16": False},
}


@pytest.fixture
def no_tracking_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(runs.HOME_ENV, raising=False)


def _unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


# ---- where the store is -----------------------------------------------------------------------------


def test_default_store_is_absolute_sqlite_in_cwd(tmp_path, monkeypatch, no_tracking_env):
    monkeypatch.chdir(tmp_path)
    uri = resolve_tracking_uri()
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert uri.startswith("sqlite:////")  # SQLAlchemy's absolute form
    assert artifact_root_for(uri) == (tmp_path.resolve() / "mlartifacts").as_uri()


def test_explicit_uri_wins_over_env_and_env_over_default(tmp_path, monkeypatch, no_tracking_env):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert resolve_tracking_uri() == "http://tracking.example:5000"
    assert resolve_tracking_uri("http://127.0.0.1:5001") == "http://127.0.0.1:5001"
    assert artifact_root_for("http://127.0.0.1:5001") is None  # the server decides
    assert resolve_tracking_uri("databricks") == "databricks"  # a bare remote name, not a folder


def test_pipeline_home_sets_the_default_folder(tmp_path, monkeypatch, no_tracking_env):
    monkeypatch.setenv(runs.HOME_ENV, str(tmp_path / "home"))
    assert resolve_tracking_uri() == f"sqlite:///{(tmp_path / 'home').resolve()}/mlflow.db"


def test_relative_sqlite_and_plain_folders_are_made_absolute(tmp_path, monkeypatch, no_tracking_env):
    monkeypatch.chdir(tmp_path)
    cwd = tmp_path.resolve()
    assert resolve_tracking_uri("sqlite:///runs/mlflow.db") == f"sqlite:///{cwd}/runs/mlflow.db"
    assert resolve_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert resolve_tracking_uri("mlruns") == (cwd / "mlruns").as_uri()
    assert resolve_tracking_uri("./a/../mlruns") == (cwd / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri() == f"sqlite:///{cwd}/env.db"


def test_ray_job_working_dir_puts_the_default_store_in_home(tmp_path, monkeypatch, no_tracking_env):
    ray_copy = tmp_path / "ray/session_2026-11-26_08-00-00_1/runtime_resources/working_dir_files/_ray_pkg_3f9a"
    ray_copy.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.chdir(ray_copy)
    assert runs.in_ray_job_working_dir()
    expected = (tmp_path / "user" / ".vit-pipeline" / "mlflow.db").resolve()
    assert resolve_tracking_uri() == f"sqlite:///{expected}"
    monkeypatch.setenv(runs.HOME_ENV, str(tmp_path / "shared"))  # an explicit home still wins
    assert resolve_tracking_uri() == f"sqlite:///{(tmp_path / 'shared').resolve()}/mlflow.db"
    monkeypatch.chdir(tmp_path)
    assert not runs.in_ray_job_working_dir()


def test_relative_default_store_is_created_at_its_absolute_path(tmp_path, monkeypatch, no_tracking_env):
    """The one test that lets MLflow create a store from nothing (its migrations take ~5 s)."""
    monkeypatch.chdir(tmp_path)
    uri = resolve_tracking_uri()
    check_tracking_reachable(uri)
    run_id = start_job_run(uri=uri, experiment="default-rule", run_name="r", job="pretrain", config=CONFIG)
    monkeypatch.chdir(tmp_path.parent)  # results must not depend on the cwd any more
    assert (tmp_path / "mlflow.db").is_file()
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("default-rule")
    assert experiment.artifact_location == (tmp_path.resolve() / "mlartifacts" / "default-rule").as_uri()
    assert client.get_run(run_id).info.artifact_uri.startswith(experiment.artifact_location + "/")
    assert client.get_run(run_id).data.params["model.img_size"] == "32"


# ---- reachability -----------------------------------------------------------------------------------


def test_dead_server_port_raises_one_clear_line_quickly(dead_uri):
    uri = dead_uri
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable) as raised:
        check_tracking_reachable(uri, timeout_s=5)
    assert time.monotonic() - started < 2.0
    message = str(raised.value)
    assert "\n" not in message
    assert uri in message
    assert "not reachable" in message and "mlflow server" in message and "MLFLOW_TRACKING_URI" in message


def test_live_server_is_reachable(server):
    check_tracking_reachable(server.uri, timeout_s=5)
    check_tracking_reachable(server.uri + "/", timeout_s=5)


def test_sqlite_folder_is_created_or_reported(tmp_path):
    uri = f"sqlite:///{tmp_path}/new/deeper/mlflow.db"
    check_tracking_reachable(uri)
    assert (tmp_path / "new" / "deeper").is_dir()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(TrackingUnavailable) as raised:
        check_tracking_reachable(f"sqlite:///{blocker}/sub/mlflow.db")
    assert str(blocker) in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_sqlite_folder_is_reported(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(TrackingUnavailable, match="not writable"):
        check_tracking_reachable(f"sqlite:///{locked}/mlflow.db")


# ---- params -----------------------------------------------------------------------------------------


def test_flatten_params_nests_lists_and_truncates():
    flat = flatten_params({**CONFIG, "notes": "x" * (MAX_PARAM_VAL_LENGTH + 500), "empty": {}})
    assert flat["model.img_size"] == "32"
    assert flat["model.drop_path"] == "0.0"
    assert flat["optim.lr"] == "0.0003"
    assert flat["optim.betas"] == "[0.9,0.999]"
    assert flat["optim.layer_decay"] == "None"
    assert flat["data.mean"] == "[0.5,0.5,0.5]"
    assert flat["train.bf16"] == "False"
    assert flat["empty"] == "{}"
    assert len(flat["notes"]) == MAX_PARAM_VAL_LENGTH and flat["notes"].endswith("...")
    assert len(flat) == 14
    assert flatten_params({"a": 1}, prefix="job") == {"job.a": "1"}


def test_flatten_params_takes_dataclasses():
    @dataclass
    class Model:
        img_size: int = 32
        depths: tuple[int, ...] = (2, 2)

    @dataclass
    class Job:
        model: Model = field(default_factory=Model)
        name: str = "pretrain"

    assert flatten_params(Job()) == {"model.img_size": "32", "model.depths": "[2,2]", "name": "pretrain"}


# ---- runs -------------------------------------------------------------------------------------------


def test_start_job_run_logs_params_and_lineage_tags(any_store):
    experiment = _unique("vit-test")
    parent = start_job_run(uri=any_store, experiment=experiment, run_name="pre", job="pretrain", config=CONFIG)
    child = start_job_run(
        uri=any_store,
        experiment=experiment,
        run_name="ft",
        job="finetune",
        config={**CONFIG, "model": {**CONFIG["model"], "img_size": 64}},
        parent_run_id=parent,
        extra_tags={"pipeline.init_from": f"runs:/{parent}"},
    )
    assert mlflow.active_run() is None  # the driver holds no active run
    client = MlflowClient(tracking_uri=any_store)
    run = client.get_run(child)
    assert run.info.status == "RUNNING"
    assert run.info.run_name == "ft"
    assert run.data.params == flatten_params({**CONFIG, "model": {**CONFIG["model"], "img_size": 64}})
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


def test_git_commit_outside_a_checkout_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(runs.GIT_COMMIT_ENV, raising=False)
    assert runs.git_commit(tmp_path) == "unknown"
    monkeypatch.setenv(runs.GIT_COMMIT_ENV, "0123456789abcdef0123456789abcdef01234567")
    assert runs.git_commit(tmp_path) == "0123456789abcdef0123456789abcdef01234567"


def test_finish_run_rejects_unknown_status(sqlite_uri):
    with pytest.raises(ValueError, match="FINISHED, FAILED, KILLED"):
        finish_run(sqlite_uri, "0" * 32, "DONE")


def test_log_run_artifacts_config_figures_and_files(any_store, tmp_path):
    from pipeline.tracking.plots import plot_curves

    run_id = start_job_run(uri=any_store, experiment=_unique("artifacts"), run_name="r", job="pretrain", config={})
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x00" * 1024)
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"img_size": 32}))
    figure = plot_curves({"r": {"train/loss": [(0, 2.0), (10, 1.0)], "val/top1": [(10, 0.5)]}})
    logged = log_run_artifacts(
        any_store,
        run_id,
        config_yaml="model:\n  img_size: 32\n",
        figures={"curves": figure},
        files={"weights": str(weights), "checkpoint": str(checkpoint)},
    )
    assert logged == ["config.yaml", "plots/curves.png", "weights/model.safetensors", "checkpoint"]
    out = Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="", tracking_uri=any_store, dst_path=str(tmp_path / "dl")
        )
    )
    assert (out / "config.yaml").read_text() == "model:\n  img_size: 32\n"
    assert (out / "plots" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "weights" / "model.safetensors").stat().st_size == 1024
    assert json.loads((out / "checkpoint" / "config.json").read_text()) == {"img_size": 32}


def test_log_run_artifacts_reports_missing_files_before_uploading(sqlite_uri, tmp_path):
    run_id = start_job_run(uri=sqlite_uri, experiment="missing", run_name="r", job="pretrain", config={})
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        log_run_artifacts(
            sqlite_uri, run_id, config_yaml="a: 1\n", files={"weights": str(tmp_path / "nope.safetensors")}
        )
    assert MlflowClient(tracking_uri=sqlite_uri).list_artifacts(run_id) == []
