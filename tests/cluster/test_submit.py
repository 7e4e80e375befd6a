"""`ray job submit` against a real autoscaling Ray head with token authentication, tracked on a real MLflow server
with a sqlite database.

The head comes from cluster/local.sh with cluster/local-autoscaling.yaml: Ray's fake multi-node provider, a head with
no CPUs, trainer nodes for the Train workers and a data node for decoding (data.decode_resources). One pretrain job
shows what a cluster job must: the autoscaler adds nodes for it, its decode tasks run on the data node, and it
survives the MLflow server being stopped and restarted mid-run. A fine-tune is then submitted from its run, and
once both are done the nodes go away again.
"""

import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.e2e

AUTOSCALING_YAML = Path(__file__).resolve().parents[2] / "cluster" / "local-autoscaling.yaml"
PRETRAIN_STEPS = 100  # long enough that training goes on after the MLflow server has restarted (about 15 s)
ON_CLUSTER = ("train.num_workers=2", "train.cpus_per_worker=1", "data.decode_resources={data_node: 1}")


def worker_nodes(nodes: list[dict], state: str = "ALIVE") -> list[dict]:
    return [n for n in nodes if not n["is_head_node"] and n["state"] == state]


class NodeWatcher:
    """Every worker node alive at some point, polled once a second from the head's state API."""

    def __init__(self, head):
        self.head = head
        self.seen: dict[str, dict] = {}  # node id -> node
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                self.seen.update({n["node_id"]: n for n in worker_nodes(self.head.nodes())})
            except OSError:
                pass
            self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def head(tmp_path_factory, local_cluster):
    cluster = local_cluster(tmp_path_factory.mktemp("head"), auth="token", autoscaling_config=AUTOSCALING_YAML)
    try:
        cluster.local_sh("start")
        assert worker_nodes(cluster.nodes()) == []  # min_workers 0: only the CPU-less head to start with
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def nodes_seen(head):
    """Node id -> node, for every worker node alive at some point while the module's jobs ran."""
    watcher = NodeWatcher(head)
    yield watcher.seen
    watcher.stop()


@pytest.fixture(scope="module")
def pretrain(head, nodes_seen, digits_shards, tmp_path_factory, tiny_overrides):
    """A pretrain job submitted to the head; once it is training, the MLflow server is stopped by PID and
    restarted on the same port and database."""
    workdir = tmp_path_factory.mktemp("pretrain")
    job = head.submit("python", "jobs/pretrain.py", "--config", "jobs/configs/digits_pretrain.yaml",
                      *tiny_overrides(digits_shards, workdir, f"train.steps={PRETRAIN_STEPS}", *ON_CLUSTER,
                                      f"tracking.uri={head.mlflow_uri}"))
    try:
        first_step_s = job.wait_for(rf"step 1/{PRETRAIN_STEPS} ", timeout_s=400)
        print(f"\nsubmit -> first training step (nodes added on demand): {first_step_s:.1f} s")
        job.wait_for(rf"step 3/{PRETRAIN_STEPS} ", timeout_s=60)
        down_ms = time.time_ns() // 1_000_000
        head.local_sh("stop-mlflow")
        job.wait_for(rf"step 6/{PRETRAIN_STEPS} ", timeout_s=60)
        head.local_sh("start-mlflow")
        up_ms = time.time_ns() // 1_000_000
        rc = job.finish(timeout_s=400)
    finally:
        job.kill()
    assert rc == 0, job.tail()
    assert "succeeded" in job.output()
    client = MlflowClient(head.mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("vit-pipeline").experiment_id],
                                filter_string="tags.`pipeline.job` = 'pretrain'")
    tasks = head.api("/api/v0/tasks?limit=10000&detail=1")["data"]["result"]["result"]
    return {"run": run, "job": job, "first_step_s": first_step_s, "down_ms": down_ms, "up_ms": up_ms,
            "workdir": workdir, "nodes": dict(nodes_seen), "tasks": tasks}


def test_pretrain_job_is_recorded_on_the_tracking_server(head, pretrain):
    client = MlflowClient(head.mlflow_uri)
    run = client.get_run(pretrain["run"].info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == str(PRETRAIN_STEPS)
    assert run.data.params["data.img_size"] == "32" and run.data.params["train.global_batch_size"] == "16"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, PRETRAIN_STEPS + 1))
    assert 0.0 <= run.data.metrics["val/top1"] <= 1.0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "plots", "weights"} <= artifacts, artifacts
    weights = {a.path for a in client.list_artifacts(run.info.run_id, "weights")}
    assert {"weights/model.safetensors", "weights/config.json"} <= weights
    local = client.download_artifacts(run.info.run_id, "weights/model.safetensors", str(pretrain["workdir"]))
    assert Path(local).stat().st_size > 100_000  # the demo ViT's fp32 weights came through the server
    assert Path(run.data.tags["pipeline.checkpoint"]).is_relative_to(pretrain["workdir"] / "runs")
    assert pretrain["first_step_s"] < 400


