"""Shards made by the real img2dataset tool, as users have them: images served by a loopback HTTP server,
downloaded into `00000.tar …` with `_stats.json` and `.parquet` beside them, labels in the `.json`, three
classes. They are indexed in place and trained on (DeepSpeed ZeRO-2, 2 workers, an odd parameter count)."""

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
from pipeline.train.launch import run_job
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


def run_img2dataset(urls, out: Path, *, per_shard: int) -> None:
    if not IMG2DATASET.exists():
        pytest.fail(f"{IMG2DATASET} is missing: `make test` builds it (or run the Makefile target for it)")
    url_list = out.parent / "urls.csv"
    url_list.write_text("url,caption,label\n" + "".join(f"{url},a {CLASSES[label]} picture,{label}\n"
                                                       for url, label in urls))
    done = subprocess.run(
        [str(IMG2DATASET), "--url_list", str(url_list), "--input_format", "csv", "--url_col", "url",
         "--caption_col", "caption", "--save_additional_columns", '["label"]', "--output_format", "webdataset",
         "--output_folder", str(out), "--number_sample_per_shard", str(per_shard), "--processes_count", "1",
         "--thread_count", "4", "--resize_mode", "no", "--enable_wandb", "False", "--retries", "0"],
        capture_output=True, text=True, timeout=300, env={"NO_ALBUMENTATIONS_UPDATE": "1", "PATH": "/usr/bin:/bin"},
        check=False)
    assert done.returncode == 0, done.stderr[-3000:]


def test_img2dataset_output_is_indexed_in_place_and_trained_on(ray_local, image_server, tmp_path, capsys, job_main):
    import pyarrow.fs as pafs

    make_shards = job_main("make_shards")

    out = tmp_path / "out"
    run_img2dataset(image_server, out, per_shard=20)
    names = sorted(p.name for p in out.iterdir())
    assert [n for n in names if n.endswith(".tar")] == ["00000.tar", "00001.tar", "00002.tar"]
    assert {"00000_stats.json", "00000.parquet"} <= set(names)
    successes = [json.loads((out / f"{i:05d}_stats.json").read_text())["successes"] for i in range(3)]
    assert sum(successes) == 57  # the two 404s are not in the tars

    # index as the README says, with the class names; the counts come from the stats, and agree with the tars
    assert make_shards(["--source", f"shards:{out}/{{00000..00002}}.tar", "--classes", ",".join(CLASSES),
                        "--verify", "3", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert (f"train: 57 samples in 3 shards (3 counted from img2dataset's _stats.json; 3 checked against their "
            f"tars) -> {out}/train.manifest.json") in printed
    assert "train with data.label_key=KEY, KEY one of the .json keys: " in printed and " label," in printed
    manifest = json.loads((out / "train.manifest.json").read_text())
    assert [s["num_samples"] for s in manifest["shards"]] == successes == [
        count_samples(pafs.LocalFileSystem(), str(out / f"{i:05d}.tar")) for i in range(3)]
    assert manifest["classes"] == CLASSES and manifest["sample_members"] == ["jpg", "json", "txt"]

    overrides = [f"data.train={out}/{{00000..00002}}.tar", f"data.val={out}/*.tar", "train.steps=8",
                 "train.global_batch_size=8", "train.eval_every_n_steps=0", "train.checkpoint_every_n_steps=0",
                 "train.log_every_n_steps=1", "optim.warmup_steps=2", "data.local_shuffle_buffer=0",
                 f"train.storage_path={tmp_path}/runs", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    config = ROOT / "jobs" / "configs" / "digits_pretrain.yaml"
    with pytest.raises(ConfigError, match=r"data.train: the samples have no .cls member .*set data.label_key .*label"):
        resolve_job(load_job_config(config, overrides), "pretrain")
    run, _ = resolve_job(load_job_config(config, [*overrides, "data.label_key=label"]), "pretrain")
    assert run.classes == CLASSES and run.model_args["num_classes"] == 3
    result = run_job(run)
    assert result.metrics["step"] == 8 and result.metrics["epoch"] == 1  # 57 // 8 = 7 steps an epoch
    assert 0.0 <= result.metrics["last_val/top1"] <= 1.0 and result.metrics["last_val/images"] == 57
    shapes = weight_shapes(f"{result.checkpoint_path}/model.safetensors")
    assert shapes["head.weight"] == (3, 96) and sum(int(np.prod(s)) for s in shapes.values()) % 2 == 1
