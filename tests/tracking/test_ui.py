"""MLflow's web UI, served by a real `mlflow server` (conftest's `server`), rendered by a real headless Chromium
(ui.py; `make test` installs it): what the pipeline records is what the UI shows. A run's page lists its
checkpoints' logged models, and the experiment's link opens on its runs table with the fine-tune under its
parent."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from pipeline.tracking.attempts import AttemptMetrics
from pipeline.tracking.runs import ensure_experiment, run_page, start_job_run
from tests.tracking.ui import INSTALL_HINT, experiment_page, find_browser, rendered_text


@pytest.fixture(scope="module")
def browser() -> str:
    """A headless Chromium is required, not optional: `make test` installs one."""
    path = find_browser()
    if path is None:
        pytest.fail(f"no headless Chromium on PATH for the UI tests; install it (as root): {INSTALL_HINT}")
    return path


def test_the_ui_shows_checkpoints_as_logged_models_and_the_finetune_under_its_pretrain(browser, server,
                                                                                      job_config, tmp_path):
    client = MlflowClient(server.uri)
    experiment = ensure_experiment(server.uri, "ui")
    pretrain = start_job_run(uri=server.uri, experiment="ui", run_name="pretrain-ui", job="pretrain",
                             config=job_config)
    metrics = AttemptMetrics(server.uri, pretrain, run_name="pretrain-ui", world_size=1, start_step=0,
                             model_params={"kind": "pretrain"})
    for step in (1, 2, 3, 4):
        metrics.log({"train/loss": 2.0 / step, **({"val/top1": 0.2 * step} if step % 2 == 0 else {})}, step)
        if step % 2 == 0:
            (tmp_path / f"checkpoint_{step}").mkdir()
            metrics.commit(step, str(tmp_path / f"checkpoint_{step}"))
    metrics.close("FINISHED")
    client.set_terminated(pretrain)
    finetune = start_job_run(uri=server.uri, experiment="ui", run_name="finetune-ui", job="finetune",
                             config=job_config, parent_run_id=pretrain)
    client.set_terminated(finetune)

    text = rendered_text(run_page(server.uri, pretrain)).splitlines()  # the link the job prints
    assert "pretrain-ui" in text
    assert {"pretrain-ui-step-2", "pretrain-ui-step-4"} <= set(text), text  # its "Logged models" table
    # the runs table, not the GenAI overview; the fine-tune is nested under the pretrain, collapsed, as a child run
    # is in MLflow's table (a top-level run would be listed), and the pretrain's attempt run too
    text = rendered_text(experiment_page(server.uri, experiment)).splitlines()
    assert "pretrain-ui" in text and "finetune-ui" not in text and "pretrain-ui attempt 1" not in text, text
