"""The README's cluster chain: `ray job submit` against a real Ray head with token authentication, tracked on a
real MLflow server with a sqlite database, with shards and checkpoints on a real S3-compatible server (moto on
127.0.0.1, reached through the standard AWS_* variables passed in the job's runtime env): make_shards to the
bucket, pretrain from it (with the MLflow server stopped and restarted mid-run), then fine-tune from runs:/<id>."""

import json
import time
import urllib.error
import urllib.request

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

from pipeline import storage
from pipeline.model import VisionTransformer

pytestmark = pytest.mark.e2e

PRETRAIN_STEPS = 100  # long enough that training goes on after the MLflow server has restarted (about 15 s)


@pytest.fixture(scope="module")
def head(tmp_path_factory, local_cluster):
    cluster = local_cluster(tmp_path_factory.mktemp("head"), auth="token")
    try:
        cluster.local_sh("start")
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def pretrain(head, s3_chain, tmp_path_factory):
    """A pretrain job submitted to the head, reading shards from the bucket and checkpointing into it; once it
    is training, the MLflow server is stopped by PID and restarted on the same port and database."""
    job = head.submit("python", "jobs/pretrain.py", "--config", "jobs/configs/digits_pretrain.yaml",
                      *s3_chain.overrides(f"train.steps={PRETRAIN_STEPS}", f"tracking.uri={head.mlflow_uri}"),
                      extra=s3_chain.runtime_env)
    try:
        first_step_s = job.wait_for(rf"step 1/{PRETRAIN_STEPS} ", timeout_s=400)
        print(f"\nsubmit -> first training step: {first_step_s:.1f} s")
        job.wait_for(rf"step 3/{PRETRAIN_STEPS} ", timeout_s=60)
        down_ms = time.time_ns() // 1_000_000
        head.local_sh("stop-mlflow")
        job.wait_for(rf"step 6/{PRETRAIN_STEPS} ", timeout_s=60)
        head.local_sh("start-mlflow")
        up_ms = time.time_ns() // 1_000_000
        rc = job.finish(timeout_s=400)
    finally:
        job.kill()
    assert rc == 0, job.tail()
    assert "succeeded" in job.output()
    client = MlflowClient(head.mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("vit-pipeline").experiment_id],
                                filter_string="tags.`pipeline.job` = 'pretrain'")
    return {"run": run, "job": job, "first_step_s": first_step_s, "down_ms": down_ms, "up_ms": up_ms,
            "workdir": tmp_path_factory.mktemp("pretrain")}


def test_pretrain_job_is_recorded_on_the_tracking_server(head, pretrain):
    client = MlflowClient(head.mlflow_uri)
    run = client.get_run(pretrain["run"].info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == str(PRETRAIN_STEPS)
    assert run.data.params["data.img_size"] == "32" and run.data.params["train.global_batch_size"] == "16"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, PRETRAIN_STEPS + 1))
    assert 0.0 <= run.data.metrics["val/top1"] <= 1.0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "plots"} <= artifacts and "weights" not in artifacts, artifacts
    assert pretrain["first_step_s"] < 400


def test_the_checkpoint_in_the_bucket_is_linked_and_loads_in_our_vit_and_timm(head, pretrain, s3_chain):
    run = MlflowClient(head.mlflow_uri).get_run(pretrain["run"].info.run_id)
    checkpoint = run.data.tags["pipeline.checkpoint"]
    assert checkpoint.startswith(f"{s3_chain.prefix}/runs/pretrain-") and "/checkpoint_" in checkpoint
    output = pretrain["job"].output()
    assert f"checkpoint:      {checkpoint}" in output  # printed with its scheme
    assert f"weights not copied into MLflow: the checkpoint is on remote storage, and the run links to it " \
           f"(tag pipeline.checkpoint = {checkpoint})" in output
    local = storage.download(checkpoint, ("model.safetensors", "config.json", "train_state.json"))
    config = json.loads(open(f"{local}/config.json").read())
    assert json.loads(open(f"{local}/train_state.json").read())["step"] == PRETRAIN_STEPS
    assert config["mlflow_run_id"] == run.info.run_id and config["job"]["data"]["train"].startswith("s3://")
    weights = load_file(f"{local}/model.safetensors")
    args = config["model_args"]
    ours, theirs = VisionTransformer(**args).eval(), TimmVisionTransformer(**args).eval()
    ours.load_state_dict(weights, strict=True)
    theirs.load_state_dict(weights, strict=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = ours(images)
        assert torch.isfinite(logits).all() and (logits - theirs(images)).abs().max().item() <= 1e-5


def test_metrics_survive_the_tracking_server_restarting_mid_run(head, pretrain):
    down_ms, up_ms = pretrain["down_ms"], pretrain["up_ms"]
    assert up_ms - down_ms > 5_000  # the server was really away for a while
    history = MlflowClient(head.mlflow_uri).get_metric_history(pretrain["run"].info.run_id, "train/loss")
    during = [m.step for m in history if down_ms < m.timestamp < up_ms]
    after = [m.step for m in history if m.timestamp > up_ms]
    assert during, "no step was logged while the server was down"  # kept in memory, sent once it was back
    assert after, "the run ended before the server came back, so nothing was logged after the restart"
    assert min(after) > max(during)
    assert "MLflow tracking at" in pretrain["job"].output()  # the outage was noticed and said, not hidden


def test_finetune_submitted_from_the_pretrain_run_is_linked_to_it(head, pretrain, s3_chain):
    """init_from=runs:/<id> follows the run's S3 checkpoint tag; with no model.img_size, twice its resolution."""
    pretrain_id = pretrain["run"].info.run_id
    job = head.submit("python", "jobs/finetune.py", "--config", "jobs/configs/digits_finetune.yaml",
                      f"init_from=runs:/{pretrain_id}", "finetune.ema_decay=0",
                      *s3_chain.overrides("train.steps=6", f"tracking.uri={head.mlflow_uri}"),
                      extra=s3_chain.runtime_env)
    try:
        rc = job.finish(timeout_s=400)
    finally:
        job.kill()
    assert rc == 0, job.tail()
    client = MlflowClient(head.mlflow_uri)
    (run,) = client.search_runs([pretrain["run"].info.experiment_id],
                                filter_string="tags.`pipeline.job` = 'finetune'")
    assert run.info.status == "FINISHED"
    assert run.data.tags["pipeline.parent_run_id"] == pretrain_id
    assert run.data.tags["pipeline.init_from"] == f"runs:/{pretrain_id}"
    assert run.data.params["pretrain_img_size"] == "32" and run.data.params["img_size"] == "64"
    assert "fine-tuning at 64 px (twice the 32 px it was trained at" in job.output()
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, 7))
    assert run.data.tags["pipeline.checkpoint"].startswith(f"{s3_chain.prefix}/runs/finetune-")


def http_status(url: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_submit_needs_the_head_token(head, pretrain):
    jobs_api = f"{head.address}/api/jobs/"
    assert (http_status(jobs_api, None), http_status(jobs_api, "0" * 64), http_status(jobs_api, head.token)) == (
        401, 403, 200)
    for token in (None, "0" * 64):  # no token, a wrong token
        refused = head.submit("echo", "refused", token=token, extra=("--no-wait",))
        assert refused.finish(timeout_s=120) != 0
        assert "ray.exceptions.AuthenticationError" in refused.output(), refused.tail()
    # with the token it works: the pretrain job was submitted with it, and succeeded
    assert pretrain["job"].env["RAY_AUTH_TOKEN"] == head.token
    assert "submitted successfully" in pretrain["job"].output() and "succeeded" in pretrain["job"].output()
