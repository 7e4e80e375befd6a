"""data.decode_resources: the read+decode tasks request the custom resources of data nodes, still fused."""

import time

import pytest
import ray

from pipeline.config import ConfigError, DataConfig, load_job_config
from pipeline.data.datasets import build_image_dataset
from pipeline.data.shard_set import read_shard_set


def decode_tasks_requesting(resource: str, expected: int, timeout_s: float = 30.0) -> list:
    """Finished tasks of the local Ray that requested `resource`; task events reach the state API in batches."""
    from ray.util.state import list_tasks

    deadline = time.monotonic() + timeout_s
    while True:
        tasks = [task for task in list_tasks(address=ray.get_runtime_context().gcs_address, detail=True, limit=10_000,
                                             raise_on_missing_output=False)
                 if resource in (task.required_resources or {}) and task.state == "FINISHED"]
        if len(tasks) >= expected or time.monotonic() > deadline:
            return tasks
        time.sleep(0.5)


def test_decode_tasks_request_the_data_resource_and_stay_fused_with_the_read(ray_local, tars):
    # every Ray node carries the custom resource node:<ip>, so this one is satisfiable on the single local node
    resource = f"node:{ray.util.get_node_ip_address()}"
    shards = [tars.write(f"p/train-{i:06d}.tar", [tars.good_record(f"{i}{j}", label=i, seed=j) for j in range(3)])
              for i in range(3)]
    cfg = DataConfig(img_size=16, decode_batch_size=4, decode_num_cpus=0.25, decode_resources={resource: 0.003})
    rows = build_image_dataset(read_shard_set(shards), cfg, train=False, num_classes=3).take_all()
    assert sorted(int(row["label"]) for row in rows) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(row["image"].shape == (3, 16, 16) for row in rows)

    tasks = decode_tasks_requesting(resource, expected=3)
    assert len(tasks) == 3, [(t.name, t.required_resources) for t in tasks]  # one fused task per shard
    for task in tasks:
        assert "->" in task.name and "decode_batch" in task.name, task.name  # read and decode in one task
        # Ray Data adds "memory" (the average output block size) to the tasks launched after the first one finishes
        requested = {name: amount for name, amount in task.required_resources.items() if name != "memory"}
        assert requested == {"CPU": 0.25, resource: pytest.approx(0.003)}


def test_decode_resources_are_validated_and_parsed_from_overrides():
    job = load_job_config(None, ["data.decode_resources={data_node: 1}"])
    assert job.data.decode_resources == {"data_node": 1}
    assert DataConfig().decode_resources == {}
    with pytest.raises(ConfigError, match="data.decode_resources names custom resources .*decode_num_cpus"):
        load_job_config(None, ["data.decode_resources={CPU: 2}"])
    with pytest.raises(ValueError, match="data.decode_resources amounts must be numbers > 0"):
        DataConfig(decode_resources={"data_node": 0}).validate()
    with pytest.raises(ConfigError, match="data.decode_resources: .* is not a dict"):
        load_job_config(None, ["data.decode_resources=data_node"])
