"""Comparison table and curves, and the lineage lookups a fine-tune starts from, on both kinds of store."""

import io
import os
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image

from pipeline.tracking.compare import CompareError, compare_runs, format_table, plot_comparison
from pipeline.tracking.lineage import LineageError, latest_pretrain_run_id, model_checkpoint, pretrain_run
from pipeline.tracking.models import create_checkpoint_model
from pipeline.tracking.runs import child_run_ids, finish_run, start_job_run


def make_run(uri, experiment, job, *, parent=None, img_size=32, top1=(0.5, 0.8), tags=None):
    run_id = start_job_run(uri=uri, experiment=experiment, run_name=f"{job}-{img_size}", job=job,
                           config={"data": {"img_size": img_size}}, parent_run_id=parent, extra_tags=tags)
    client = MlflowClient(uri)
    for step, (loss, speed) in enumerate([(2.0, 100.0), (1.5, 120.0), (1.2, 110.0)], start=1):
        client.log_metric(run_id, "train/loss", loss, step=step)
        client.log_metric(run_id, "train/images_per_s", speed, step=step)
    for step, value in zip((2, 3), top1, strict=True):
        client.log_metric(run_id, "val/top1", value, step=step)
    finish_run(uri, run_id)
    return run_id


def test_table_and_curves_have_one_entry_per_run(any_store):
    experiment = "compare-test"
    pretrain = make_run(any_store, experiment, "pretrain")
    finetune = make_run(any_store, experiment, "finetune", parent=pretrain, img_size=64, top1=(0.7, 0.9))
    rows = compare_runs(any_store, experiment=experiment)
    assert [row.run_id for row in rows] == [pretrain, finetune]
    assert rows[1].job == "finetune" and rows[1].parent_run_id == pretrain and rows[1].img_size == "64"
    assert rows[1].best_val_top1 == pytest.approx(0.9) and rows[0].steps == 3
    assert rows[0].images_per_s == pytest.approx(110.0)
    table = format_table(rows).splitlines()
    assert len(table) == 2 + 2 and f"| {pretrain[:8]} |" in table[3]

    figure = plot_comparison(any_store, rows)
    assert [len(ax.get_lines()) for ax in figure.axes] == [2, 2]  # val/top1 and train/loss, one line per run
    assert {line.get_label() for line in figure.axes[0].get_lines()} == {"pretrain-32", "finetune-64"}
    png = io.BytesIO()
    figure.savefig(png, format="png")
    assert Image.open(io.BytesIO(png.getvalue())).size[0] > 100

    assert [row.run_id for row in compare_runs(any_store, run_ids=[finetune])] == [finetune]
    assert [row.run_id for row in compare_runs(any_store, experiment=experiment, last=1)] == [finetune]
    assert [row.run_id for row in compare_runs(any_store, experiment=experiment, last=5)] == [pretrain, finetune]
    assert child_run_ids(any_store, pretrain) == [finetune]
    with pytest.raises(CompareError, match="no MLflow run 'nope'"):
        compare_runs(any_store, run_ids=["nope"])
    with pytest.raises(CompareError, match="no experiment 'missing'"):
        compare_runs(any_store, experiment="missing")


def test_lineage_lookups_and_their_errors(sqlite_uri, tmp_path):
    experiment = "lineage-test"
    assert latest_pretrain_run_id(sqlite_uri, experiment) is None
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"x")
    with_checkpoint = make_run(sqlite_uri, experiment, "pretrain", tags={"pipeline.checkpoint": str(checkpoint)})
    without_checkpoint = make_run(sqlite_uri, experiment, "pretrain")
    finetune = make_run(sqlite_uri, experiment, "finetune", parent=with_checkpoint)

    assert latest_pretrain_run_id(sqlite_uri, experiment) == without_checkpoint  # the newest finished one
    found = pretrain_run(sqlite_uri, with_checkpoint)
    assert found.checkpoint_dir == str(checkpoint) and found.img_size == 32
    with pytest.raises(LineageError, match="no MLflow run 'deadbeef'"):
        pretrain_run(sqlite_uri, "deadbeef")
    with pytest.raises(LineageError, match="is a 'finetune' run, not a pretrain run"):
        pretrain_run(sqlite_uri, finetune)
    with pytest.raises(LineageError, match="has no weights: neither its checkpoint folder"):
        pretrain_run(sqlite_uri, without_checkpoint)


def test_a_checkpoint_on_s3_is_followed_from_its_tag(sqlite_uri, tmp_path, s3_store):
    from pipeline import storage

    uri = s3_store.uri("lineage", tmp_path.name, "checkpoint_000002")
    fs, path = storage.resolve(uri)
    for name, body in (("model.safetensors", b"weights"), ("config.json", b"{}"), ("train_state.json", b"{}")):
        with fs.open_output_stream(f"{path}/{name}") as out:
            out.write(body)
    run_id = make_run(sqlite_uri, "lineage-s3", "pretrain", tags={"pipeline.checkpoint": uri})
    found = pretrain_run(sqlite_uri, run_id)
    assert found.downloaded and sorted(os.listdir(found.checkpoint_dir)) == ["config.json", "model.safetensors"]
    assert (Path(found.checkpoint_dir) / "model.safetensors").read_bytes() == b"weights"
    # the same checkpoint as a logged model: models:/<id> follows its location on the S3 endpoint as runs:/ does
    model_id = create_checkpoint_model(MlflowClient(sqlite_uri), experiment_id=MlflowClient(sqlite_uri).get_run(
        run_id).info.experiment_id, run_id=run_id, name="on-s3", step=2, location=uri, params={})
    by_model = model_checkpoint(sqlite_uri, f"models:/{model_id}")
    assert (by_model.downloaded, by_model.run_id, by_model.model_id) == (True, run_id, model_id)
    assert (Path(by_model.checkpoint_dir) / "model.safetensors").read_bytes() == b"weights"
    gone = make_run(sqlite_uri, "lineage-s3", "pretrain", tags={"pipeline.checkpoint": uri + "-deleted"})
    with pytest.raises(LineageError, match="has no weights: neither its checkpoint folder"):
        pretrain_run(sqlite_uri, gone)
