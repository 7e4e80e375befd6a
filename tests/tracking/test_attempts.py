"""One value per step in the job's run across attempts of the worker group (pipeline/tracking/attempts.py), on a
sqlite store and on a real `mlflow server`: live metrics go to each attempt's own child run at once, and into the
job's run only when their checkpoint is committed, or, when a worker was lost before that, by the next attempt."""

from mlflow.tracking import MlflowClient

from pipeline.tracking.attempts import AttemptMetrics
from pipeline.tracking.runs import JOB_RUNS, start_job_run


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_each_step_reaches_the_job_run_once_from_the_attempt_that_went_on(any_store, job_config):
    client = MlflowClient(any_store)
    run_id = start_job_run(uri=any_store, experiment="attempts", run_name="pretrain-x", job="pretrain",
                           config=job_config)

    # attempt 1 trains steps 1-7; checkpoint 3 is committed; it is lost after Ray committed checkpoint 6, before
    # it could commit the metrics of steps 4-6
    first = AttemptMetrics(any_store, run_id, run_name="pretrain-x", world_size=2, start_step=0)
    for step in range(1, 8):
        first.log({"train/loss": 10.0 + step, "train/world_size": 2}, step=step)
        if step == 3:
            first.commit(3)
    first.committed.flush()
    first.live.flush()  # its process dies here: no close()
    assert history(client, run_id, "train/loss") == [(s, 10.0 + s) for s in range(1, 4)]
    assert history(client, first.attempt_run_id, "train/loss") == [(s, 10.0 + s) for s in range(1, 8)]

    # attempt 2 resumes from checkpoint 6 at world size 1: steps 4-6 come from attempt 1's run, 7 on from its own
    second = AttemptMetrics(any_store, run_id, run_name="pretrain-x", world_size=1, start_step=6)
    for step in range(7, 10):
        second.log({"train/loss": 20.0 + step, "train/world_size": 1}, step=step)
    second.commit(9)
    second.close("FINISHED")

    assert history(client, run_id, "train/loss") == [(s, 10.0 + s) for s in range(1, 7)] + \
        [(s, 20.0 + s) for s in range(7, 10)]  # one value per step: the redone step 7 is the second attempt's
    assert [v for _, v in history(client, run_id, "train/world_size")] == [2] * 6 + [1] * 3
    attempts = sorted(client.search_runs([client.get_run(run_id).info.experiment_id],
                                         filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'"),
                      key=lambda run: int(run.data.tags["pipeline.attempt"]))
    assert [(r.info.status, r.data.tags["pipeline.world_size"], r.data.tags["pipeline.start_step"]) for r in attempts] \
        == [("KILLED", "2", "0"), ("FINISHED", "1", "6")]
    assert [r.info.run_name for r in attempts] == ["pretrain-x attempt 1", "pretrain-x attempt 2"]
    # the attempts are not job runs: comparisons and lineage see the job's run only
    experiment = client.get_run(run_id).info.experiment_id
    assert [r.info.run_id for r in client.search_runs([experiment], filter_string=JOB_RUNS)] == [run_id]
