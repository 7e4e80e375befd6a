"""Curves of several runs side by side: metric histories read from MLflow, drawn with matplotlib's Agg canvas.

Figures are built as `matplotlib.figure.Figure` objects on an Agg canvas, not through pyplot: no GUI
backend, no global figure registry that leaks memory in a long-lived driver, and safe off the main thread.

    histories = metric_histories(uri, [pretrain_id, finetune_id], ("train/loss", "val/top1"), label_by="run_name")
    figure = plot_curves(histories)       # one subplot per metric, one line per run
    figure.savefig("curves.png")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DEFAULT_METRICS = ("train/loss", "val/top1")

Series = list[tuple[int, float]]


def plot_curves(
    histories: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]],
    metrics: tuple[str, ...] = DEFAULT_METRICS,
    *,
    title: str = "",
) -> Figure:
    """One subplot per metric, one line per run label against step; a run without a metric gets no line there."""
    if not metrics:
        raise ValueError("plot_curves needs at least one metric name")
    figure = Figure(figsize=(5.0 * len(metrics), 3.8), layout="constrained")
    FigureCanvasAgg(figure)  # attaches the Agg canvas, so savefig and draw need no pyplot backend
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        for label, by_metric in histories.items():
            points = sorted(by_metric.get(metric, ()))
            if not points:
                continue
            steps = [step for step, _ in points]
            values = [value for _, value in points]
            ax.plot(steps, values, label=str(label), linewidth=1.4, marker="." if len(points) < 30 else None)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="gray")
    if title:
        figure.suptitle(title)
    return figure


def metric_histories(
    uri: str,
    run_ids: Sequence[str],
    metrics: Sequence[str] = DEFAULT_METRICS,
    *,
    label_by: Literal["run_id", "run_name"] = "run_id",
) -> dict[str, dict[str, Series]]:
    """`{label: {metric: [(step, value), ...]}}` from MLflow, sorted by step, one value per step.

    When a step was logged more than once (a run resumed from a checkpoint repeats the steps after it), the
    value logged last wins. Labels are run ids, or run names made unique with a short id when they clash.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    labels = _labels(client, run_ids) if label_by == "run_name" else {run_id: run_id for run_id in run_ids}
    histories: dict[str, dict[str, Series]] = {}
    for run_id in run_ids:
        per_metric = {}
        for metric in metrics:
            latest: dict[int, tuple[int, float]] = {}  # step -> (timestamp, value)
            for point in client.get_metric_history(run_id, metric):
                if point.step not in latest or point.timestamp >= latest[point.step][0]:
                    latest[point.step] = (point.timestamp, point.value)
            per_metric[metric] = [(step, value) for step, (_, value) in sorted(latest.items())]
        histories[labels[run_id]] = per_metric
    return histories


def _labels(client, run_ids: Sequence[str]) -> dict[str, str]:
    names = {run_id: client.get_run(run_id).info.run_name or run_id for run_id in run_ids}
    counts: dict[str, int] = {}
    for name in names.values():
        counts[name] = counts.get(name, 0) + 1
    return {run_id: name if counts[name] == 1 else f"{name} ({run_id[:8]})" for run_id, name in names.items()}
