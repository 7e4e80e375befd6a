"""The training loop in one process through `LocalContext`: no Ray anywhere on the path, and the trickiest logic
of the loop (shard-granular resume, the EMA across a resume) checked exactly, in seconds."""

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from pipeline.data.epochs import shard_order
from pipeline.data.shard_writer import index_shards
from pipeline.train.optim import lr_multiplier

# Run in a fresh interpreter: what it imports is what the local path needs, and the test process's own Ray and
# process group stay out of it.
TRAIN = r"""
import json, sys
from pipeline.config import load_job_config
from pipeline.train.context import LocalContext
from pipeline.train.loop import run_training
from pipeline.train.resolved_job import resolve_job

args = json.loads(sys.argv[1])
out = {}
for name, overrides in args["runs"]:
    run, _ = resolve_job(load_job_config(args["config"], [*args["common"], *overrides]), "pretrain")
    ctx = LocalContext(f"{args['folder']}/{name}")
    state = run_training(run, ctx)
    out[name] = {"step": state.step, "images_seen": state.images_seen,
                 "checkpoints": [str(path) for path in ctx.checkpoints],
                 "report_steps": [report["step"] for report in ctx.reports],
                 "lrs": [report["train/lr"] for report in ctx.reports],
                 "orders": [stream.orders for stream in ctx.streams if stream.train]}
out["ray_imported"] = any(module == "ray" or module.startswith("ray.") for module in sys.modules)
print(json.dumps(out))
"""

SIZES = [12, 7, 16, 9, 20]  # 64 samples: 16 steps of 4 per epoch
BATCH = 4
SEED = 3


def write_shards(tars) -> list[str]:
    for s, size in enumerate(SIZES):
        tars.write(f"s/train-{s:06d}.tar", [tars.good_record(f"{s}{i:04d}", label=(s + i) % 3, seed=i)
                                            for i in range(size)])
    tars.write("s/val-000000.tar", [tars.good_record(f"v{i:04d}", label=i % 3, seed=i) for i in range(8)])
    index_shards(str(tars.folder / "s" / "train-*.tar"), classes=["a", "b", "c"])
    index_shards(str(tars.folder / "s" / "val-*.tar"), classes=["a", "b", "c"])
    return [str(tars.folder / "s" / f"train-{s:06d}.tar") for s in range(len(SIZES))]


def done_after(order: list[str], counts: dict[str, int], rows: int) -> list[str]:
    """The shards of `order` whose every row is among its first `rows` (rows arrive in shard order)."""
    done, total = [], 0
    for uri in order:
        total += counts[uri]
        if total > rows:
            break
        done.append(uri)
    return done


def shards_done(checkpoint: str) -> list[str]:
    return json.loads(open(f"{checkpoint}/train_state.json").read())["shards_done"]


def weights(checkpoint: str, name: str = "model.safetensors") -> dict[str, np.ndarray]:
    return load_file(f"{checkpoint}/{name}")


def assert_ema_step(previous: dict, now_weights: dict, now_ema: dict, decay: float) -> None:
    for key, value in now_ema.items():
        np.testing.assert_allclose(value, decay * previous[key] + (1 - decay) * now_weights[key], rtol=0, atol=1e-6)


def test_resume_reads_the_shards_not_done_and_carries_the_ema(tars, tmp_path):
    uris = write_shards(tars)
    counts = dict(zip(uris, SIZES, strict=True))
    folder = tars.folder / "s"
    common = [f"data.train={folder}/train-*.tar", f"data.val={folder}/val-*.tar", "data.img_size=16",
              "data.local_shuffle_buffer=0", f"data.shuffle_seed={SEED}", "model.args={depth: 1}",
              "train.num_workers=1", f"train.global_batch_size={BATCH}", "train.steps=24",
              "train.checkpoint_every_n_steps=1", "train.eval_every_n_steps=12", "train.log_every_n_steps=1",
              "optim.warmup_steps=2", "finetune.ema_decay=0.5", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    first = f"{tmp_path}/a/checkpoint_000004"  # step 5
    args = {"config": "jobs/configs/digits_pretrain.yaml", "common": common, "folder": str(tmp_path),
            "runs": [["a", ["train.stop_after_steps=5"]], ["b", [f"train.resume_from={first}"]]]}
    result = subprocess.run([sys.executable, "-c", TRAIN, json.dumps(args)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert not out["ray_imported"]  # the loop, the local context and the local data path import no Ray

    a, b = out["a"], out["b"]
    order0, order1 = shard_order(uris, SEED, 0), shard_order(uris, SEED, 1)
    assert (a["step"], a["report_steps"]) == (5, [1, 2, 3, 4, 5])
    assert a["orders"][0] == [order0]  # the whole-epoch stream read epoch 0's permutation
    for step, checkpoint in enumerate(a["checkpoints"], start=1):  # exactly the shards whose rows were all consumed
        assert shards_done(checkpoint) == done_after(order0, counts, BATCH * step), step
    done_a = shards_done(first)
    assert done_a  # the stop fell after at least one whole shard

    # the resume first reads the rest of epoch 0, the shards not done, in epoch 0's order, then whole epochs
    rest = [uri for uri in order0 if uri not in done_a]
    pass_steps = sum(counts[uri] for uri in rest) // BATCH
    assert b["orders"][0] == [rest] and b["orders"][1] == [order1]
    assert (b["step"], b["images_seen"]) == (24, 24 * BATCH)
    assert b["report_steps"] == list(range(6, 25))
    # the schedule goes on where it stopped: each step's lr is the warmup + cosine value of its step
    expected_lrs = [1e-3 * lr_multiplier(step - 1, warmup_steps=2, total_steps=24, min_lr_ratio=0.01)
                    for step in range(1, 25)]
    assert a["lrs"] + b["lrs"] == pytest.approx(expected_lrs, rel=1e-6)
    for step, checkpoint in zip(b["report_steps"], b["checkpoints"], strict=True):
        if step <= 5 + pass_steps:
            expected = done_a + done_after(rest, counts, BATCH * (step - 5))
        else:
            expected = done_after(order1, counts, BATCH * (step - 5 - pass_steps))
        assert shards_done(checkpoint) == expected, step

    # EMA: every step's average is decay x the last one + (1 - decay) x the new weights, across the resume too
    for before, now in itertools.pairwise(a["checkpoints"]):
        assert_ema_step(weights(before, "model_ema.safetensors"), weights(now), weights(now, "model_ema.safetensors"),
                        0.5)
    assert_ema_step(weights(first, "model_ema.safetensors"), weights(b["checkpoints"][0]),
                    weights(b["checkpoints"][0], "model_ema.safetensors"), 0.5)
    assert not np.allclose(weights(first)["head.weight"], weights(first, "model_ema.safetensors")["head.weight"])


def test_the_readme_runs_the_loop_in_one_process(tmp_path):
    """The README's snippet, as written, from a folder holding the demo's shards and the jobs' configs."""
    from pipeline.data.shard_writer import ensure_digits_shards

    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    [snippet] = [block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "LocalContext" in block]
    os.symlink(root / "jobs", tmp_path / "jobs")
    ensure_digits_shards(str(tmp_path / "data" / "digits" / "train-*.tar"), img_size=32)
    env = {**os.environ, "VIT_PIPELINE_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    step, epoch, _ = result.stdout.strip().splitlines()[-1].split()
    assert (int(step), int(epoch)) == (20, 0)
    assert sorted(os.listdir(tmp_path / "runs" / "local")) == ["checkpoint_000000"]  # at the end (every 200 steps)
