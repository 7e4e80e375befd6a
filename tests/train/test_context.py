"""Which failures end a job at once (JobFailed) and which Ray Train may cure by restarting the worker group."""

import pytest

from pipeline.config import ConfigError
from pipeline.data.bad_samples import TooManyBadSamples
from pipeline.train.context import JobFailed
from pipeline.train.launch import EndOnJobFailed, failure_message
from pipeline.train.ray_context import fatal_error


def read_missing_shard(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_fatal_errors_are_found_inside_ray_task_errors_and_chains(ray_local, tmp_path):
    ray = ray_local
    with pytest.raises(FileNotFoundError) as raised:  # Ray's wrapper is an instance of its cause's class
        ray.get(ray.remote(read_missing_shard).remote(str(tmp_path / "train-000003.tar")))
    wrapped = raised.value
    assert "ray::read_missing_shard()" in str(wrapped) and "File " in str(wrapped)  # its text is a traceback ...
    assert fatal_error(wrapped) == f"[Errno 2] No such file or directory: '{tmp_path}/train-000003.tar'"  # ... ours not

    try:
        try:
            raise TooManyBadSamples("too many bad samples: 3 of 21 samples were bad (14.29%)")
        except TooManyBadSamples as err:
            raise RuntimeError("the stream failed") from err
    except RuntimeError as err:
        assert fatal_error(err) == "too many bad samples: 3 of 21 samples were bad (14.29%)"
    assert fatal_error(ConfigError("train.device=cuda but this worker sees no GPU")) == (
        "train.device=cuda but this worker sees no GPU")
    # what a restart may cure: a lost peer, a transient error
    assert fatal_error(RuntimeError("Connection closed by peer [127.0.0.1]:29500")) is None
    assert fatal_error(OSError("AWS Error SLOW_DOWN during GetObject operation")) is None


def test_only_job_failed_ends_a_run_from_the_controller():
    callback = EndOnJobFailed()
    callback.after_exception(None, {1: RuntimeError("lost rank 0")})  # Ray Train's failure policy decides
    with pytest.raises(JobFailed, match="too many bad samples"):
        callback.after_exception(None, {1: RuntimeError("lost rank 0"), 0: JobFailed("too many bad samples: 9")})


def test_a_failed_fit_is_told_in_one_line():
    from ray.train import ControllerError, WorkerGroupError

    assert failure_message(ControllerError(JobFailed("too many bad samples: 9 of 10")), 1) == (
        "too many bad samples: 9 of 10")
    exhausted = WorkerGroupError("rank 1 died", {1: RuntimeError("Connection closed by peer\nmore")})
    assert failure_message(exhausted, 2) == (
        "training failed after 2 restart(s) of the worker group (train.max_failures); rank 1: RuntimeError: "
        "Connection closed by peer (the workers' tracebacks are above)")
