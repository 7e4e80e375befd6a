"""A real `mlflow server` on a free local port, shared by the tracking tests, stoppable and restartable by PID;
sqlite stores; a nested job config."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.benchmarks import free_port

SERVER_START_TIMEOUT_S = 120.0  # a cold start imports all of MLflow; ~12 s on a busy 2-core machine


class MlflowServer:
    """One `mlflow server` process group that we started; stopped by its PID, restarted on the same port and DB."""

    def __init__(self, root: Path, port: int):
        self.root = root
        self.port = port
        self.db_path = root / "server.db"
        self.artifacts_dir = root / "server-artifacts"
        self.uri = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        env = dict(os.environ)
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no background job runners: 7 fewer processes
        command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.db_path}",
            "--artifacts-destination",
            str(self.artifacts_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        log_file = open(self.root / f"server-{self.starts}.log", "wb")  # noqa: SIM115 - kept open by the child
        # its own process group, so that stopping it by our PID also stops the uvicorn child it spawns
        self.process = subprocess.Popen(
            command, cwd=self.root, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        log_file.close()
        self.starts += 1
        self.wait_healthy()

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}; see {self.root}")
            if self.healthy():
                return
            time.sleep(0.25)
        raise RuntimeError(f"mlflow server on port {self.port} not healthy after {SERVER_START_TIMEOUT_S} s")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal the process group led by the PID we started, and wait until it and the port are gone."""
        if self.process is None:
            return
        pid = self.process.pid
        try:
            os.killpg(pid, sig)
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(pid, signal.SIGKILL)
            self.process.wait(timeout=15)
        except ProcessLookupError:
            pass
        try:  # the uvicorn child may outlive the leader for a moment
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process = None
        deadline = time.monotonic() + 15
        while self.healthy() and time.monotonic() < deadline:
            time.sleep(0.1)

    def ensure_running(self) -> None:
        if self.process is None or self.process.poll() is not None or not self.healthy():
            self.stop()
            self.start()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> MlflowServer:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def server(mlflow_server) -> MlflowServer:
    """The shared server, running (a test that stopped it earlier may have left it down)."""
    mlflow_server.ensure_running()
    return mlflow_server


@pytest.fixture
def dead_uri() -> str:
    """An http URI where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="session")
def template_db(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store, made once: creating one runs MLflow's migrations (~5 s)."""
    from mlflow.tracking import MlflowClient

    db_path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db_path}").search_experiments()
    return db_path


@pytest.fixture
def sqlite_uri(tmp_path, template_db) -> str:
    """A fresh sqlite store of this test's own, at an absolute path."""
    store = tmp_path / "store"
    store.mkdir()
    shutil.copyfile(template_db, store / "mlflow.db")
    return f"sqlite:///{store / 'mlflow.db'}"


@pytest.fixture(params=["sqlite", "server"])
def any_store(request) -> str:
    """Each test using this runs twice: against a sqlite file and against the real server."""
    if request.param == "server":
        return request.getfixturevalue("server").uri
    return request.getfixturevalue("sqlite_uri")


@pytest.fixture
def job_config() -> dict:
    """A nested job config like the pipeline's (14 params once flattened), built afresh for each test."""
    return {
        "model": {"preset": "tiny", "img_size": 32, "patch_size": 4, "drop_path": 0.0},
        "optim": {"lr": 3e-4, "betas": (0.9, 0.999), "layer_decay": None},
        "data": {"train": "data/digits/train-{000000..000003}.tar", "mean": [0.5, 0.5, 0.5]},
        "train": {"steps": 600, "zero_stage": 2, "bf16": False},
    }
