"""Store resolution and reachability checks: the default rule, absolute local URIs, sqlite and a real server."""

from __future__ import annotations

import os
import time

import pytest
from mlflow.tracking import MlflowClient

from pipeline.tracking import store
from pipeline.tracking.runs import start_job_run
from pipeline.tracking.store import (
    TrackingUnavailable,
    artifact_root_for,
    check_tracking_reachable,
    resolve_tracking_uri,
)


@pytest.fixture
def no_tracking_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(store.HOME_ENV, raising=False)


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
    monkeypatch.setenv(store.HOME_ENV, str(tmp_path / "home"))
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
    assert store.in_ray_job_working_dir()
    expected = (tmp_path / "user" / ".vit-pipeline" / "mlflow.db").resolve()
    assert resolve_tracking_uri() == f"sqlite:///{expected}"
    monkeypatch.setenv(store.HOME_ENV, str(tmp_path / "shared"))  # an explicit home still wins
    assert resolve_tracking_uri() == f"sqlite:///{(tmp_path / 'shared').resolve()}/mlflow.db"
    monkeypatch.chdir(tmp_path)
    assert not store.in_ray_job_working_dir()


def test_relative_default_store_is_created_at_its_absolute_path(tmp_path, monkeypatch, no_tracking_env, job_config):
    """The one test that lets MLflow create a store from nothing (its migrations take ~5 s)."""
    monkeypatch.chdir(tmp_path)
    uri = resolve_tracking_uri()
    check_tracking_reachable(uri)
    run_id = start_job_run(uri=uri, experiment="default-rule", run_name="r", job="pretrain", config=job_config)
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
