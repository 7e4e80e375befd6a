"""Training that outlives its nodes, on Ray's fake multi-node provider (cluster/local-autoscaling.yaml): one job with
`train.num_workers=[1, 2]` on two trainer nodes lives through a trainer node lost without notice (its raylet
killed by PID), a scale-up when the autoscaler brings a node back, and a drain with a deadline (a spot reclaim).

One job for the three events: each restart of the worker group costs half a minute or more on two cores, and the
job checks them all against one history. What a user sees is checked: the console, the MLflow runs, and every
sample each step trained on (VIT_PIPELINE_SAMPLE_LOG).

A cloud's node provider sees an instance die; the fake provider does not, and would keep the dead node as a
node still starting, so that the autoscaler never replaces it. `forget_dead_node` does what the cloud would:
it has the autoscaler terminate it, by lowering the trainers' max_workers in the cluster's autoscaling config
for a moment (the autoscaler re-reads it on every update, and terminates the least recently used node)."""

import collections
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.e2e

AUTOSCALING_YAML = Path(__file__).resolve().parents[2] / "cluster" / "local-autoscaling.yaml"
BIN = Path(sys.executable).parent
STEPS, CHECKPOINT_EVERY, GLOBAL_BATCH = 150, 5, 16
DRAIN_DEADLINE_S = 15


