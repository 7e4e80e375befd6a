"""Dataset execution: every epoch starts all the tasks the cluster has room for at once."""

import time

import numpy as np
import ray

import pipeline.data.datasets  # noqa: F401  (importing it sets how often an execution polls its resource limits)


def stamp_start(batch: dict) -> dict:
    start = time.time()
    time.sleep(1.5)
    return {"start": np.array([start])}


def test_each_execution_starts_its_tasks_together_not_one_in_its_first_second(ray_local):
    # Two tasks, one CPU each, on a Ray of four: both can run at once from the start. Ray Data 2.60 alone runs
    # one task for an execution's first second, until its first poll of the resource limits is answered.
    dataset = ray.data.range(2, override_num_blocks=2).map_batches(stamp_start, batch_size=None, num_cpus=1)
    for _ in range(2):  # the first execution also starts the workers; the second is a warm epoch
        starts = sorted(float(row["start"]) for row in dataset.take_all())
    assert starts[1] - starts[0] < 0.5, f"the second task started {starts[1] - starts[0]:.2f} s after the first"
