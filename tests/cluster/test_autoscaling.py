"""Autoscaling on one machine with Ray's fake multi-node provider (cluster/local-autoscaling.yaml): a head with no
CPUs, trainer nodes for the Train workers and a data node for decoding (data.decode_resources). A tiny pretrain
makes the autoscaler add nodes; they go away once idle."""

import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

AUTOSCALING_YAML = Path(__file__).resolve().parents[2] / "cluster" / "local-autoscaling.yaml"


@pytest.fixture(scope="module")
def autoscaling_head(tmp_path_factory, local_cluster):
    cluster = local_cluster(tmp_path_factory.mktemp("autoscaling"), auth="token", autoscaling_config=AUTOSCALING_YAML)
    try:
        cluster.local_sh("start-ray")
        yield cluster
    finally:
        cluster.stop()


def worker_nodes(nodes: list[dict], state: str = "ALIVE") -> list[dict]:
    return [n for n in nodes if not n["is_head_node"] and n["state"] == state]


def stats_actor_nodes(head) -> set[str]:
    """Nodes hosting Ray Data's detached stats actor, which lives as long as the cluster: the job's driver creates
    it on its own node (the head), so that it keeps no worker node up."""
    actors = head.api("/api/v0/actors?limit=1000&detail=1")["data"]["result"]["result"]
    return {a["node_id"] for a in actors if a["state"] == "ALIVE" and a.get("name") == "datasets_stats_actor"}


def test_pretrain_scales_the_cluster_up_decodes_on_data_nodes_and_scales_down(autoscaling_head, digits_shards,
                                                                              tmp_path, tiny_overrides, poll):
    head = autoscaling_head
    assert worker_nodes(head.nodes()) == []  # min_workers 0: only the CPU-less head to start with
    seen: dict[str, dict] = {}  # node id -> node, every worker node alive at some point during the job
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            try:
                seen.update({n["node_id"]: n for n in worker_nodes(head.nodes())})
            except OSError:
                pass
            stop.wait(1.0)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    # submitted from local://<checkout>, not an uploaded working dir: see LocalCluster in conftest.py;
    # test_submit.py covers `--working-dir .`
    job = head.submit("python", "jobs/pretrain.py", "--config", "jobs/configs/digits_pretrain.yaml",
                      *tiny_overrides(digits_shards, tmp_path, "train.steps=6", "train.num_workers=2",
                                      "train.cpus_per_worker=1", "train.worker_resources={trainer_node: 1}",
                                      "data.decode_resources={data_node: 1}",
                                      f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"))
    try:
        rc = job.finish(timeout_s=480)
    finally:
        job.kill()
        stop.set()
        watcher.join()
    assert rc == 0, job.tail()
    assert "step 6/6" in job.output()

    data_nodes = {i for i, n in seen.items() if n["resources_total"].get("data_node")}
    trainer_nodes = {i for i, n in seen.items() if not n["resources_total"].get("data_node")}
    assert len(trainer_nodes) >= 2, seen  # one per Train worker: the head holds no CPUs
    assert len(data_nodes) >= 1, seen

    tasks = head.api("/api/v0/tasks?limit=10000&detail=1")["data"]["result"]["result"]
    # one task per shard: the 2 val shards and as many of the 8 train shards as 6 steps needed before the
    # job ended (the rest were still queued or running, and were cancelled with the job)
    decode = [t for t in tasks if "decode_batch" in t["name"] and t.get("node_id")]
    finished = [t for t in decode if t["state"] == "FINISHED"]
    assert len(finished) >= 3, [(t["name"], t["state"]) for t in tasks]
    assert {t["node_id"] for t in decode} <= data_nodes, "a decode task ran outside the data nodes"
    assert all(t["required_resources"].get("data_node") == 1 for t in decode)

    head_node = next(n["node_id"] for n in head.nodes() if n["is_head_node"])
    assert stats_actor_nodes(head) == {head_node}
    started = time.monotonic()
    gone = poll(lambda: not worker_nodes(head.nodes()), timeout_s=120)
    assert gone, f"nodes still up: {[n['node_id'] for n in worker_nodes(head.nodes())]}"
    print(f"\nworker nodes seen: {len(trainer_nodes)} trainer, {len(data_nodes)} data; all removed "
          f"{time.monotonic() - started:.0f} s after the job ended (idle_timeout_minutes 0.25)")
    assert {n["node_id"] for n in worker_nodes(head.nodes(), "DEAD")} >= set(seen)
