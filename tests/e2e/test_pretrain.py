"""Pretraining end to end: DeepSpeed ZeRO on 2 CPU workers under Ray Train, checkpoints, a worker killed mid-run
(Ray Train's restart from the latest checkpoint, one value per step in MLflow), and the errors a user meets before
Ray starts. Resuming with `train.resume_from` sample by sample is checked exactly, through the same loop, in one
process (tests/train/test_local_training.py); elastic resizes and drains on a fake multi-node cluster
(tests/cluster/test_elastic.py)."""

import json
import os
import signal
import statistics
import threading
import time
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

from pipeline.config import ConfigError
from pipeline.data.datasets import build_image_dataset
from pipeline.model import VisionTransformer, flops_per_image
from pipeline.tracking.models import checkpoint_models, latest_value
from pipeline.tracking.runs import JOB_RUNS
from pipeline.train.checkpoint import STATE_FILE, read_weights
from pipeline.train.inputs import InputPipeline
from pipeline.train.launch import run_job
from pipeline.train.resolved_job import resolve_job

pytestmark = pytest.mark.e2e


def prepare(job):
    return resolve_job(job, "pretrain")[0]


def val_top1(run, model) -> float:
    """Top-1 of `model` on the val shards, decoded in this process's Ray exactly as the trainer's eval does."""
    job = run.job
    data = build_image_dataset(run.val_shards, job.data, train=False, num_classes=10)
    inputs = InputPipeline(job.model.input_mean, job.model.input_std, torch.device("cpu"), torch.float32,
                           num_classes=10)
    correct = total = 0
    with torch.no_grad():
        for batch in data.iter_torch_batches(batch_size=128):
            correct += (model(inputs.images(batch["image"])).argmax(1) == batch["label"]).sum().item()
            total += len(batch["label"])
    return correct / total


def check_consolidated(run, result) -> None:
    """The checkpoint's model.safetensors loads strictly into our ViT and timm's, which agree, and scores on the
    val shards exactly the val top-1 the trainer reported."""
    weights = read_weights(result.checkpoint_path)
    model = VisionTransformer(**run.model_args).eval()
    model.load_state_dict(weights, strict=True)
    assert val_top1(run, model) == pytest.approx(result.metrics["last_val/top1"], abs=1e-9)
    theirs = TimmVisionTransformer(**run.model_args).eval()
    theirs.load_state_dict(weights, strict=True)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (model(images) - theirs(images)).abs().max().item() <= 1e-5


