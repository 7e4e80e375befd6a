"""The training loop in one process through `LocalContext`: no Ray anywhere on the path, and the trickiest logic
of the loop (the sample-exact resume, the schedule and the EMA across resumes) checked exactly, in seconds."""

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
from pipeline.model import VisionTransformer, flops_per_image
from pipeline.train.optim import lr_multiplier

# Run in a fresh interpreter: what it imports is what the local path needs, and the test process's own Ray and
# process group stay out of it.
TRAIN = r"""
import json, os, sys
from pipeline.config import load_job_config
from pipeline.train.context import LocalContext
from pipeline.train.loop import run_training
from pipeline.train.resolved_job import resolve_job

args = json.loads(sys.argv[1])
out = {}
for name, overrides in args["runs"]:
    run, _ = resolve_job(load_job_config(args["config"], [*args["common"], *overrides]), "pretrain")
    ctx = LocalContext(f"{args['folder']}/{name}")
    os.environ["VIT_PIPELINE_SAMPLE_LOG"] = f"{args['folder']}/{name}/samples"  # what each step trained on
    state = run_training(run, ctx)
    out[name] = {"step": state.step, "images_seen": state.images_seen,
                 "checkpoints": [str(path) for path in ctx.checkpoints],
                 "report_steps": [report["step"] for report in ctx.reports],
                 "lrs": [report["train/lr"] for report in ctx.reports],
                 "rates": [[report["train/images_per_s"], report["train/tflops"], report.get("train/mfu")]
                           for report in ctx.reports],
                 "model_args": run.model_args,
                 "graphs": dynamo.counters["stats"]["unique_graphs"] if (dynamo := sys.modules.get(
                     "torch._dynamo.utils")) else 0,  # compiled so far in this process
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


def record(checkpoint: str) -> dict:
    return json.loads(open(f"{checkpoint}/train_state.json").read())


def weights(checkpoint: str, name: str = "model.safetensors") -> dict[str, np.ndarray]:
    return load_file(f"{checkpoint}/{name}")


def assert_ema_step(previous: dict, now_weights: dict, now_ema: dict, decay: float) -> None:
    for key, value in now_ema.items():
        np.testing.assert_allclose(value, decay * previous[key] + (1 - decay) * now_weights[key], rtol=0, atol=1e-6)


# gpu: the decode tasks only draw crops, and the trainer decodes (on its CPU here), with the same resume
@pytest.mark.parametrize("decode_device", ["cpu", "gpu"])
def test_resumes_train_on_every_sample_of_an_epoch_once_and_carry_the_schedule_and_the_ema(tars, tmp_path,
                                                                                           decode_device):
    uris = write_shards(tars)
    folder = tars.folder / "s"
    common = [f"data.train={folder}/train-*.tar", f"data.val={folder}/val-*.tar", "data.img_size=16",
              "data.local_shuffle_buffer=8", "data.decode_batch_size=4", f"data.shuffle_seed={SEED}",
              "model.args={depth: 1}", "train.num_workers=1", f"train.global_batch_size={BATCH}", "train.steps=24",
              "train.checkpoint_every_n_steps=1", "train.eval_every_n_steps=12", "train.log_every_n_steps=1",
              "optim.warmup_steps=2", "finetune.ema_decay=0.5", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
              f"data.decode_device={decode_device}"]
    # stops mid-shard with rows in the shuffle buffer (5, 11), just past an epoch boundary (17), and the end
    stops = [5, 11, 17, 24]
    starts = [0, *stops[:-1]]
    last = [f"{tmp_path}/{name}/checkpoint_{stop - start - 1:06d}"
            for name, start, stop in zip("abcd", starts, stops, strict=True)]
    runs = [[name, [f"train.stop_after_steps={stop}", *([f"train.resume_from={last[k - 1]}"] if k else [])]]
            for k, (name, stop) in enumerate(zip("abcd", stops, strict=True))]
    runs[1][1].append("train.compile=true")  # resumes an eager run's checkpoint; the next resumes its checkpoint
    runs[-1][1].append("train.peak_tflops=0.002")  # a peak given: MFU on the CPU too
    args = {"config": "jobs/configs/digits_pretrain.yaml", "common": common, "folder": str(tmp_path), "runs": runs}
    result = subprocess.run([sys.executable, "-c", TRAIN, json.dumps(args)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert not out["ray_imported"]  # the loop, the local context and the local data path import no Ray

    attempts = [out[name] for name in "abcd"]
    assert [a["graphs"] > 0 for a in attempts] == [False, True, True, True]  # b compiled, and only b:
    assert attempts[1]["graphs"] == attempts[3]["graphs"]  # its eval (at its last step, 11) and c, d compiled nothing
    assert [a["step"] for a in attempts] == stops and attempts[-1]["images_seen"] == 24 * BATCH
    assert sum((a["report_steps"] for a in attempts), []) == list(range(1, 25))  # no step twice
    steps = [batch for name in "abcd" for batch in trained(tmp_path / name / "samples")]
    assert len(steps) == 24 and all(len(batch) == BATCH for batch in steps)
    # every sample of epoch 0 (16 steps of the 64) once; epoch 1's first 8 steps, no sample twice
    epoch0 = [row for batch in steps[:16] for row in batch]
    epoch1 = [row for batch in steps[16:] for row in batch]
    assert sorted(epoch0) == sorted((uri, i) for uri, size in zip(uris, SIZES, strict=True) for i in range(size))
    assert len(set(epoch1)) == len(epoch1) == 8 * BATCH
    # a resumed pass reads the shards not done, in its epoch's order; then whole epochs, each its own permutation
    order0, order1 = shard_order(uris, SEED, 0), shard_order(uris, SEED, 1)
    assert attempts[0]["orders"][0] == [order0]
    for k, order in ((1, order0), (2, order0), (3, order1)):
        done = set(record(last[k - 1])["shards_done"])
        assert attempts[k]["orders"][0] == [[uri for uri in order if uri not in done]], k
    assert attempts[2]["orders"][1] == [order1]
    # each checkpoint's record is exactly what was trained on in its epoch so far
    for a in attempts:
        for step, checkpoint in zip(a["report_steps"], a["checkpoints"], strict=True):
            saved = record(checkpoint)
            epoch_start = 0 if step <= 16 else 16
            seen = {row for batch in steps[epoch_start:step] for row in batch}
            accounted = {(uri, i) for uri in saved["shards_done"] for i in range(SIZES[uris.index(uri)])}
            for uri, text in saved["samples_done"].items():
                accounted |= {(uri, i) for i in np.flatnonzero(bits_of(text))}
            assert (saved["epoch"], accounted) == (0 if step <= 16 else 1, seen), step
    # the schedule goes on where it stopped: each step's lr is the warmup + cosine value of its step
    expected_lrs = [1e-3 * lr_multiplier(step - 1, warmup_steps=2, total_steps=24, min_lr_ratio=0.01)
                    for step in range(1, 25)]
    assert sum((a["lrs"] for a in attempts), []) == pytest.approx(expected_lrs, rel=1e-6)
    # TFLOP/s per device: 3 x the forward FLOPs of the run's model at its image size x images/s (1 worker); MFU only
    # where a peak was given (the CPU has no table entry), over that peak
    forward_flops = flops_per_image(VisionTransformer(**attempts[0]["model_args"]))
    assert attempts[0]["model_args"]["img_size"] == 16 and forward_flops > 0
    for a in attempts:
        for images_per_s, tflops, mfu in a["rates"]:
            assert images_per_s > 0 and tflops == pytest.approx(3 * forward_flops * images_per_s / 1e12, rel=1e-9)
            assert mfu == (pytest.approx(tflops / 0.002, rel=1e-9) if a is attempts[-1] else None)
    # EMA: every step's average is decay x the last one + (1 - decay) x the new weights, across a resume too
    a, b = attempts[0]["checkpoints"], attempts[1]["checkpoints"]
    for before, now in [*itertools.pairwise(a), (a[-1], b[0])]:
        assert_ema_step(weights(before, "model_ema.safetensors"), weights(now), weights(now, "model_ema.safetensors"),
                        0.5)
    assert not np.allclose(weights(a[-1])["head.weight"], weights(a[-1], "model_ema.safetensors")["head.weight"])


def trained(folder: Path) -> list[list[tuple[str, int]]]:
    """The samples of each step of one run, from its sample log (VIT_PIPELINE_SAMPLE_LOG)."""
    [log] = folder.glob("attempt-*-rank0of1.jsonl")
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    return [[tuple(sample) for sample in line["samples"]] for line in sorted(lines, key=lambda line: line["step"])]


def bits_of(text: str) -> np.ndarray:
    from pipeline.data.epochs import EpochRecord

    return EpochRecord.from_json({"samples_done": {"x": text}}).partial["x"]


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