def test_metrics_survive_the_tracking_server_restarting_mid_run(head, pretrain):
    down_ms, up_ms = pretrain["down_ms"], pretrain["up_ms"]
    assert up_ms - down_ms > 5_000  # the server was really away for a while
    history = MlflowClient(head.mlflow_uri).get_metric_history(pretrain["run"].info.run_id, "train/loss")
    during = [m.step for m in history if down_ms < m.timestamp < up_ms]
    after = [m.step for m in history if m.timestamp > up_ms]
    assert during, "no step was logged while the server was down"  # kept in memory, sent once it was back
    assert after, "the run ended before the server came back, so nothing was logged after the restart"
    assert min(after) > max(during)
    assert "MLflow tracking at" in pretrain["job"].output()  # the outage was noticed and said, not hidden


def test_pretrain_scaled_the_cluster_up_and_decoded_on_the_data_node(head, pretrain):
    nodes = pretrain["nodes"]
    data_nodes = {i for i, n in nodes.items() if n["resources_total"].get("data_node")}
    trainer_nodes = {i for i, n in nodes.items() if not n["resources_total"].get("data_node")}
    assert len(trainer_nodes) >= 2, nodes  # one per Train worker: the head holds no CPUs
    assert len(data_nodes) >= 1, nodes

    # one task per shard: every val shard and the train shards that 100 steps needed; tasks still queued or
    # running when the job ended were cancelled with it
    decode = [t for t in pretrain["tasks"] if "decode_batch" in t["name"] and t.get("node_id")]
    finished = [t for t in decode if t["state"] == "FINISHED"]
    assert len(finished) >= 3, [(t["name"], t["state"]) for t in pretrain["tasks"]]
    assert {t["node_id"] for t in decode} <= data_nodes, "a decode task ran outside the data nodes"
    assert all(t["required_resources"].get("data_node") == 1 for t in decode)

    # Ray Data's detached stats actor lives as long as the cluster: the job's driver creates it on its own node
    # (the head), so that it keeps no worker node up
    actors = head.api("/api/v0/actors?limit=1000&detail=1")["data"]["result"]["result"]
    head_node = next(n["node_id"] for n in head.nodes() if n["is_head_node"])
    assert {a["node_id"] for a in actors if a["state"] == "ALIVE" and a.get("name") == "datasets_stats_actor"} == {
        head_node}


@pytest.fixture(scope="module")
def finetune(head, pretrain, digits_shards, tmp_path_factory, tiny_overrides):
    pretrain_id = pretrain["run"].info.run_id
    job = head.submit("python", "jobs/finetune.py", "--config", "jobs/configs/digits_finetune.yaml",
                      f"init_from=runs:/{pretrain_id}", "model.img_size=48", "finetune.ema_decay=0",
                      *tiny_overrides(digits_shards, tmp_path_factory.mktemp("finetune"), "train.steps=6",
                                      *ON_CLUSTER, f"tracking.uri={head.mlflow_uri}"))
    try:
        rc = job.finish(timeout_s=400)
    finally:
        job.kill()
    assert rc == 0, job.tail()
    return job


def test_finetune_submitted_from_the_pretrain_run_is_linked_to_it(head, pretrain, finetune):
    pretrain_id = pretrain["run"].info.run_id
    client = MlflowClient(head.mlflow_uri)
    (run,) = client.search_runs([pretrain["run"].info.experiment_id],
                                filter_string="tags.`pipeline.job` = 'finetune'")
    assert run.info.status == "FINISHED"
    assert run.data.tags["pipeline.parent_run_id"] == pretrain_id
    assert run.data.tags["pipeline.init_from"] == f"runs:/{pretrain_id}"
    assert run.data.params["pretrain_img_size"] == "32" and run.data.params["img_size"] == "48"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, 7))


def test_worker_nodes_go_away_once_idle(head, finetune, nodes_seen, poll):
    started = time.monotonic()
    gone = poll(lambda: not worker_nodes(head.nodes()), timeout_s=120)
    assert gone, f"nodes still up: {[n['node_id'] for n in worker_nodes(head.nodes())]}"
    print(f"\nworker nodes seen over both jobs: {len(nodes_seen)}; all removed {time.monotonic() - started:.0f} s "
          f"after the fine-tune ended (idle_timeout_minutes 0.1)")
    assert {n["node_id"] for n in worker_nodes(head.nodes(), "DEAD")} >= set(nodes_seen)


def http_status(url: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_submit_needs_the_head_token(head):
    # last, so that no other job starts or ends on the head while the training jobs start
    jobs_api = f"{head.address}/api/jobs/"
    assert (http_status(jobs_api, None), http_status(jobs_api, "0" * 64), http_status(jobs_api, head.token)) == (
        401, 403, 200)
    for token in (None, "0" * 64):  # no token, a wrong token
        refused = head.submit("echo", "refused", token=token, extra=("--no-wait",))
        assert refused.finish(timeout_s=120) != 0
        assert "ray.exceptions.AuthenticationError" in refused.output(), refused.tail()
    accepted = head.submit("echo", "accepted with the token")
    assert accepted.finish(timeout_s=180) == 0, accepted.tail()
    assert "accepted with the token" in accepted.output() and "succeeded" in accepted.output()
