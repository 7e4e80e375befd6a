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
    """Nodes hosting Ray Data's detached stats actor. Ray Data pins it, for the cluster's lifetime, on the node of
    the process that first runs a dataset: here the rank-0 Train worker's node, which therefore never goes idle."""
    actors = head.api("/api/v0/actors?limit=1000&detail=1")["data"]["result"]["result"]
    return {a["node_id"] for a in actors if a["state"] == "ALIVE" and a.get("name") == "datasets_stats_actor"}


def test_pretrain_scales_the_cluster_up_decodes_on_data_nodes_and_scales_down(autoscaling_head, cluster_digits,
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
    job = head.submit("python", "jobs/pretrain.py", "--config", "jobs/configs/digits_pretrain.yaml",
                      *tiny_overrides(cluster_digits, tmp_path, "train.steps=6", "train.num_workers=2",
                                      "train.cpus_per_worker=1", "data.decode_resources={data_node: 1}",
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
    decode = [t for t in tasks if "decode_batch" in t["name"] and t["state"] == "FINISHED"]
    assert len(decode) >= 10, [t["name"] for t in tasks]  # 8 train and 2 val shards, one task each
    assert {t["node_id"] for t in decode} <= data_nodes, "a decode task ran outside the data nodes"
    assert all(t["required_resources"].get("data_node") == 1 for t in decode)

    started = time.monotonic()
    pinned = stats_actor_nodes(head)
    assert len(pinned & trainer_nodes) <= 1
    gone = poll(lambda: {n["node_id"] for n in worker_nodes(head.nodes())} <= pinned, timeout_s=120)
    alive = {n["node_id"] for n in worker_nodes(head.nodes())}
    assert gone, f"nodes still up: {alive}; Ray Data's stats actor is on {pinned}"
    print(f"\nworker nodes seen: {len(trainer_nodes)} trainer, {len(data_nodes)} data; "
          f"{len(seen) - len(alive)} removed {time.monotonic() - started:.0f} s after the job ended "
          f"(idle_timeout_minutes 0.1), {len(alive)} kept by Ray Data's stats actor")
    assert data_nodes.isdisjoint(alive)  # every data node went away once idle
    assert len(trainer_nodes - alive) >= 1
    assert {n["node_id"] for n in worker_nodes(head.nodes(), "DEAD")} >= set(seen) - alive