def test_killed_worker_restarts_from_the_last_checkpoint(ray_local, digits_shards, tmp_path, tiny_job,
                                                         metric_history):
    from ray.util.state import list_actors

    # ZeRO-3, which partitions the parameters themselves: the restart restores partitioned weights and optimizer
    # state, and every checkpoint gathers the weights to save them. ZeRO-2 (the default) runs in the other jobs.
    resolved = prepare(tiny_job(digits_shards, tmp_path, "train.zero_stage=3", "train.steps=40", "optim.lr=2e-3",
                                "train.checkpoint_every_n_steps=10", "train.eval_every_n_steps=10",
                                "train.max_failures=1", "tracking.register_as=digits-zero3"))
    job = resolved.job
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=run_job(resolved)))
    thread.start()
    runs = tmp_path / "runs"
    deadline = time.time() + 300
    while time.time() < deadline and not list(runs.glob(f"*/checkpoint_*/{STATE_FILE}")):
        time.sleep(0.5)
    states = [json.loads(p.read_text()) for p in runs.glob(f"*/checkpoint_*/{STATE_FILE}")]
    assert states, "no checkpoint within 5 minutes"
    checkpointed_step = max(s["step"] for s in states)
    # Ray registers a checkpoint once every rank has reported it: wait until both ranks are past it, as the
    # attempt's live metrics show
    from mlflow import MlflowClient

    from pipeline.tracking.attempts import ATTEMPT_OF_TAG

    client = MlflowClient(job.tracking.uri)
    experiment = client.get_experiment_by_name(job.tracking.experiment)
    while time.time() < deadline:
        live = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{ATTEMPT_OF_TAG}` LIKE '%'")
        if live and max((m.step for m in client.get_metric_history(live[0].info.run_id, "train/loss")),
                        default=0) >= checkpointed_step + 3:
            break
        time.sleep(0.5)
    address = ray_local.get_runtime_context().gcs_address  # this session's Ray, not another on the host
    workers = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert len(workers) == 2
    victim = workers[1]
    os.kill(victim.pid, signal.SIGKILL)
    thread.join(timeout=600)
    assert "result" in outcome, "the run did not finish after the worker was killed"
    result = outcome["result"]
    assert result.metrics["step"] == 40

    dead = list_actors(address=address, filters=[("actor_id", "=", victim.actor_id)])
    assert dead[0].state == "DEAD"
    history = metric_history(result.tracking_uri, result.run_id, "train/loss")
    values: dict[int, set[float]] = {}
    for step, value in history:
        values.setdefault(step, set()).add(value)
    # one value per step in the job's run, though the steps after the checkpoint were trained twice
    assert set(values) == set(range(1, 41)) and all(len(v) == 1 for v in values.values())
    resumed_at = metric_history(result.tracking_uri, result.run_id, "train/resumed_at_step")
    assert len(resumed_at) == 1 and resumed_at[0][0] == resumed_at[0][1] + 1  # logged at the attempt's first step
    assert resumed_at[0][1] % 10 == 0 and resumed_at[0][1] >= max(10, checkpointed_step - 10)
    # each attempt has its own run under the job's run, with its live metrics
    attempts = sorted(client.search_runs([experiment.experiment_id],
                                         filter_string=f"tags.`mlflow.parentRunId` = '{result.run_id}'"),
                      key=lambda r: int(r.data.tags["pipeline.attempt"]))
    # the lost attempt ends FAILED when its rank 0 saw the error of the killed rank, KILLED when Ray Train stopped it
    # first (or the killed worker was rank 0)
    shape = [(r.info.status, r.data.tags["pipeline.start_step"], r.data.tags["pipeline.world_size"]) for r in attempts]
    assert shape[0] in (("KILLED", "0", "2"), ("FAILED", "0", "2"))
    assert shape[1:] == [("FINISHED", str(int(resumed_at[0][1])), "2")]
    lost = {m.step for m in client.get_metric_history(attempts[0].info.run_id, "train/loss")}
    assert max(lost) > resumed_at[0][1]  # the lost attempt's own run kept the steps it trained past the checkpoint

    # TFLOP/s per device at every step: 3 x the forward FLOPs x the job's images/s / 2 workers; no MFU on the CPU
    forward_flops = flops_per_image(VisionTransformer(**resolved.model_args))
    images_per_s = dict(metric_history(result.tracking_uri, result.run_id, "train/images_per_s"))
    tflops = dict(metric_history(result.tracking_uri, result.run_id, "train/tflops"))
    assert set(tflops) == set(images_per_s) == set(range(1, 41))
    assert all(tflops[step] == pytest.approx(3 * forward_flops * images_per_s[step] / 2 / 1e12, rel=1e-6)
               for step in tflops), (tflops, images_per_s)
    assert metric_history(result.tracking_uri, result.run_id, "train/mfu") == []

    # it trained: 40 steps at 2e-3 drop the mean loss by 0.13-0.32 in a plain torch loop on digits (8 seeds)
    first_values = [min(values[step]) for step in sorted(values)]
    assert statistics.mean(first_values[-6:]) < statistics.mean(first_values[:6]) - 0.05, first_values
    assert json.loads((Path(result.checkpoint_path) / STATE_FILE).read_text())["step"] == 40
    check_consolidated(resolved, result)

    # one logged model per committed checkpoint, each once, though the lost attempt had saved or was saving one
    # and the next attempt resumed from it; registration: the best val/top1, whose folder Ray kept for it
    models = checkpoint_models(client, result.run_id)
    assert [model.tags["pipeline.step"] for model in models] == ["10", "20", "30", "40"]
    scores = [latest_value(model, "val/top1") for model in models]
    assert [step for step, _ in metric_history(result.tracking_uri, result.run_id, "val/top1")] == [10, 20, 30, 40]
    assert scores == [value for _, value in metric_history(result.tracking_uri, result.run_id, "val/top1")]
    best = max(zip(scores, range(4), strict=True))[1]
    version = client.get_model_version("digits-zero3", "1")
    assert version.tags["pipeline.model_id"] == models[best].model_id and result.registered == "models:/digits-zero3/1"
    assert (Path(models[best].tags["pipeline.checkpoint"]) / "model.safetensors").exists()


def test_errors_before_ray_starts(digits_shards, tmp_path, tiny_job, s3_store):
    with pytest.raises(ConfigError, match="img_size height 30 is not divisible by patch size"):
        prepare(tiny_job(digits_shards, tmp_path, "data.img_size=30"))
    with pytest.raises(ConfigError, match="resume_from: .*/missing does not exist"):
        prepare(tiny_job(digits_shards, tmp_path, f"train.resume_from={tmp_path}/missing"))
    missing = s3_store.uri("nothing", "checkpoint_000001")
    with pytest.raises(ConfigError, match=f"resume_from: {missing} does not exist"):
        prepare(tiny_job(digits_shards, tmp_path, f"train.resume_from={missing}"))
    with pytest.raises(ConfigError, match=rf"data.train: 4 of 4 shards do not exist: {s3_store.uri('none')}/train-"):
        prepare(tiny_job(digits_shards, tmp_path, f"data.train={s3_store.uri('none')}/train-{{0..3}}.tar"))
    with pytest.raises(ConfigError, match="unknown model preset 'vit_gigantic'; known presets: "):
        prepare(tiny_job(digits_shards, tmp_path, "model.preset=vit_gigantic"))
    with pytest.raises(ConfigError, match="http://127.0.0.1:9"):
        prepare(tiny_job(digits_shards, tmp_path, "tracking.uri=http://127.0.0.1:9"))
    with pytest.raises(ConfigError, match="data.train: no manifest beside"):
        empty = tmp_path / "empty"
        empty.mkdir()
        (empty / "train-000000.tar").write_bytes(b"")
        prepare(tiny_job(digits_shards, tmp_path, f"data.train={empty}/train-*.tar"))

    other = tmp_path / "other-model"
    (other / "deepspeed").mkdir(parents=True)
    from safetensors.torch import save_file

    from pipeline.model import build_model

    save_file({k: v.contiguous() for k, v in build_model("vit_demo_patch4_32", depth=2).state_dict().items()},
              str(other / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"different model .*blocks\.2\.norm1\.weight: missing from checkpoint"):
        prepare(tiny_job(digits_shards, tmp_path, f"train.resume_from={other}"))


def test_a_data_failure_ends_the_job_in_one_attempt_with_one_line(tmp_path, capsys):
    """Over data.max_bad_fraction, `python jobs/pretrain.py` (its own Ray) exits 1 after one attempt, whatever
    train.max_failures allows, and its stderr ends with the ledger's message on one line."""
    import io
    import subprocess
    import sys

    import numpy as np
    import webdataset as wds
    from mlflow import MlflowClient
    from PIL import Image

    from pipeline.data.shard_writer import index_shards

    rng = np.random.default_rng(0)
    for shard in range(4):
        with wds.TarWriter(str(tmp_path / f"train-{shard:06d}.tar")) as writer:
            for i in range(60):
                image = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(image, format="JPEG")
                writer.write({"__key__": f"{shard}{i:04d}", "jpg": image.getvalue() if i % 5 else b"not a jpeg",
                              "cls": str(i % 3).encode()})
    index_shards(str(tmp_path / "train-*.tar"), classes=["a", "b", "c"], progress=False)
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER"))}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(root / "jobs/pretrain.py"), "--config", str(root / "jobs/configs/digits_pretrain.yaml"),
         f"data.train={tmp_path}/train-*.tar", "data.val=", "train.steps=20", "train.max_failures=2",
         "data.max_bad_fraction=0.05", "data.min_samples_for_bad_check=50", f"train.storage_path={tmp_path}/runs",
         f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400, check=False)
    took_s = time.perf_counter() - start
    lines = done.stderr.splitlines()
    first_error = next(i for i, line in enumerate(lines) if line.startswith("error: "))
    with capsys.disabled():
        print(f"\ndata-threshold failure: exit {done.returncode} after {took_s:.0f} s, "
              f"{len(lines) - first_error} stderr line(s) from 'error:' to the exit")
    assert done.returncode == 1, done.stderr[-3000:]
    assert lines[first_error:] == [lines[-1]]
    assert lines[-1].startswith("error: too many bad samples: ") and "were bad" in lines[-1], lines[-1]
    assert "over data.max_bad_fraction=0.05" in lines[-1] and "(undecodable: " in lines[-1], lines[-1]
    output = done.stdout + done.stderr
    assert output.count("Started training worker group") == 1, output[-3000:]  # not restarted for bad data
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("vit-pipeline").experiment_id], filter_string=JOB_RUNS)
    assert run.info.status == "FAILED"
