"""Run by tests/train/test_mae_loop.py, one process per rank of a gloo group: MAE's evaluation of one set of
weights over the val split, each rank reading its share of the samples (every `world`-th, by position, as a
split of the whole dataset gives them: shard ids stay the whole set's). Prints one RESULTS line of JSON.

    python tests/train/mae_eval_program.py '{"rank": 0, "world": 2, "port": 29500, "config": …, "overrides": […]}'
"""

import hashlib
import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

from pipeline.config import load_job_config
from pipeline.data.local_stream import LocalImageStream
from pipeline.train.inputs import InputPipeline
from pipeline.train.objectives import build_objective
from pipeline.train.resolved_job import resolve_job

spec = json.loads(sys.argv[1])
rank, world = spec["rank"], spec["world"]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spec["port"]), RANK=str(rank), WORLD_SIZE=str(world))
torch.set_num_threads(1)
dist.init_process_group("gloo", rank=rank, world_size=world)

run, _ = resolve_job(load_job_config(spec["config"], spec["overrides"]), "pretrain")
objective = build_objective(run.job, run.model_args)
torch.manual_seed(0)
module = objective.build_module()  # the same weights in every process
streams = {}
for name, (shards, num_classes) in objective.eval_splits(run).items():
    others = {uri: np.arange(count) % world != rank for uri, count in shards.count_of().items()}
    streams[name] = LocalImageStream(shards, run.job.data, train=False, num_classes=num_classes, skip=others)
inputs = InputPipeline(run.job.model.input_mean, run.job.model.input_std, torch.device("cpu"), torch.float32,
                       num_classes=0)
evaluation = objective.evaluate_collective(module, streams, inputs, batch_size=3, world_size=world)
picture = evaluation.images.get("val/reconstruction")
print("RESULTS " + json.dumps({
    "splits": sorted(streams), "metrics": evaluation.metrics,
    "picture": None if picture is None else [list(picture.shape), hashlib.sha256(picture.tobytes()).hexdigest()]}))
