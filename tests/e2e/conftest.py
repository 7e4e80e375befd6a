"""Shared pieces of the end-to-end tests: a tiny pretrain config on the session's digits shards
(tests/conftest.py) for the real local Ray (the session fixture `ray_local`), real DeepSpeed and a real MLflow
sqlite store. Helpers reach the test modules as fixtures (the suite runs with --import-mode=importlib)."""

import importlib.util
from pathlib import Path

import pytest

from pipeline.config import load_job_config

JOBS = Path(__file__).parents[2] / "jobs"
CONFIGS = JOBS / "configs"


@pytest.fixture
def tiny_job():
    return build_tiny_job


@pytest.fixture
def metric_history():
    return read_metric_history


@pytest.fixture
def job_main():
    return load_job_main


def load_job_main(name: str):
    """`main(argv)` of jobs/<name>.py, run in this process as `python jobs/<name>.py` would run it."""
    spec = importlib.util.spec_from_file_location(f"jobs_{name}", JOBS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def build_tiny_job(folder: Path, workdir: Path, *overrides: str, config: str = "digits_pretrain.yaml"):
    """A demo config on the session's digits shards, with its store and checkpoints under `workdir`."""
    return load_job_config(CONFIGS / config, [
        f"data.train={folder}/train-*.tar", f"data.val={folder}/val-*.tar",
        f"train.storage_path={workdir}/runs", f"tracking.uri=sqlite:///{workdir}/mlflow.db",
        "train.global_batch_size=32", "optim.warmup_steps=2", "train.log_every_n_steps=1",
        "data.local_shuffle_buffer=0", *overrides,
    ])


def read_metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))