def wait_line(job, pattern: str, *, after: float, timeout_s: float) -> tuple[float, re.Match]:
    """The first output line matching `pattern` that arrived `after` seconds from submit or later."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout_s
    while True:
        for at, line in list(job.lines):
            found = regex.search(line)
            if found and at - job.started >= after:
                return at - job.started, found
        if job.process.poll() is not None:
            pytest.fail(f"job ended (rc {job.process.returncode}) before /{pattern}/:\n{job.tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no /{pattern}/ within {timeout_s:.0f} s:\n{job.tail()}")
        time.sleep(0.5)


def trainer_nodes(head) -> list[str]:
    return sorted(n["node_id"] for n in head.nodes() if n["state"] == "ALIVE" and
                  n["resources_total"].get("trainer_node"))


def raylet_pid(head, node_id: str) -> int:
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if cmdline and cmdline[0].endswith("/raylet") and f"--node_id={node_id}" in cmdline and \
                any(head.temp_dir in part for part in cmdline):
            return process.pid
    raise AssertionError(f"no raylet of node {node_id}")


def forget_dead_node(head, node_id: str) -> None:
    config = head.state / "autoscaling.yaml"
    text = config.read_text()
    trainer_max = "  trainer:" + text.split("  trainer:", 1)[1].split("max_workers: 2", 1)[0] + "max_workers: 2"
    assert trainer_max in text
    config.write_text(text.replace(trainer_max, trainer_max[:-1] + "1"))
    monitor = Path(head.temp_dir) / "session_latest" / "logs" / "monitor.log"
    deadline = time.monotonic() + 120
    try:
        while f"Terminating the node with id {node_id}" not in monitor.read_text(errors="replace"):
            assert time.monotonic() < deadline, f"the autoscaler did not terminate {node_id}"
            time.sleep(1)
    finally:
        config.write_text(text)


@pytest.fixture(scope="module")
def elastic_job(tmp_path_factory, local_cluster, digits_shards, tiny_overrides):
    workdir = tmp_path_factory.mktemp("elastic")
    head = local_cluster(workdir / "cluster", auth="token", autoscaling_config=AUTOSCALING_YAML)
    events = {}
    try:
        head.local_sh("start-ray")
        env = {"VIT_PIPELINE_SAMPLE_LOG": str(workdir / "samples"), "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1"}
        job = head.submit("python", "jobs/pretrain.py", "--config", "jobs/configs/digits_pretrain.yaml",
                          *tiny_overrides(digits_shards, workdir, f"train.steps={STEPS}", "train.num_workers=[1, 2]",
                                          f"train.checkpoint_every_n_steps={CHECKPOINT_EVERY}",
                                          "data.local_shuffle_buffer=32", "train.cpus_per_worker=1",
                                          "train.worker_resources={trainer_node: 1}", "train.resize_check_s=5",
                                          "data.decode_resources={data_node: 1}", "train.max_failures=3",
                                          f"tracking.uri=sqlite:///{workdir}/mlflow.db"),
                          extra=("--runtime-env-json", json.dumps({"env_vars": env})))
        try:
            # 1. a trainer node lost without notice, after a checkpoint
            _, before = wait_line(job, r"checkpoint step (\d+):", after=0, timeout_s=300)
            lost = trainer_nodes(head)[-1]
            os.kill(raylet_pid(head, lost), signal.SIGKILL)
            killed_at = time.monotonic() - job.started
            events["lost"] = {"after_checkpoint": int(before[1]), "killed_s": killed_at}
            shrunk_at, _ = wait_line(job, r"world size 1 \(was 2\)", after=killed_at, timeout_s=300)
            # 2. once the smaller group has checkpointed, the autoscaler brings a trainer node back: the group grows
            wait_line(job, r"checkpoint step (\d+):", after=shrunk_at, timeout_s=120)
            forget_dead_node(head, lost)
            grown_at, _ = wait_line(job, r"world size 2 \(was 1\)", after=shrunk_at, timeout_s=300)
            # 3. a drain with a deadline, as a spot reclaim gives, after a checkpoint at the new size
            wait_line(job, r"checkpoint step (\d+):", after=grown_at, timeout_s=120)
            drained_at, notice_ms = time.monotonic() - job.started, time.time_ns() // 1_000_000
            subprocess.run([str(BIN / "ray"), "drain-node", "--address", f"127.0.0.1:{head.gcs_port}",
                            "--node-id", trainer_nodes(head)[-1], "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                            "--reason-message", "spot reclaim", "--deadline-remaining-seconds", str(DRAIN_DEADLINE_S)],
                           env=head.client_env(), check=True, capture_output=True, timeout=60)
            _, notice = wait_line(job, r"being drained \(deadline in \d+ s\): checkpoint at step (\d+) now",
                                  after=drained_at, timeout_s=60)
            saved_at, _ = wait_line(job, rf"checkpoint step {notice[1]}:", after=drained_at, timeout_s=60)
            wait_line(job, r"world size 1 \(was 2\)", after=saved_at, timeout_s=300)
            events["drain"] = {"step": int(notice[1]), "notice_ms": notice_ms, "saved_s": saved_at - drained_at}
            rc = job.finish(timeout_s=600)
        finally:
            job.kill()
        yield {"rc": rc, "job": job, "events": events, "workdir": workdir}
    finally:
        head.stop()


def attempts_of(uri: str, run_id: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_run(run_id).info.experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'")
    return sorted(runs, key=lambda run: int(run.data.tags["pipeline.attempt"]))


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def sample_logs(workdir: Path) -> dict[int, list[dict]]:
    """VIT_PIPELINE_SAMPLE_LOG's lines, all ranks, per attempt (rank 0's start time: later attempts sort later).
    A step's line is written before it is trained, so a lost attempt's last line may be a step it did not end."""
    logs = collections.defaultdict(list)
    for path in sorted((workdir / "samples").glob("attempt-*.jsonl")):
        logs[int(path.name.split("-")[1])] += [json.loads(line) for line in path.read_text().splitlines()]
    return dict(sorted(logs.items()))


def test_the_run_finishes_through_a_drain_a_scale_up_and_a_lost_node(elastic_job):
    from mlflow import MlflowClient

    from pipeline.tracking.models import checkpoint_models
    from pipeline.tracking.runs import JOB_RUNS

    job, events = elastic_job["job"], elastic_job["events"]
    assert elastic_job["rc"] == 0, job.tail()
    assert f"after {STEPS} steps" in job.output()
    uri = f"sqlite:///{elastic_job['workdir']}/mlflow.db"
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("vit-pipeline").experiment_id], filter_string=JOB_RUNS)

    # one value per step in the job's run, though steps were trained again after the lost node
    for key in ("train/loss", "train/world_size"):
        steps = [step for step, _ in metric_history(uri, run.info.run_id, key)]
        assert steps == list(range(1, STEPS + 1)), key
    sizes = [int(value) for _, value in metric_history(uri, run.info.run_id, "train/world_size")]
    assert [size for size, _ in itertools.groupby(sizes)] == [2, 1, 2, 1]  # the world size over the steps

    # each attempt: its own run under the job's run, with its world size and first step
    attempts = attempts_of(uri, run.info.run_id)
    shape = [(a.data.tags["pipeline.world_size"], a.info.status) for a in attempts]
    # the lost attempt ends FAILED when its rank 0 saw the error of the lost rank, KILLED when Ray Train stopped
    # it first; the resized and the drained ones are stopped by Ray Train
    assert shape[0] in (("2", "FAILED"), ("2", "KILLED")), shape
    assert shape[1:] == [("1", "KILLED"), ("2", "KILLED"), ("1", "FINISHED")], shape
    starts = [int(a.data.tags["pipeline.start_step"]) for a in attempts]
    # the last step each attempt began, from the sample log: an attempt's run may lack the steps it trained in
    # the last seconds before its node went (its metrics reach the job's run from the checkpoint)
    began = [max(line["step"] for line in lines) for lines in sample_logs(elastic_job["workdir"]).values()]
    assert [min(line["step"] for line in lines) for lines in sample_logs(elastic_job["workdir"]).values()] == \
        [start + 1 for start in starts]
    # the lost node: at most the steps since the last checkpoint are trained again
    assert 0 <= began[0] - starts[1] <= CHECKPOINT_EVERY and starts[1] >= events["lost"]["after_checkpoint"]
    # drain: the checkpoint at the notice, and no step past it, so that nothing is trained twice; the drained
    # attempt's run received all it trained, as it sent its metrics while it waited for the deadline
    drain = events["drain"]
    assert (began[2], starts[3]) == (drain["step"], drain["step"])
    assert max(m.step for m in client.get_metric_history(attempts[2].info.run_id, "train/loss")) == drain["step"]
    # a logged model per committed checkpoint, each once: a lost attempt's checkpoint in flight has none, and the
    # checkpoint a restart resumes from has one, whichever attempt made it
    models = checkpoint_models(client, run.info.run_id)
    assert [int(m.tags["pipeline.step"]) for m in models] == sorted({*range(CHECKPOINT_EVERY, STEPS + 1,
                                                                            CHECKPOINT_EVERY), drain["step"]})
    # Ray's step lines are merged across the fake nodes' log monitors ("[repeated 60x across cluster]"): the
    # attempt's first step is read from its run instead
    again_ms = min(m.timestamp for m in client.get_metric_history(attempts[3].info.run_id, "train/loss"))
    print(f"\ndrain notice -> checkpoint saved {drain['saved_s']:.1f} s, -> training again at world size 1 "
          f"{(again_ms - drain['notice_ms']) / 1000:.1f} s (deadline {DRAIN_DEADLINE_S} s); steps redone after the "
          f"drain: {began[2] - starts[3]}, after the lost node: {began[0] - starts[1]} (checkpoint every "
          f"{CHECKPOINT_EVERY}); attempts {shape}")
    assert again_ms - drain["notice_ms"] < 180_000


def test_every_sample_of_an_epoch_is_trained_on_once_across_the_restarts(elastic_job, digits_shards):
    from pipeline.data.shard_set import read_shard_set

    assert elastic_job["rc"] == 0
    logs = sample_logs(elastic_job["workdir"])
    assert len(logs) == 4
    went_on = {}  # step -> (epoch, samples of all ranks) of the last attempt that trained it
    for attempt in sorted(logs):
        by_step = collections.defaultdict(list)
        for line in logs[attempt]:
            by_step[line["step"], line["epoch"]] += [tuple(sample) for sample in line["samples"]]
        went_on.update({step: (epoch, samples) for (step, epoch), samples in by_step.items()})
    assert sorted(went_on) == list(range(1, STEPS + 1))
    assert all(len(samples) == GLOBAL_BATCH for _, samples in went_on.values())
    shards = read_shard_set(str(digits_shards / "train-*.tar"))
    per_epoch = collections.defaultdict(list)
    for epoch, samples in went_on.values():
        per_epoch[epoch] += samples
    for epoch, samples in per_epoch.items():
        counts = collections.Counter(samples)
        assert max(counts.values()) == 1, f"epoch {epoch}: {[s for s, n in counts.items() if n > 1][:5]} twice"
    everything = {(uri, i) for uri, count in zip(shards.uris, shards.counts, strict=True) for i in range(count)}
    # epoch 0 was whole: every sample but the remainder of less than one global batch
    assert set(per_epoch[0]) <= everything and len(everything) - len(per_epoch[0]) < GLOBAL_BATCH
