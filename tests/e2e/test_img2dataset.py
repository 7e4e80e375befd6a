"""Shards made by the real img2dataset tool, as users have them: images served by a loopback HTTP server,
downloaded into `00000.tar …` with `_stats.json` and `.parquet` beside them, indexed in place. With captions and
no label at all, as web-scale shards come, MAE pretrains on them (ZeRO-3, 2 workers, then resumed on 1); with
labels in the `.json` (three classes), a fine-tune starts from that MAE run (ZeRO-2, 2 workers, an odd parameter
count)."""

import functools
import http.server
import io
import json
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ConfigError, load_job_config
from pipeline.data.tar_reader import count_samples
from pipeline.train.checkpoint import weight_shapes
from pipeline.train.launch import RunFinished, run_job
from pipeline.train.resolved_job import resolve_job

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
IMG2DATASET = ROOT / ".venv-img2dataset" / "bin" / "img2dataset"  # built by `make test` (its pins clash with ours)
CLASSES = ["red", "green", "blue"]
SIZES = [(64, 48), (37, 53), (120, 90), (32, 32)]  # odd shapes: img2dataset keeps them (resize_mode no)


@pytest.fixture
def image_server(tmp_path):
    """JPEGs whose dominant channel is their class, served on 127.0.0.1 by a real HTTP server."""
    folder = tmp_path / "web"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(57):
        label = i % 3
        width, height = SIZES[i % len(SIZES)]
        pixels = rng.integers(0, 90, size=(height, width, 3), dtype=np.uint8)
        pixels[..., label] += 150
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="JPEG", quality=90)
        (folder / f"{i}.jpg").write_bytes(out.getvalue())
        rows.append((f"{i}.jpg", label))
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    rows += [("missing-1.jpg", 0), ("missing-2.jpg", 1)]  # 404s: img2dataset counts them as failed downloads
    try:
        yield [(f"{base}/{name}", label) for name, label in rows]
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def run_img2dataset(urls, out: Path, *, per_shard: int, labels: bool = True) -> None:
    """img2dataset over the server's URLs, each with a caption; with `labels`, the class saved as a `.json` key."""
    if not IMG2DATASET.exists():
        pytest.fail(f"{IMG2DATASET} is missing: `make test` builds it (or run the Makefile target for it)")
    url_list = out.parent / "urls.csv"
    url_list.write_text("url,caption,label\n" + "".join(f"{url},a {CLASSES[label]} picture,{label}\n"
                                                       for url, label in urls))
    extra = ["--save_additional_columns", '["label"]'] if labels else []
    done = subprocess.run(
        [str(IMG2DATASET), "--url_list", str(url_list), "--input_format", "csv", "--url_col", "url",
         "--caption_col", "caption", *extra, "--output_format", "webdataset",
         "--output_folder", str(out), "--number_sample_per_shard", str(per_shard), "--processes_count", "1",
         "--thread_count", "4", "--resize_mode", "no", "--enable_wandb", "False", "--retries", "0"],
        capture_output=True, text=True, timeout=300, env={"NO_ALBUMENTATIONS_UPDATE": "1", "PATH": "/usr/bin:/bin"},
        check=False)
    assert done.returncode == 0, done.stderr[-3000:]


