"""Fine-tuning at twice the pretraining resolution, end to end: pretrain, fine-tune from runs:/<id>, compare."""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient
from safetensors import safe_open

from pipeline.config import ConfigError
from pipeline.tracking.compare import compare_runs
from pipeline.tracking.runs import child_run_ids
from pipeline.train.launch import prepare_init, prepare_job, run_finetune, run_job, with_latest_pretrain

pytestmark = pytest.mark.e2e


def test_finetune_at_twice_the_resolution_from_a_pretrain_run(ray_local, digits_shards, tmp_path, tiny_job):
    with pytest.raises(ConfigError, match="no finished pretrain run in experiment 'vit-pipeline'.*jobs/pretrain.py"):
        with_latest_pretrain(tiny_job(digits_shards, tmp_path, config="digits_finetune.yaml"))

    pretrain = run_job(*prepare_job(tiny_job(digits_shards, tmp_path, "train.steps=150", "optim.warmup_steps=10",
                                             "train.eval_every_n_steps=0", "train.checkpoint_every_n_steps=0")),
                       job_name="pretrain")
    job = with_latest_pretrain(tiny_job(digits_shards, tmp_path, "train.steps=60", "train.eval_every_n_steps=0",
                                        "train.checkpoint_every_n_steps=0", config="digits_finetune.yaml"))
    assert job.init_from == f"runs:/{pretrain.run_id}" and job.data.img_size == 64
    job, inputs = prepare_job(job)
    init = prepare_init(job, inputs)
    assert init.source_img_size == 32 and not init.reset_head
    finetune = run_finetune(job, inputs, init)

    run = MlflowClient(finetune.tracking_uri).get_run(finetune.run_id)
    assert run.data.tags["pipeline.parent_run_id"] == pretrain.run_id
    assert run.data.tags["pipeline.init_from"] == f"runs:/{pretrain.run_id}"
    assert run.data.tags["pipeline.job"] == "finetune"
    assert run.data.params["pretrain_img_size"] == "32" and run.data.params["img_size"] == "64"
    assert child_run_ids(finetune.tracking_uri, pretrain.run_id) == [finetune.run_id]

    checkpoint = Path(finetune.checkpoint_path)
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as weights:
        assert weights.get_slice("pos_embed").get_shape() == [1, 1 + 16 * 16, 96]  # 8x8 grid -> 16x16
    assert (checkpoint / "model_ema.safetensors").exists()
    assert json.loads((checkpoint / "config.json").read_text())["model_args"]["img_size"] == 64
    pretrain_top1, finetune_top1 = pretrain.metrics["last_val/top1"], finetune.metrics["last_val/top1"]
    assert finetune_top1 >= pretrain_top1 - 0.02, (pretrain_top1, finetune_top1)
    assert 0.0 <= finetune.metrics["last_val_ema/top1"] <= 1.0

    rows = compare_runs(finetune.tracking_uri, experiment=job.tracking.experiment)
    assert [(row.job, row.img_size) for row in rows] == [("pretrain", "32"), ("finetune", "64")]
