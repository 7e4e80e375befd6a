"""One value per step in the job's run across attempts of the worker group (pipeline/tracking/attempts.py), on a
sqlite store and on a real `mlflow server`: live metrics go to each attempt's own child run at once, and into the
job's run only when their checkpoint is committed, or, when a worker was lost before that, by the next attempt,
from what the checkpoint carries."""

import json
import subprocess
import sys

from mlflow.tracking import MlflowClient

from pipeline.tracking.attempts import AttemptMetrics
from pipeline.tracking.runs import JOB_RUNS, start_job_run

# attempt 1, in a process of its own that dies the way a lost worker does (os._exit: no flush, no close): it trains
# steps 1-7, checkpoint 3 is committed, and it is lost right after Ray committed checkpoint 6, before it could commit
# the metrics of steps 4-6; its metric sender (every 2 s) has not yet shipped anything, not even steps 1-3
LOST_ATTEMPT = """
import json, os, sys
from pipeline.tracking.attempts import AttemptMetrics

first = AttemptMetrics(sys.argv[1], sys.argv[2], run_name="pretrain-x", world_size=2, start_step=0)
for step in range(1, 8):
    first.log({"train/loss": 10.0 + step, "train/world_size": 2}, step=step)
    if step == 3:
        first.commit(3)
    if step == 6:
        carried = first.carried()  # into checkpoint 6
print(json.dumps({"carried": carried, "sent": first.committed.sent + first.live.sent, "run": first.attempt_run_id}))
sys.stdout.flush()
os._exit(0)
"""


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_each_step_reaches_the_job_run_once_though_its_attempt_was_lost_before_sending(any_store, job_config):
    client = MlflowClient(any_store)
    run_id = start_job_run(uri=any_store, experiment="attempts", run_name="pretrain-x", job="pretrain",
                           config=job_config)

    lost = json.loads(subprocess.run([sys.executable, "-c", LOST_ATTEMPT, any_store, run_id], check=True,
                                     capture_output=True, text=True, timeout=120).stdout)
    assert lost["sent"] == 0 and history(client, run_id, "train/loss") == []  # all of it was still queued
    assert [step for step, _, _ in lost["carried"]["steps"]] == [1, 2, 3, 4, 5, 6]

    # attempt 2 resumes from checkpoint 6 at world size 1: steps 1-6 come from the checkpoint, 7 on from its own
    second = AttemptMetrics(any_store, run_id, run_name="pretrain-x", world_size=1, start_step=6,
                            carried=lost["carried"])
    for step in range(7, 10):
        second.log({"train/loss": 20.0 + step, "train/world_size": 1}, step=step)
    assert [step for step, _, _ in second.carried()["steps"]] == [1, 2, 3, 4, 5, 6, 7, 8, 9]  # none known stored
    second.committed.flush()
    assert [step for step, _, _ in second.carried()["steps"]] == [7, 8, 9]  # only the ones not committed
    second.commit(9)
    second.close("FINISHED")

    assert history(client, run_id, "train/loss") == [(s, 10.0 + s) for s in range(1, 7)] + \
        [(s, 20.0 + s) for s in range(7, 10)]  # one value per step: the redone step 7 is the second attempt's
    assert [v for _, v in history(client, run_id, "train/world_size")] == [2] * 6 + [1] * 3
    stamps = {m.step: m.timestamp for m in client.get_metric_history(run_id, "train/loss")}
    assert [stamps[step] for step, _, _ in lost["carried"]["steps"]] == [t for _, t, _ in lost["carried"]["steps"]]
    attempts = sorted(client.search_runs([client.get_run(run_id).info.experiment_id],
                                         filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'"),
                      key=lambda run: int(run.data.tags["pipeline.attempt"]))
    assert [(r.info.status, r.data.tags["pipeline.world_size"], r.data.tags["pipeline.start_step"]) for r in attempts] \
        == [("KILLED", "2", "0"), ("FINISHED", "1", "6")]
    assert [r.info.run_name for r in attempts] == ["pretrain-x attempt 1", "pretrain-x attempt 2"]
    assert history(client, second.attempt_run_id, "train/loss") == [(s, 20.0 + s) for s in range(7, 10)]
    # the attempts are not job runs: comparisons and lineage see the job's run only
    experiment = client.get_run(run_id).info.experiment_id
    assert [r.info.run_id for r in client.search_runs([experiment], filter_string=JOB_RUNS)] == [run_id]


def test_a_resume_copies_only_the_steps_the_job_run_lacks_and_never_another_runs(any_store, job_config):
    client = MlflowClient(any_store)
    run_id = start_job_run(uri=any_store, experiment="attempts", run_name="pretrain-y", job="pretrain",
                           config=job_config)
    first = AttemptMetrics(any_store, run_id, run_name="pretrain-y", world_size=1, start_step=0)
    for step in range(1, 5):
        first.log({"train/loss": float(step), **({"val/top1": 0.5} if step == 2 else {})}, step=step)
    first.commit(2)
    first.committed.flush()
    carried = first.carried()  # steps 3-4; 1-2 are known stored
    assert [step for step, _, _ in carried["steps"]] == [3, 4]
    first.close("FINISHED")  # its close sends 1-2 only: 3-4 were never committed

    # a carried step the job's run already has (a commit the sender shipped before the loss) is not logged again
    first_stamp = client.get_metric_history(run_id, "train/loss")[0].timestamp
    again = {"run_id": run_id, "steps": [[1, first_stamp + 5, {"train/loss": 99.0}], *carried["steps"]]}
    AttemptMetrics(any_store, run_id, run_name="pretrain-y", world_size=1, start_step=4, carried=again).close("KILLED")
    assert history(client, run_id, "train/loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    assert history(client, run_id, "val/top1") == [(2, 0.5)]

    # train.resume_from another run's checkpoint: its metrics are that run's, and stay there
    other = start_job_run(uri=any_store, experiment="attempts", run_name="finetune-z", job="pretrain",
                          config=job_config)
    AttemptMetrics(any_store, other, run_name="finetune-z", world_size=1, start_step=4, carried=carried).close("KILLED")
    assert history(client, other, "train/loss") == []
