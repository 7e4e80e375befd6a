"""MAE through the training loop and its components (checkpointer, metrics, validator) in one process
(`LocalContext`, no Ray), on shards as img2dataset writes them without labels: an image, a caption, metadata. And
MAE's evaluation with labels (the k-NN monitor), on two gloo ranks against one process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.benchmarks import free_port
from pipeline.data.shard_writer import index_shards

PROGRAM = Path(__file__).with_name("mae_loop_program.py")
EVAL_PROGRAM = Path(__file__).with_name("mae_eval_program.py")


def write_captioned_shards(tars) -> Path:
    """3 train shards of 8 and a val shard of 6: jpg + txt + json, no .cls and no label key."""
    for s in range(3):
        tars.write(f"c/train-{s:06d}.tar", [{"__key__": f"{s}{i:04d}", "jpg": tars.image_bytes(24, 20, seed=10 * s + i),
                                             "txt": f"a picture number {i}", "json": {"url": f"http://x/{s}/{i}.jpg"}}
                                            for i in range(8)])
    tars.write("c/val-000000.tar", [{"__key__": f"v{i:04d}", "jpg": tars.image_bytes(24, 20, seed=100 + i),
                                     "txt": "a val picture", "json": {"url": f"http://x/v/{i}.jpg"}} for i in range(6)])
    for split in ("train", "val"):
        index_shards(str(tars.folder / "c" / f"{split}-*.tar"), progress=False)
    return tars.folder / "c"


def test_mae_trains_evaluates_checkpoints_and_resumes_without_labels(tars, tmp_path):
    folder = write_captioned_shards(tars)
    assert json.loads((folder / "train.manifest.json").read_text())["sample_members"] == ["jpg", "json", "txt"]
    common = [f"data.train={folder}/train-*.tar", f"data.val={folder}/val-*.tar", "data.img_size=16",
              "data.local_shuffle_buffer=0", "data.decode_batch_size=4", "model.args={depth: 1}",
              "train.objective=mae", "mae.decoder_embed_dim=16", "mae.decoder_depth=1", "mae.decoder_num_heads=2",
              "mae.recon_images=4", "train.num_workers=1", "train.global_batch_size=4", "train.steps=6",
              "train.checkpoint_every_n_steps=2", "train.eval_every_n_steps=2", "train.log_every_n_steps=1",
              "optim.warmup_steps=1", "optim.lr=2e-3", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    args = {"config": "jobs/configs/digits_mae_pretrain.yaml", "common": common, "folder": str(tmp_path)}
    done = subprocess.run([sys.executable, str(PROGRAM), json.dumps(args)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    [line] = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    out = json.loads(line[len("RESULTS "):])

    # no label anywhere: no class, no head, no k-NN monitor
    assert out["classes"] == [] and out["model_args"]["num_classes"] == 0 and not out["model_args"]["fc_norm"]
    first, second = out["attempts"]
    assert [first["step"], second["step"]] == [4, 6]
    assert [r["step"] for r in first["reports"] + second["reports"]] == [2, 4, 6]  # every 2 steps, none twice
    final = second["reports"][-1]
    assert {"val/loss", "val/baseline_loss", "val/loss_ratio", "val/images"} <= set(final)
    assert not any("knn" in key for key in final)
    assert final["val/images"] == 6
    # predicting each 4x4 patch's mean (48 values) under norm_pix_loss: (48 - 1) / 48 of a unit variance
    assert final["val/baseline_loss"] == pytest.approx(47 / 48, abs=2e-3)
    assert final["val/loss_ratio"] == pytest.approx(final["val/loss"] / final["val/baseline_loss"], rel=1e-9)
    assert final["checkpoint_score"] == -final["last_val/loss"]  # the lower the val loss, the better the checkpoint
    # the step lines: the objective's val part; the resumed attempt goes on at step 5
    steps = [line.split()[1] for line in out["lines"] if line.startswith("step ")]
    assert steps == ["1/6", "2/6", "3/6", "4/6", "5/6", "6/6"]
    assert sum("| val loss " in line and "of predict-the-mean)" in line for line in out["lines"]) == 3
    # the exported weights: the encoder alone, with timm's keys (loaded strictly in the program)
    assert "pos_embed" in out["weight_keys"] and "norm.weight" in out["weight_keys"]
    assert not any(key.startswith(("decoder_", "mask_token", "head", "fc_norm")) for key in out["weight_keys"])

    # the checkpointer restores the last checkpoint; the validator is due every 2 steps and at the last
    assert out["restored"] == {"step": 6, "epoch": 0, "stored_at": second["checkpoints"][-1], "ema": False}
    assert out["due"] == [2, 4, 6]
    # the val masks are the samples' own: the same weights give the run's own figure, at any batch size
    for metrics in out["evals"].values():
        assert metrics["val/loss"] == pytest.approx(final["val/loss"], rel=1e-6)
        assert metrics["val/images"] == 6
    # the picture: 4 samples in 2 rows of 2, each original | masked input | reconstruction, drawn at least 96 px
    # high, white lines between samples and panels
    height, width, channels = out["picture_shape"]
    assert channels == 3 and height == (2 * 16 + 1) * 6 and width == (2 * (3 * 16 + 2) + 1) * 6
    assert out["first_sample"]["key"] == [0, 0]
    assert out["first_sample"]["original_equal"] and out["first_sample"]["visible_pasted"]
    assert out["first_sample"]["gaps_white"]
    assert out["first_sample"]["masked_fraction"] == pytest.approx(0.75, abs=0.03)


def test_two_ranks_evaluate_as_one_process_does_knn_and_pictures_included(tars, tmp_path):
    """The same weights evaluated by one process and by two gloo ranks that each read every other sample: the
    same val loss (each image's mask is its own), the same k-NN top-1 (each rank searches the bank all ranks
    gathered), and the same picture (the first samples of the whole split, gathered on rank 0)."""
    for s, size in enumerate((7, 9, 8)):
        tars.write(f"l/train-{s:06d}.tar", [tars.good_record(f"{s}{i:04d}", label=(s + i) % 3, seed=10 * s + i)
                                            for i in range(size)])
    for s, size in enumerate((5, 6)):
        tars.write(f"l/val-{s:06d}.tar", [tars.good_record(f"v{s}{i:03d}", label=i % 3, seed=100 + 10 * s + i)
                                          for i in range(size)])
    for split in ("train", "val"):
        index_shards(str(tars.folder / "l" / f"{split}-*.tar"), classes=["a", "b", "c"], progress=False)
    folder = tars.folder / "l"
    overrides = [f"data.train={folder}/train-*.tar", f"data.val={folder}/val-*.tar", "data.img_size=16",
                 "data.decode_batch_size=4", "model.args={depth: 1}", "mae.decoder_embed_dim=16",
                 "mae.decoder_depth=1", "mae.decoder_num_heads=2", "mae.knn_train_samples=15", "mae.knn_k=4",
                 "mae.recon_images=5", "train.num_workers=1", "train.global_batch_size=4",
                 f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]

    def start(rank: int, world: int, port: int) -> subprocess.Popen:
        spec = {"rank": rank, "world": world, "port": port, "config": "jobs/configs/digits_mae_pretrain.yaml",
                "overrides": overrides}
        return subprocess.Popen([sys.executable, str(EVAL_PROGRAM), json.dumps(spec)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    port = free_port()
    processes = [start(0, 1, free_port()), start(0, 2, port), start(1, 2, port)]
    outs = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
        [line] = [line for line in stdout.splitlines() if line.startswith("RESULTS ")]
        outs.append(json.loads(line[len("RESULTS "):]))
    alone, rank0, rank1 = outs
    assert alone["splits"] == ["knn_bank", "val"]  # both splits have labels: the monitor is on
    assert alone["metrics"]["val/images"] == 11 and alone["metrics"]["val/knn_bank"] == 16  # 2 train shards: 7 + 9
    for ranked in (rank0, rank1):
        assert ranked["metrics"].keys() == alone["metrics"].keys()
        for key, value in alone["metrics"].items():
            assert ranked["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert alone["picture"] == rank0["picture"] and rank1["picture"] is None
    assert alone["picture"][0][2] == 3
