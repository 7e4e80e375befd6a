"""The demo chain end to end, as `make demo` runs it: the pretrain on the embedded default (digits made under
./data, the local sqlite store), a fine-tune at twice its resolution from that run (runs:/<id>, found in MLflow),
and the comparison; then the README's local training commands, as written, checked against that folder
(`--dry-run`). Both trainings are shortened to keep the suite's time; the full recipe's figures are in
docs/benchmarks.md (`make demo`). The pretrain runs as `python jobs/pretrain.py` in a process of its own, attached
to the session's Ray as a job attaches to a cluster (a second Ray instance on the host would add Ray Train's
errors about finding two), so its console is the one a user sees: at most a fifth of its lines are not the
pipeline's (pipeline/console.py)."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient
from safetensors import safe_open

from pipeline.config import ConfigError, load_job_config
from pipeline.console import TAG, TAG_ENV, VERBOSE_ENV, count_lines
from pipeline.tracking.compare import compare_runs
from pipeline.tracking.lineage import latest_pretrain_run_id
from pipeline.tracking.models import checkpoint_models, latest_value, register_best
from pipeline.tracking.runs import child_run_ids
from pipeline.tracking.store import resolve_tracking_uri
from pipeline.train.checkpoint import read_weights
from pipeline.train.resolved_job import resolve_job

pytestmark = pytest.mark.e2e

JOBS = Path(__file__).parents[2] / "jobs"
PRETRAIN_STEPS = 300  # half the shipped recipe
MIN_PRETRAIN_TOP1 = 0.65  # 0.774 in a 300-step run; the full recipe reaches 0.92-0.95
MAX_FOREIGN_LINES = 0.2  # of the pretrain's console, lines not from the pipeline (pipeline/console.py)


def test_the_demo_chain_pretrains_then_finetunes_at_twice_the_resolution(ray_local, tmp_path, monkeypatch,
                                                                                  metric_history, capsys, job_main,
                                                                                  readme_commands):
    monkeypatch.chdir(tmp_path)  # the demo's data, store and checkpoints land in the current folder
    for name in ("MLFLOW_TRACKING_URI", "VIT_PIPELINE_HOME"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="no finished pretrain run in experiment 'vit-pipeline'.*jobs/pretrain.py"):
        resolve_job(load_job_config(JOBS / "configs" / "digits_finetune.yaml", []), "finetune")

    start = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", VERBOSE_ENV))}
    env.update({"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, TAG_ENV: "1"})
    done = subprocess.run([sys.executable, str(JOBS / "pretrain.py"), f"train.steps={PRETRAIN_STEPS}"],
                          cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900,
                          check=False)
    pretrain_s = time.perf_counter() - start
    console = done.stdout.decode("utf-8", errors="replace")  # bytes: a progress bar's redraws stay one line
    (tmp_path / "pretrain-console.txt").write_bytes(done.stdout)  # to look at: python -m pipeline.console FILE --show
    assert done.returncode == 0, console[-3000:]
    total, foreign = count_lines(console)
    if "Found multiple active Ray instances" in console:  # another Ray on the host (another suite's): Ray Train's
        # PlacementGroupCleaner cannot tell its own and prints a traceback (a Ray issue, shown, not counted here)
        elsewhere = [line for line in foreign if "(PlacementGroupCleaner pid=" in line]
        total, foreign = total - len(elsewhere), [line for line in foreign if line not in elsewhere]
    with capsys.disabled():
        print(f"\ndemo pretrain console: {total} lines, {len(foreign)} not from the pipeline "
              f"({100 * len(foreign) / total:.0f} %)")
    assert len(foreign) <= MAX_FOREIGN_LINES * total, "\n".join(foreign)
    ours = [line[line.index(TAG) + len(TAG):] for line in console.splitlines() if TAG in line]
    assert any(re.match(rf"step \d+/{PRETRAIN_STEPS} \| loss ", line) for line in ours), console[-3000:]
    assert any(re.match(r"step \d+/\d+ \| .*\| val top-1 [\d.]+ loss ", line) for line in ours), console[-3000:]
    checkpoints = [line for line in ours if line.startswith("checkpoint step ")]
    # demo recipe: every 200 steps and at the end; one line each, from rank 0
    assert [line.split(":")[0] for line in checkpoints] == ["checkpoint step 200", f"checkpoint step {PRETRAIN_STEPS}"]
    assert all(f"{tmp_path}/runs/pretrain-" in line for line in checkpoints), checkpoints
    assert re.search(rf"^final val top-1: [\d.]+ after {PRETRAIN_STEPS} steps", console, re.M), console[-3000:]
    assert re.search(r"^MLflow run: +\w+", console, re.M), console[-3000:]
    uri = resolve_tracking_uri("")
    assert uri == f"sqlite:///{tmp_path}/mlflow.db"
    pretrain_id = latest_pretrain_run_id(uri, "vit-pipeline")
    pretrain_top1 = metric_history(uri, pretrain_id, "val/top1")[-1][1]
    with capsys.disabled():
        print(f"\ndemo pretrain, {PRETRAIN_STEPS} steps: val top-1 {pretrain_top1:.4f} in {pretrain_s:.0f} s")
    assert pretrain_top1 >= MIN_PRETRAIN_TOP1

    # MLflow as its users look: the data as datasets, each checkpoint a logged model with its val metrics, the
    # final one holding the weights, and the experiment of the kind that opens on training runs
    client = MlflowClient(uri)
    pretrain = client.get_run(pretrain_id)
    assert client.get_experiment(pretrain.info.experiment_id).tags["mlflow.experimentKind"] == \
        "custom_model_development"
    datasets = {tag.value: item.dataset for item in pretrain.inputs.dataset_inputs for tag in item.tags
                if tag.key == "mlflow.data.context"}
    assert sorted(datasets) == ["train", "validation"] and datasets["train"].name.endswith("digits/train")
    assert json.loads(datasets["train"].profile)["num_samples"] == 1438
    models = checkpoint_models(client, pretrain_id)
    assert [model.tags["pipeline.step"] for model in models] == ["200", str(PRETRAIN_STEPS)]
    val = metric_history(uri, pretrain_id, "val/top1")
    assert [[(m.key, m.step, m.value, m.dataset_name) for m in model.metrics if m.key == "val/top1"]
            for model in models] == [[("val/top1", step, value, datasets["validation"].name)]
                                     for step, value in val if step in (200, PRETRAIN_STEPS)]
    assert {a.path for a in client.list_logged_model_artifacts(models[-1].model_id)} >= \
        {"model.safetensors", "config.json", "MLmodel"}
    assert re.search(rf"^logged model: +models:/{models[-1].model_id}$", console, re.M), console[-3000:]
    assert re.search(rf"^look at it: +mlflow ui --backend-store-uri {re.escape(uri)}, then http://127.0.0.1:5000/#/"
                     rf"experiments/{pretrain.info.experiment_id}/runs/{pretrain_id}\?workflowType=machine_learning$",
                     console, re.M), console[-3000:]

    # the demo fine-tune, shortened: no init_from, so it starts from the newest pretrain run at 2x its size
    assert job_main("finetune")(["train.steps=24", "train.eval_every_n_steps=0", "data.local_shuffle_buffer=0",
                                 "train.checkpoint_every_n_steps=0"]) == 0
    [finetune_id] = child_run_ids(uri, pretrain_id)
    run = MlflowClient(uri).get_run(finetune_id)
    assert run.data.tags["pipeline.parent_run_id"] == pretrain_id
    # the pretrain's child as MLflow sees it (the UI nests it), started from the pretrain's final model, on data
    # the pretrain trained on too
    assert run.data.tags["mlflow.parentRunId"] == pretrain_id
    assert [m.model_id for m in run.inputs.model_inputs] == [models[-1].model_id]
    assert [{t.key: t.value for t in item.tags} for item in run.inputs.dataset_inputs
            if item.dataset.digest == datasets["train"].digest] == [
        {"mlflow.data.context": "train", "pipeline.pretrain_run": pretrain_id}]
    assert run.data.tags["pipeline.init_from"] == f"runs:/{pretrain_id}"
    assert run.data.tags["pipeline.job"] == "finetune"
    assert run.data.params["pretrain_img_size"] == "32" and run.data.params["img_size"] == "64"

    [checkpoint] = [path for path in tmp_path.glob("runs/finetune-*/checkpoint_*") if path.is_dir()]
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as weights:
        assert weights.get_slice("pos_embed").get_shape() == [1, 1 + 16 * 16, 96]  # 8x8 grid -> 16x16
    assert (checkpoint / "model_ema.safetensors").exists()
    assert json.loads((checkpoint / "config.json").read_text())["model_args"]["img_size"] == 64
    finetune_top1 = metric_history(uri, finetune_id, "val/top1")[-1][1]
    # it starts from the pretrained weights: 40-60 steps from scratch read 0.16-0.29 (e2e pretrain test runs);
    # from a 300-step pretrain at 0.833 the fine-tune read 0.822
    assert finetune_top1 >= pretrain_top1 - 0.1, (pretrain_top1, finetune_top1)
    assert 0.0 <= metric_history(uri, finetune_id, "val_ema/top1")[-1][1] <= 1.0

    # init_from the final logged model: the same weights as runs:/<id>; the best, registered: that checkpoint's
    finetune_config = JOBS / "configs" / "digits_finetune.yaml"
    by_run = resolve_job(load_job_config(finetune_config, [f"init_from=runs:/{pretrain_id}"]), "finetune")
    by_model = resolve_job(load_job_config(finetune_config, [f"init_from=models:/{models[-1].model_id}"]), "finetune")
    assert (by_model[0].init.model_id, by_model[0].init.parent_run_id, by_model[0].job.data.img_size) == \
        (models[-1].model_id, pretrain_id, 64)
    assert by_model[1].keys() == by_run[1].keys() and all(torch.equal(by_model[1][k], by_run[1][k]) for k in by_run[1])
    version = register_best(uri, pretrain_id, "digits-demo")
    best = max(models, key=lambda model: (latest_value(model, "val/top1"), int(model.tags["pipeline.step"])))
    by_version = resolve_job(load_job_config(finetune_config, [f"init_from=models:/digits-demo/{version.version}"]),
                             "finetune")
    assert by_version[0].init.model_id == best.model_id
    best_weights = read_weights(best.tags["pipeline.checkpoint"])
    assert all(torch.equal(by_version[1][k], best_weights[k]) for k in by_version[1])

    assert job_main("compare")(["--last", "2", "--out", "compare.png"]) == 0
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    rows = compare_runs(uri, experiment="vit-pipeline")
    assert [(row.job, row.img_size) for row in rows] == [("pretrain", "32"), ("finetune", "64")]

    # The README's local pretrain and fine-tune commands, as written, from a folder laid out like the checkout:
    # they resolve against these shards and this run (`--dry-run`: everything up to the start of Ray)
    (tmp_path / "jobs").symlink_to(JOBS)
    filled_in = {"RUN_ID": pretrain_id, "$PWD": str(tmp_path), "$MLFLOW_TRACKING_URI": uri}
    local = [words for words in readme_commands() if Path(words[0]).stem in ("pretrain", "finetune")
             and not any("://" in word for word in words if not word.startswith("init_from=runs:/"))]
    assert len(local) == 6, local
    capsys.readouterr()
    sizes = []
    for words in local:
        argv = words[1:]
        for key, value in filled_in.items():
            argv = [word.replace(key, value) for word in argv]
        assert job_main(Path(words[0]).stem)([*argv, "--dry-run"]) == 0, words
        resolved = yaml.safe_load(capsys.readouterr().out)
        job = resolved["job"]
        assert job["data"]["train"].startswith(str(tmp_path / "data" / "digits")), job["data"]
        assert resolved["train_shards"]["num_samples"] == 1438 and resolved["model_args"]["img_size"] == \
            job["data"]["img_size"]
        sizes.append((Path(words[0]).stem, job["data"]["img_size"], job["init_from"]))
    run = f"runs:/{pretrain_id}"
    # the last two: the MAE demo pair (its fine-tune takes the newest pretrain run, here the supervised one, at the
    # 32 px its config sets)
    assert sizes == [("pretrain", 32, ""), ("finetune", 48, run), ("pretrain", 32, ""), ("finetune", 64, run),
                     ("pretrain", 32, ""), ("finetune", 32, run)]

    # a damaged weights file, as the user types it: one error line naming it, before Ray
    whole, cut = checkpoint / "model.safetensors", tmp_path / "cut.safetensors"
    cut.write_bytes(whole.read_bytes()[:100_000])
    assert job_main("finetune")([f"init_from={cut}", "--dry-run"]) == 2
    printed = capsys.readouterr()
    assert printed.err.splitlines() == [f"error: init_from: {cut} is a safetensors file cut short: its tensors need "
                                        f"{whole.stat().st_size:,} bytes, and the file holds 100,000"], printed.err