def test_mae_pretrains_on_captioned_shards_then_a_fine_tune_learns_their_labels(ray_local, image_server, tmp_path,
                                                                                capsys, job_main, metric_history):
    """img2dataset's image + .txt + .json, no label anywhere: MAE at ZeRO-3 on 2 workers stops at step 6 and
    resumes on 1 worker (the checkpoint resharded) to step 12, registering its checkpoint of the lowest val loss;
    then the same images downloaded with their labels in the .json, indexed with the class names, and a fine-tune
    from runs:/<that MAE run> learns them (data.label_key)."""
    import pyarrow.fs as pafs
    from mlflow import MlflowClient

    make_shards = job_main("make_shards")
    captioned = tmp_path / "captioned"
    run_img2dataset(image_server, captioned, per_shard=20, labels=False)
    assert make_shards(["--source", f"shards:{captioned}/{{00000..00002}}.tar", "--no-progress"]) == 0
    manifest = json.loads((captioned / "train.manifest.json").read_text())
    assert manifest["classes"] == [] and manifest["sample_members"] == ["jpg", "json", "txt"]
    assert "label" not in manifest["json_keys"]

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = [f"data.train={captioned}/{{00000..00002}}.tar", f"data.val={captioned}/00002.tar", "train.steps=12",
              "train.global_batch_size=8", "train.eval_every_n_steps=6", "train.checkpoint_every_n_steps=6",
              "train.log_every_n_steps=1", "optim.warmup_steps=2", "data.local_shuffle_buffer=0",
              "train.zero_stage=3", "train.run_name=mae-captions", f"train.storage_path={tmp_path}/runs",
              f"tracking.uri={uri}", "tracking.register_as=captions-mae"]
    config = ROOT / "jobs" / "configs" / "digits_mae_pretrain.yaml"
    first, _ = resolve_job(load_job_config(config, [*common, "train.stop_after_steps=6"]), "pretrain")
    assert first.classes == [] and first.model_args["num_classes"] == 0
    stopped = run_job(first)
    assert stopped.metrics["step"] == 6
    second, _ = resolve_job(load_job_config(config, [*common, "train.num_workers=1"]), "pretrain")
    mae = run_job(second)  # the same run name and storage: Ray Train resumes from step 6, at world size 1
    assert mae.metrics["step"] == 12 and mae.metrics["train/world_size"] == 1
    # the same command once more: the run is finished, which it says instead of making an empty MLflow run
    runs_before = len(MlflowClient(uri).search_runs([MlflowClient(uri).get_run(mae.run_id).info.experiment_id]))
    with pytest.raises(RunFinished, match=rf"^run mae-captions is already at step 12 of 12: its checkpoint "
                                          rf"{tmp_path}/runs/mae-captions/checkpoint_\S+ \(MLflow run {mae.run_id}\); "
                                          "nothing to train"):
        run_job(second)
    assert len(MlflowClient(uri).search_runs([MlflowClient(uri).get_run(mae.run_id).info.experiment_id])) == \
        runs_before
    assert mae.metrics["last_val/images"] == 17 and not any("knn" in key for key in mae.metrics)
    assert 0 < mae.metrics["last_val/loss_ratio"] < 1.0  # better than predicting each patch's mean
    # each job is a run of its own in MLflow: the first holds steps 1-6, the resumed one steps 7-12
    losses = dict(metric_history(uri, stopped.run_id, "train/loss"))
    resumed = dict(metric_history(uri, mae.run_id, "train/loss"))
    assert sorted(losses) == list(range(1, 7)) and sorted(resumed) == list(range(7, 13))
    # the resumed attempt continues the curve: its first step is nearer the stopped one's last than the run's start
    assert abs(resumed[7] - losses[6]) < abs(resumed[7] - losses[1]), (losses, resumed)
    # each job registers its checkpoint of the lowest val loss: the stopped one version 1, the resumed one 2
    assert (stopped.registered, mae.registered) == ("models:/captions-mae/1", "models:/captions-mae/2")
    images = [item.path for item in MlflowClient(uri).list_artifacts(mae.run_id, "images")]
    assert [path for path in images if path.endswith(".png") and "reconstruction+step+12+" in path], images
    shapes = weight_shapes(f"{mae.checkpoint_path}/model.safetensors")
    assert "head.weight" not in shapes and not any(key.startswith(("decoder_", "mask_token")) for key in shapes)

    labelled = tmp_path / "labelled"
    run_img2dataset(image_server, labelled, per_shard=20)
    names = sorted(p.name for p in labelled.iterdir())
    assert [n for n in names if n.endswith(".tar")] == ["00000.tar", "00001.tar", "00002.tar"]
    assert {"00000_stats.json", "00000.parquet"} <= set(names)
    successes = [json.loads((labelled / f"{i:05d}_stats.json").read_text())["successes"] for i in range(3)]
    assert sum(successes) == 57  # the two 404s are not in the tars
    # index as the README says, with the class names; the counts come from the stats, and agree with the tars
    capsys.readouterr()
    assert make_shards(["--source", f"shards:{labelled}/{{00000..00002}}.tar", "--classes", ",".join(CLASSES),
                        "--verify", "3", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert (f"train: 57 samples in 3 shards (3 counted from img2dataset's _stats.json; 3 checked against their "
            f"tars) -> {labelled}/train.manifest.json") in printed
    assert "train with data.label_key=KEY, KEY one of the .json keys: " in printed and " label," in printed
    manifest = json.loads((labelled / "train.manifest.json").read_text())
    assert [s["num_samples"] for s in manifest["shards"]] == successes == [
        count_samples(pafs.LocalFileSystem(), str(labelled / f"{i:05d}.tar")) for i in range(3)]
    assert manifest["classes"] == CLASSES and manifest["sample_members"] == ["jpg", "json", "txt"]

    overrides = [f"init_from=runs:/{mae.run_id}", f"data.train={labelled}/{{00000..00002}}.tar",
                 f"data.val={labelled}/*.tar", "train.steps=8", "train.global_batch_size=8",
                 "train.eval_every_n_steps=0", "train.checkpoint_every_n_steps=0", "train.log_every_n_steps=1",
                 "optim.warmup_steps=2", "data.local_shuffle_buffer=0", f"train.storage_path={tmp_path}/runs",
                 f"tracking.uri={uri}"]
    config = ROOT / "jobs" / "configs" / "digits_finetune.yaml"
    with pytest.raises(ConfigError, match=r"data.train: the samples have no .cls member .*set data.label_key .*label"):
        resolve_job(load_job_config(config, overrides), "finetune")
    run, init_state = resolve_job(load_job_config(config, [*overrides, "data.label_key=label"]), "finetune")
    assert run.classes == CLASSES and run.model_args["num_classes"] == 3
    assert run.init.reset_head and run.init.parent_run_id == mae.run_id and run.job.data.img_size == 64
    result = run_job(run, init_state)
    assert result.metrics["step"] == 8 and result.metrics["epoch"] == 1  # 57 // 8 = 7 steps an epoch
    assert 0.0 <= result.metrics["last_val/top1"] <= 1.0 and result.metrics["last_val/images"] == 57
    shapes = weight_shapes(f"{result.checkpoint_path}/model.safetensors")
    assert shapes["head.weight"] == (3, 96) and sum(int(np.prod(s)) for s in shapes.values()) % 2 == 1
