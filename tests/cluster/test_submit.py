"""`ray job submit` against a real Ray head with token authentication, tracked on a real MLflow server with a
sqlite database: pretrain (with the server stopped and restarted mid-run), then fine-tune from runs:/<id>."""

import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

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
def pretrain(head, digits_shards, tmp_path_factory, tiny_overrides):
    """A pretrain job submitted to the head; once it is training, the MLflow server is stopped by PID and
    restarted on the same port and database."""
    workdir = tmp_path_factory.mktemp("pretrain")
    job = head.submit("python", "jobs/pretrain.py", "--config", "jobs/configs/digits_pretrain.yaml",
                      *tiny_overrides(digits_shards, workdir, f"train.steps={PRETRAIN_STEPS}",
                                      f"tracking.uri={head.mlflow_uri}"))
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
            "workdir": workdir}


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
    assert {"config.yaml", "plots", "weights"} <= artifacts, artifacts
    weights = {a.path for a in client.list_artifacts(run.info.run_id, "weights")}
    assert {"weights/model.safetensors", "weights/config.json"} <= weights
    local = client.download_artifacts(run.info.run_id, "weights/model.safetensors", str(pretrain["workdir"]))
    assert Path(local).stat().st_size > 100_000  # the demo ViT's fp32 weights came through the server
    assert Path(run.data.tags["pipeline.checkpoint"]).is_relative_to(pretrain["workdir"] / "runs")
    assert pretrain["first_step_s"] < 400


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


def test_finetune_submitted_from_the_pretrain_run_is_linked_to_it(head, pretrain, digits_shards, tmp_path,
                                                                   tiny_overrides):
    pretrain_id = pretrain["run"].info.run_id
    job = head.submit("python", "jobs/finetune.py", "--config", "jobs/configs/digits_finetune.yaml",
                      f"init_from=runs:/{pretrain_id}", "model.img_size=48", "finetune.ema_decay=0",
                      *tiny_overrides(digits_shards, tmp_path, "train.steps=6", f"tracking.uri={head.mlflow_uri}"))
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
    assert run.data.params["pretrain_img_size"] == "32" and run.data.params["img_size"] == "48"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, 7))


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
