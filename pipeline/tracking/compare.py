"""Experiment comparison: one row per run (lineage, resolution, result, speed) and their curves overlaid.

    rows = compare_runs(uri, experiment="vit-pipeline")     # or run_ids=[...]
    print(format_table(rows))
    figure = plot_comparison(uri, rows)                      # val top-1 and train loss against step, per run

Works against the local sqlite store and a tracking server alike (only MlflowClient queries).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from mlflow import MlflowClient

from pipeline.tracking.plots import metric_histories, plot_curves
from pipeline.tracking.runs import JOB_RUNS

COMPARE_METRICS = ("val/top1", "train/loss")


class CompareError(ValueError):
    """Nothing to compare, or a run that does not exist; one line."""


@dataclass
class RunRow:
    run_id: str
    name: str
    job: str  # pipeline.job tag: pretrain, finetune
    parent_run_id: str
    img_size: str
    steps: int  # last step with a train/loss
    best_val_top1: float | None
    images_per_s: float | None  # median over the logged windows
    wall_time_s: float
    status: str


def compare_runs(uri: str, *, experiment: str | None = None, run_ids: list[str] | None = None,
                 last: int = 0) -> list[RunRow]:
    """Rows for `run_ids`, or for every run of `experiment` (its `last` newest when > 0), oldest first."""
    if last < 0:
        raise CompareError(f"last must be >= 0, got {last}")
    client = MlflowClient(uri)
    if run_ids:
        runs = [_get_run(client, run_id) for run_id in run_ids]
    else:
        found = client.get_experiment_by_name(experiment or "")
        if found is None:
            raise CompareError(f"no experiment {experiment!r} in {uri}")
        runs = client.search_runs([found.experiment_id], filter_string=JOB_RUNS,
                                  order_by=["attributes.start_time DESC"], max_results=last or 5000)[::-1]
        if not runs:
            raise CompareError(f"experiment {experiment!r} in {uri} has no runs")
    return [_row(client, run) for run in runs]


def _get_run(client: MlflowClient, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as err:
        raise CompareError(f"no MLflow run {run_id!r}") from err


def _row(client: MlflowClient, run) -> RunRow:
    run_id = run.info.run_id
    losses = client.get_metric_history(run_id, "train/loss")
    val = [m.value for m in client.get_metric_history(run_id, "val/top1")]
    speeds = [m.value for m in client.get_metric_history(run_id, "train/images_per_s")]
    end_ms = run.info.end_time or int(time.time() * 1000)
    return RunRow(
        run_id=run_id, name=run.info.run_name or run_id, job=run.data.tags.get("pipeline.job", ""),
        parent_run_id=run.data.tags.get("pipeline.parent_run_id", ""),
        img_size=run.data.params.get("data.img_size", ""), steps=max((m.step for m in losses), default=0),
        best_val_top1=max(val) if val else None, images_per_s=statistics.median(speeds) if speeds else None,
        wall_time_s=(end_ms - run.info.start_time) / 1000, status=run.info.status,
    )


def format_table(rows: list[RunRow]) -> str:
    """A markdown table, one row per run."""
    lines = ["| run | job | parent | img_size | steps | best val top-1 | img/s | wall time | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        top1 = f"{row.best_val_top1:.4f}" if row.best_val_top1 is not None else "-"
        speed = f"{row.images_per_s:.0f}" if row.images_per_s is not None else "-"
        minutes, seconds = divmod(int(row.wall_time_s), 60)
        lines.append(f"| {row.name} ({row.run_id[:8]}) | {row.job or '-'} | {row.parent_run_id[:8] or '-'} | "
                     f"{row.img_size or '-'} | {row.steps} | {top1} | {speed} | {minutes}m{seconds:02d}s | "
                     f"{row.status} |")
    return "\n".join(lines)


def plot_comparison(uri: str, rows: list[RunRow]):
    """val top-1 and train loss against step, one line per run, labelled with run names."""
    histories = metric_histories(uri, [row.run_id for row in rows], COMPARE_METRICS, label_by="run_name")
    return plot_curves(histories, COMPARE_METRICS, title=f"{len(rows)} runs")
