"""Curves of several runs: one subplot per metric, one line per run; histories read back from a real store."""

from __future__ import annotations

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.tracking.plots import metric_histories, plot_curves
from pipeline.tracking.runs import start_job_run

HISTORIES = {
    "pretrain-32px": {"train/loss": [(10, 1.5), (0, 2.3), (20, 1.1)], "val/top1": [(10, 0.6), (20, 0.8)]},
    "finetune-64px": {"train/loss": [(0, 1.2), (10, 0.7)], "val/top1": [(10, 0.85)]},
    "finetune-64px-ema": {"train/loss": [(0, 1.2), (10, 0.69)], "val/top1": [(10, 0.87)]},
}


def test_one_subplot_per_metric_one_line_per_run(tmp_path):
    figure = plot_curves(HISTORIES)
    assert isinstance(figure.canvas, FigureCanvasAgg)  # drawn without pyplot or a GUI backend
    axes = figure.get_axes()
    assert [ax.get_title() for ax in axes] == ["train/loss", "val/top1"]
    for ax in axes:
        assert len(ax.get_lines()) == 3
        assert [line.get_label() for line in ax.get_lines()] == list(HISTORIES)
        assert [text.get_text() for text in ax.get_legend().get_texts()] == list(HISTORIES)
        assert ax.get_xlabel() == "step"
    pretrain_loss = axes[0].get_lines()[0]
    assert list(pretrain_loss.get_xdata()) == [0, 10, 20]  # sorted by step
    assert list(pretrain_loss.get_ydata()) == [2.3, 1.5, 1.1]
    path = tmp_path / "curves.png"
    figure.savefig(path, dpi=60)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (int(10.0 * 60), int(3.8 * 60))
        assert len(image.getcolors(maxcolors=1 << 20)) > 10  # something was drawn, not a blank canvas


def test_a_run_without_a_metric_gets_no_line_there():
    figure = plot_curves({"a": {"train/loss": [(0, 1.0)]}, "b": {"train/loss": [(0, 2.0)], "val/top1": [(5, 0.5)]}})
    loss_ax, top1_ax = figure.get_axes()
    assert len(loss_ax.get_lines()) == 2
    assert [line.get_label() for line in top1_ax.get_lines()] == ["b"]
    empty = plot_curves({"a": {}}, metrics=("val/top5",)).get_axes()[0]
    assert len(empty.get_lines()) == 0 and [t.get_text() for t in empty.texts] == ["no data"]


def test_plot_curves_needs_a_metric():
    with pytest.raises(ValueError, match="at least one metric"):
        plot_curves(HISTORIES, metrics=())


def test_metric_histories_reads_runs_back_and_keeps_the_last_value_per_step(sqlite_uri):
    client = MlflowClient(tracking_uri=sqlite_uri)
    run_ids = [
        start_job_run(uri=sqlite_uri, experiment="curves", run_name=name, job="pretrain", config={})
        for name in ("vit", "vit", "vit-ft")
    ]
    for i, run_id in enumerate(run_ids):
        metrics = [Metric("train/loss", 2.0 - step / 10 - i, 1000 + step, step) for step in range(5)]
        metrics += [Metric("val/top1", 0.5 + i / 10, 2000, 4)]
        client.log_batch(run_id, metrics=metrics)
    # a resumed run repeats steps after its checkpoint; the value logged last is the one that counts
    client.log_batch(run_ids[0], metrics=[Metric("train/loss", 9.0, 5000, 3)])

    by_id = metric_histories(sqlite_uri, run_ids, ("train/loss", "val/top1"))
    assert list(by_id) == run_ids
    assert by_id[run_ids[0]]["train/loss"] == [(0, 2.0), (1, 1.9), (2, 1.8), (3, 9.0), (4, 1.6)]
    assert by_id[run_ids[2]]["val/top1"] == [(4, 0.7)]

    by_name = metric_histories(sqlite_uri, run_ids, ("train/loss", "val/top1"), label_by="run_name")
    assert list(by_name) == [f"vit ({run_ids[0][:8]})", f"vit ({run_ids[1][:8]})", "vit-ft"]
    figure = plot_curves(by_name)
    assert [len(ax.get_lines()) for ax in figure.get_axes()] == [3, 3]
