"""Run by tests/train/test_mae_loop.py in a fresh interpreter (the process group DeepSpeed joins outlives a test):
MAE through the loop and its components in one process, `LocalContext`, no Ray. Prints one RESULTS line of JSON.

    python tests/train/mae_loop_program.py '{"config": …, "common": […], "folder": …}'
"""

import json
import logging
import sys

import numpy as np
import torch

from pipeline.config import load_job_config
from pipeline.model import VisionTransformer
from pipeline.train.checkpoint import read_weights
from pipeline.train.checkpointer import Checkpointer
from pipeline.train.context import LocalContext
from pipeline.train.engine import build_engine
from pipeline.train.inputs import InputPipeline
from pipeline.train.loop import run_training
from pipeline.train.objectives import build_objective
from pipeline.train.objectives.mae import PICTURE_SCALE_PX
from pipeline.train.resolved_job import resolve_job
from pipeline.train.validator import Validator

args = json.loads(sys.argv[1])
lines: list[str] = []
handler = logging.Handler()
handler.emit = lambda record: lines.append(record.getMessage())
logging.getLogger("pipeline.train.progress").addHandler(handler)


def resolve(*overrides: str):
    return resolve_job(load_job_config(args["config"], [*args["common"], *overrides]), "pretrain")[0]


# the loop: 4 steps decoded on the trainer (data.decode_device=gpu runs on its CPU here), then a resume to 6, compiled
out = {"attempts": []}
first = f"{args['folder']}/first"
for name, overrides in (("first", ["train.stop_after_steps=4", "data.decode_device=gpu"]),
                        ("second", [f"train.resume_from={first}/checkpoint_000001", "train.compile=true"])):
    run = resolve(*overrides)
    ctx = LocalContext(f"{args['folder']}/{name}")
    state = run_training(run, ctx)
    checkpoints = [str(c) for c in ctx.checkpoints]
    out["attempts"].append({"step": state.step, "reports": ctx.reports, "checkpoints": checkpoints})
out["lines"] = lines
out["classes"], out["model_args"] = run.classes, run.model_args
last = ctx.checkpoints[-1]
weights = read_weights(last)
out["weight_keys"] = sorted(weights)
VisionTransformer(**run.model_args).load_state_dict(weights, strict=True)  # the encoder alone, as timm names it

# the components: the checkpointer restores the last checkpoint; the validator evaluates its weights again
run = resolve("train.steps=6")
ctx = LocalContext(f"{args['folder']}/components", resume_from=last)
objective = build_objective(run.job, run.model_args)
engine, dtype = build_engine(run.job, objective, 1, torch.device("cpu"))
state, stored_at, ema = Checkpointer(run, ctx, engine, objective, stop_step=6).restore()
out["restored"] = {"step": state.step, "epoch": state.epoch, "stored_at": stored_at, "ema": ema is not None}
[ledger] = ctx.start_ledgers(1, 0.5, 10)
inputs = InputPipeline(run.job.model.input_mean, run.job.model.input_std, torch.device("cpu"), dtype, num_classes=0)
validator = Validator(run, ctx, engine, objective, inputs, ledger, stop_step=6)
out["due"] = [step for step in range(1, 7) if validator.validate(step) is not None]  # every 2 steps and the last
out["evals"] = {}
for batch_size in (3, 5):
    validator.batch_size = batch_size
    evaluation = validator.validate(6)
    out["evals"][batch_size] = evaluation.metrics
picture = evaluation.images["val/reconstruction"]
out["picture_shape"] = list(picture.shape)
# the first sample, first in shard order: its original (left), masked input (middle) and reconstruction (right)
val = next(iter(ctx.streams[-1].iter_torch_batches(batch_size=1)))
scale = -(-PICTURE_SCALE_PX // run.model_args["img_size"])
row = picture[:16 * scale:scale, ::scale]  # the first sample's panels, one pixel each, a white column between them
original = val["image"][0].permute(1, 2, 0).numpy()
masked = (row[:, 17:33] == 127).all(axis=-1)
out["first_sample"] = {"key": [int(val["shard"][0]), int(val["index"][0])],
                       "original_equal": bool(np.array_equal(row[:, :16], original)),
                       "gaps_white": bool((row[:, 16] == 255).all() and (row[:, 33] == 255).all()
                                          and (picture[16 * scale] == 255).all()),
                       "masked_fraction": float(masked.mean()),
                       "visible_pasted": bool(np.array_equal(row[:, 34:50][~masked], original[~masked]))}
print("RESULTS " + json.dumps(out))
