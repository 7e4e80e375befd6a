"""One test per reach into a private part of Ray, DeepSpeed or MLflow (pipeline/internals.py). Each fails on the
installed versions when the internal is gone or no longer does what the reach relies on, so an upgrade shows
here instead of as a slower or less safe run."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import ray

import pipeline.data.datasets  # noqa: F401  (importing it sets how often an execution polls its resource limits)
from pipeline.internals import LIMITS_REFRESH_S, bounded_mlflow_http, pin_data_stats_to_this_node, skip_forwarded_lines


def stamp_start(batch: dict) -> dict:
    start = time.time()
    time.sleep(1.5)
    return {"start": np.array([start])}


def test_each_execution_starts_its_tasks_together_not_one_in_its_first_second(ray_local):
    # Two tasks, one CPU each, on a Ray of four: both can run at once from the start. Ray Data 2.60 alone runs
    # one task for an execution's first second, until its first poll of the resource limits is answered.
    dataset = ray.data.range(2, override_num_blocks=2).map_batches(stamp_start, batch_size=None, num_cpus=1)
    deadline = time.monotonic() + 60  # earlier tests' actors and placement groups may still be letting go of CPUs
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    for _ in range(2):  # the first execution also starts the workers; the second is a warm epoch
        starts = sorted(float(row["start"]) for row in dataset.take_all())
    assert starts[1] - starts[0] < 0.5, f"the second task started {starts[1] - starts[0]:.2f} s after the first"
    from ray.data._internal.execution.resource_manager import ResourceManager

    assert ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S == LIMITS_REFRESH_S


def test_the_data_stats_actor_is_made_by_the_driver_on_its_node(ray_local):
    from ray.util.state import list_actors

    pin_data_stats_to_this_node()
    address = ray_local.get_runtime_context().gcs_address  # this session's Ray, not another on the host
    [actor] = list_actors(address=address, filters=[("class_name", "=", "_StatsActor"), ("state", "=", "ALIVE")])
    assert actor.node_id == ray_local.get_runtime_context().get_node_id()


def probe_preemption_notice(config: dict) -> None:
    """In a Ray Train worker: the notice before and after the worker is marked, as Ray's watcher marks it."""
    import ray.train
    from ray.train import PreemptionInfo

    from pipeline.internals import preemption_notice

    before = (preemption_notice(), ray.train.get_preemption_info())
    info = PreemptionInfo(deadline_ms=1_700_000_000_000, preempted_node_to_ranks={"node": [0]})
    ray.get(ray.get_runtime_context().current_actor.mark_preempt.remote(info))
    after = (preemption_notice(), ray.train.get_preemption_info())
    with open(config["out"], "w") as f:
        json.dump({"before": [x is None for x in before], "after": [x == info for x in after]}, f)


def test_the_preemption_notice_is_read_without_a_collective(ray_local, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = tmp_path / "notice.json"
    TorchTrainer(probe_preemption_notice, train_loop_config={"out": str(out)},
                 scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
                 run_config=RunConfig(name="notice", storage_path=str(tmp_path / "runs"))).fit()
    # the field the loop reads is the one Ray's own get_preemption_info() broadcasts, before and after a notice
    assert json.loads(out.read_text()) == {"before": [True, True], "after": [True, True]}


# A fresh interpreter: the engine needs a process group, which would outlive this test in the test process.
WEIGHTS_ONLY = r"""
import json, pickle, sys, torch
from pipeline.config import load_job_config
from pipeline.train.context import LocalContext
from pipeline.train.engine import build_engine
from pipeline.train.objectives import build_objective
from pipeline.train.checkpoint import DEEPSPEED_TAG, LoopState, save_checkpoint_collective

class Payload:  # what an attacker's pickle would run on load
    def __reduce__(self):
        return (print, ("unpickled",))

LocalContext(sys.argv[1])
job = load_job_config(None, ["train.num_workers=1", "train.global_batch_size=2", "data.img_size=16"])
args = {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2, "num_classes": 3}
engine, _ = build_engine(job, build_objective(job, args), 1, torch.device("cpu"))
from pipeline.internals import universal_checkpoint_loading
with universal_checkpoint_loading(engine):
    universal = [engine.load_universal_checkpoint()]
universal.append(engine.load_universal_checkpoint())
save_checkpoint_collective(engine, sys.argv[1], rank=0, state=LoopState(step=1), model_config={})
engine.load_checkpoint(sys.argv[1], tag=DEEPSPEED_TAG)  # our own checkpoint loads
states = f"{sys.argv[1]}/{DEEPSPEED_TAG}/mp_rank_00_model_states.pt"
torch.save({"module": Payload()}, states)
try:
    engine.load_checkpoint(sys.argv[1], tag=DEEPSPEED_TAG)
except pickle.UnpicklingError as err:
    print(json.dumps({"refused": True, "type": type(engine.checkpoint_engine).__name__, "universal": universal}))
else:
    print(json.dumps({"refused": False}))
"""


def test_deepspeed_checkpoints_are_unpickled_weights_only_and_a_universal_load_is_for_one_load(tmp_path):
    result = subprocess.run([sys.executable, "-c", WEIGHTS_ONLY, str(tmp_path)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert "unpickled" not in lines
    assert json.loads(lines[-1]) == {"refused": True, "type": "WeightsOnlyCheckpointEngine",
                                     "universal": [True, False]}  # a universal load for one load only


def test_bounded_http_settings_apply_inside_and_are_restored(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT

    with bounded_mlflow_http(3):
        with bounded_mlflow_http(3):
            assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 3 and MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 0
        assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 3  # still inside the outer block
    assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 120 and MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 7


def test_bounded_mlflow_requests_give_up_within_their_timeout():
    import socket

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel completes handshakes; nobody ever reads or answers
        client = MlflowClient(f"http://127.0.0.1:{silent.getsockname()[1]}")
        started = time.monotonic()
        with bounded_mlflow_http(1), pytest.raises(MlflowException, match="timed out|Max retries|Read timed"):
            client.get_experiment("0")
        assert time.monotonic() - started < 5  # unbounded, MLflow would wait 120 s per try, 8 tries


def test_forwarded_worker_lines_are_skipped_by_rays_own_filter(monkeypatch):
    # tests/test_console.py checks the whole quiet list through the same filter
    from ray._private.ray_logging import stdout_deduplicator

    monkeypatch.delenv("RAY_DEDUP_LOGS_SKIP_REGEX", raising=False)
    batch = {"ip": "192.0.2.2", "pid": 902_001, "task_name": None, "actor_name": "SplitCoordinator", "is_err": False,
             "lines": ["noise 1", "kept 1"]}
    try:
        assert skip_forwarded_lines("^noise")
        assert [line for out in stdout_deduplicator.deduplicate(batch) for line in out["lines"]] == ["kept 1"]
    finally:
        skip_forwarded_lines(None)
        stdout_deduplicator.flush()
