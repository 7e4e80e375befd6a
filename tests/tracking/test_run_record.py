"""What a run records: flattened params (nesting, lists, dataclasses, MLflow's length limit), the git commit."""

from __future__ import annotations

from dataclasses import dataclass, field

from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from pipeline.tracking import run_record
from pipeline.tracking.run_record import flatten_params

# ---- params -----------------------------------------------------------------------------------------


def test_flatten_params_nests_lists_and_truncates(job_config):
    flat = flatten_params({**job_config, "notes": "x" * (MAX_PARAM_VAL_LENGTH + 500), "empty": {}})
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


# ---- lineage tags -----------------------------------------------------------------------------------


def test_git_commit_outside_a_checkout_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(run_record.GIT_COMMIT_ENV, raising=False)
    assert run_record.git_commit(tmp_path) == "unknown"
    monkeypatch.setenv(run_record.GIT_COMMIT_ENV, "0123456789abcdef0123456789abcdef01234567")
    assert run_record.git_commit(tmp_path) == "0123456789abcdef0123456789abcdef01234567"
