"""The driver side of a training job: its command line, Ray, `TorchTrainer.fit()`, and the outcome in MLflow.

    parse_job_args(argv)     --config, overrides, --local-cpus, --dry-run; the console
    resolve_job(job, kind)   (resolved_job.py) every check before Ray starts, one ResolvedJob
    start_ray(...)           attach to RAY_ADDRESS (ray job submit), or start the embedded local instance
    run_job(run, ...)        MLflow run -> TorchTrainer.fit() -> artifacts -> JobResult; JobFailed when it fails

Locations (shards, checkpoints, storage_path, init_from) stay URIs with their scheme throughout; see
pipeline/storage.py.
"""

import dataclasses
import logging
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ray.train import UserCallback

from pipeline import console, storage
from pipeline.train.context import JobFailed
from pipeline.train.objectives import build_objective
from pipeline.train.resolved_job import ResolvedJob

log = logging.getLogger(__name__)


# After a node is lost or drained, Ray Train's elastic policy sizes the new worker group from a view of the cluster
# that Ray refreshes every 20 s, so its first try may count the node that just went; that try waits this long for
# workers that never come before it sizes the group again (Ray's default is 60 s). The resources are there when the
# policy decides, so a group that can start starts well within it.
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
ELASTIC_START_TIMEOUT_S = 30


@dataclass
class JobResult:
    run_id: str
    tracking_uri: str
    checkpoint_path: str  # the final checkpoint (DeepSpeed shards + model.safetensors + config.json), a location
    metrics: dict  # the last report: step, val/top1, ...
    wall_time_s: float
    storage_path: str
    run_name: str
    model_uri: str = ""  # models:/<id> of the final checkpoint's logged model, when it was made
    registered: str = ""  # models:/<name>/<version> with tracking.register_as


def parse_job_args(argv, *, doc: str, demo_config, sections: str, overrides_help: str):
    """The command line every training job takes: --config, section.key=value overrides, --local-cpus,
    --dry-run. Also sets up the job's console logging (our INFO lines, other libraries' warnings)."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"job YAML (sections {sections}); default {demo_config}")
    parser.add_argument("overrides", nargs="*", help=overrides_help)
    parser.add_argument("--local-cpus", type=int, default=None,
                        help="logical CPUs of the embedded local Ray (ignored when RAY_ADDRESS is set)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the job (config, shards, model, init weights, tracking store), print the resolved "
                             "job, and stop before Ray starts")
    args = parser.parse_args(argv)
    console.driver_console()
    return args


def start_ray(local_num_cpus: int | None = None):
    """Attach to a running cluster (RAY_ADDRESS, as `ray job submit` sets it) or start the embedded local Ray
    with its dashboard on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return ray
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(num_cpus=local_num_cpus, **own_dashboard())
    return ray


def own_dashboard() -> dict:
    """`ray.init` options for a local Ray whose processes ask its own dashboard for Ray's state API.

    Ray Train's PlacementGroupCleaner asks the state API whether the controller is alive, at the address in
    RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else the newest `ray start` cluster on the host. Another cluster's
    finds no such actor: the cleaner takes the controller for dead and removes the placement group, killing the
    workers mid-run. The job's runtime_env sets RAY_API_SERVER_ADDRESS to this Ray's dashboard in all its
    processes; the port is fixed here, so Ray fails to start rather than serve the dashboard on another one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port,
            "runtime_env": {"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}}


def run_job(run: ResolvedJob, init_state=None) -> JobResult:
    """Create the MLflow run, train under Ray Train, log the artifacts. `init_state`: a fine-tune's starting
    weights, which reach the workers through the object store. The device (from the cluster's GPUs) and the
    MLflow run id are set on `run` here. If training fails, the run is FAILED and JobFailed says why in one
    line."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    from pipeline.internals import pin_data_stats_to_this_node
    from pipeline.tracking.runs import finish_run, start_job_run
    from pipeline.train.ray_context import train_loop_per_worker

    finished = finished_message(run)
    if finished:
        raise RunFinished(finished)
    start_ray()
    train_cfg = run.job.train
    verbose = console.is_verbose(train_cfg.verbose)
    console.quiet_driver(verbose)  # and worker_runtime_env below: the known library lines (pipeline/console.py)
    use_gpu = train_cfg.device == "cuda" or (train_cfg.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    job = dataclasses.replace(run.job, train=dataclasses.replace(train_cfg, device="cuda" if use_gpu else "cpu"))
    run = dataclasses.replace(run, job=job)
    tags = {"pipeline.init_from": run.init.spec} if run.init else {}
    run_id = start_job_run(uri=run.tracking_uri, experiment=job.tracking.experiment,
                           run_name=job.tracking.run_name or run.run_name, job=run.kind, config=run.params(),
                           parent_run_id=(run.init.parent_run_id or None) if run.init else None, extra_tags=tags)
    run = dataclasses.replace(run, mlflow_run_id=run_id)
    record_inputs(run)
    log.info("MLflow run %s in %s; checkpoints under %s/%s", run_id, run.tracking_uri, run.storage_path, run.run_name)
    resources = {**train_cfg.worker_resources, "CPU": train_cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": run, "init_state": ray.put(init_state) if init_state is not None else None},
        # a [min, max] range is elastic: Ray Train starts as many workers as the cluster holds, and restarts the
        # group from the latest checkpoint when a node is lost or more workers fit (every resize_check_s)
        scaling_config=ScalingConfig(num_workers=train_cfg.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=train_cfg.resize_check_s),
        run_config=RunConfig(name=run.run_name, storage_path=run.storage_path, callbacks=[EndOnJobFailed()],
                             worker_runtime_env=console.worker_runtime_env(verbose),
                             failure_config=FailureConfig(max_failures=train_cfg.max_failures),
                             checkpoint_config=checkpoint_config(run.job)),
    )
    if isinstance(train_cfg.num_workers, tuple):
        os.environ.setdefault(START_TIMEOUT_ENV, str(ELASTIC_START_TIMEOUT_S))  # Ray Train passes it to its controller
    pin_data_stats_to_this_node()
    start = time.perf_counter()
    try:
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError("training finished without a checkpoint")
        checkpoint = storage.to_uri(run.storage_path, result.checkpoint.path)  # Ray gives the path without a scheme
        model_uri = record_outcome(run, checkpoint)
        registered = ""
        if job.tracking.register_as:
            from pipeline.tracking.models import register_best

            objective = build_objective(job, run.model_args)
            version = register_best(run.tracking_uri, run_id, job.tracking.register_as, objective.score_metric,
                                    objective.higher_is_better)
            registered = f"models:/{version.name}/{version.version}" if version else ""
    except TrainingFailedError as err:
        finish_run(run.tracking_uri, run_id, "FAILED")
        raise JobFailed(failure_message(err, train_cfg.max_failures)) from None
    except BaseException:
        finish_run(run.tracking_uri, run_id, "FAILED")
        raise
    finish_run(run.tracking_uri, run_id, "FINISHED")
    return JobResult(run_id=run_id, tracking_uri=run.tracking_uri, checkpoint_path=checkpoint,
                     metrics=dict(result.metrics or {}), wall_time_s=time.perf_counter() - start,
                     storage_path=run.storage_path, run_name=run.run_name, model_uri=model_uri, registered=registered)


class RunFinished(Exception):
    """The run name already holds a checkpoint at the step the job trains to: nothing is trained, no MLflow run is
    made. Its message says where the run and its checkpoint are."""


def finished_message(run: ResolvedJob) -> str:
    """"" unless `train.storage_path`/`run name` holds a checkpoint at or past the step this job would train to
    (`train.stop_after_steps`, else `train.steps`); then what to tell the user instead of making an empty run."""
    from pipeline.train.checkpoint import CONFIG_FILE, STATE_FILE, kept_checkpoints, read_checkpoint_json

    try:
        kept = kept_checkpoints(storage.join(run.storage_path, run.run_name))
    except OSError:  # a store that refuses the listing: Ray Train's own storage check names it
        return ""
    if not kept:
        return ""
    try:
        step = read_checkpoint_json(kept[0], STATE_FILE)["step"]
        run_id = read_checkpoint_json(kept[0], CONFIG_FILE).get("mlflow_run_id", "")
    except (OSError, ValueError, KeyError):  # not readable: the resume decides what to do with it
        return ""
    stop = run.job.train.stop_after_steps or run.job.train.steps
    if step < stop:
        return ""
    return (f"run {run.run_name} is already at step {step} of {stop}: its checkpoint {kept[0]}"
            f"{f' (MLflow run {run_id})' if run_id else ''}; nothing to train. Raise train.steps to train further, "
            "or give another train.run_name")


def checkpoint_config(job):
    """Ray keeps the newest `train.keep_checkpoints`, or, when the best checkpoint is to be registered, the best
    ones by the objective's score (`checkpoint_score` in the report: val/top1, or MAE's val loss); the latest is
    always kept, to resume from."""
    from ray.train import CheckpointConfig

    from pipeline.train.checkpoint import SCORE_KEY

    if job.tracking.register_as:
        return CheckpointConfig(num_to_keep=job.train.keep_checkpoints, checkpoint_score_attribute=SCORE_KEY,
                                checkpoint_score_order="max")
    return CheckpointConfig(num_to_keep=job.train.keep_checkpoints)


def record_inputs(run: ResolvedJob) -> None:
    """The run's inputs in MLflow: its train and val shards as datasets (with a fine-tune's parent's), and the
    logged model a fine-tune starts from. A failure is a warning: they describe the run, training needs none."""
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelInput

    from pipeline.tracking.datasets import log_datasets

    try:
        client = MlflowClient(run.tracking_uri)
        log_datasets(client, run.mlflow_run_id, train=run.train_shards, val=run.val_shards,
                     parent_run_id=run.init.parent_run_id if run.init else "")
        if run.init and run.init.model_id:
            client.log_inputs(run.mlflow_run_id, models=[LoggedModelInput(run.init.model_id)])
    except Exception as exc:
        log.warning("MLflow: the run's datasets and init model not recorded (%s)", " ".join(str(exc).split())[:200])


class EndOnJobFailed(UserCallback):
    """Ends the run when a worker raises JobFailed, instead of restarting the worker group for it. Ray Train
    calls this on its controller after it polls a worker error; an exception raised here is a controller
    error, which its failure policy does not retry."""

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        for error in worker_exceptions.values():
            if isinstance(error, JobFailed):
                raise error


def failure_message(err: Exception, max_failures: int) -> str:
    """One line for a failed `fit()`: a worker's JobFailed as it is; otherwise the first worker error, after
    the restarts that `train.max_failures` allowed."""
    cause = getattr(err, "controller_failure", None)
    if isinstance(cause, JobFailed):
        return str(cause)
    failures = getattr(err, "worker_failures", None) or {}
    first = next(iter(sorted(failures.items())), None)
    what = f"rank {first[0]}: {type(first[1]).__name__}: {str(first[1]).strip().splitlines()[0]}" if first else \
        str(err).strip().splitlines()[-1]
    return (f"training failed after {max_failures} restart(s) of the worker group (train.max_failures); {what} "
            "(the workers' tracebacks are above)")


def print_outcome(result: JobResult) -> None:
    """A finished job's last lines: where its checkpoint and its logged model are, and where to look at the run."""
    from pipeline.tracking.runs import run_page

    print(f"checkpoint:      {result.checkpoint_path}")
    if result.model_uri:
        print(f"logged model:    {result.model_uri}" + (f" (best: {result.registered})" if result.registered else ""))
    print(f"look at it:      {run_page(result.tracking_uri, result.run_id)}")


def end_job(err: JobFailed) -> int:
    """A job main's end after a failure: Ray is let go first, so that its log lines do not follow ours."""
    import ray

    ray.shutdown()
    print(f"error: {err}", file=sys.stderr)
    return 1


def record_outcome(run: ResolvedJob, checkpoint_path: str) -> str:
    """Artifacts: the resolved job and the curves; the consolidated weights of a local checkpoint go into the
    final checkpoint's logged model (models.py). The tag `pipeline.checkpoint` holds the checkpoint's location
    (a URI for remote storage), which `runs:/<id>` follows; weights on remote storage are not copied into
    MLflow, and the job says so. Returns models:/<id> of the final checkpoint, "" when it has no model."""
    from mlflow import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_IS_EXTERNAL

    from pipeline.tracking.models import CHECKPOINT_TAG, checkpoint_models
    from pipeline.tracking.plots import metric_histories, plot_curves
    from pipeline.tracking.runs import log_run_artifacts
    from pipeline.train.checkpoint import CONFIG_FILE, EMA_WEIGHTS_FILE, WEIGHTS_FILE

    job, run_id, tracking_uri = run.job, run.mlflow_run_id, run.tracking_uri
    client = MlflowClient(tracking_uri)
    curves = build_objective(job, run.model_args).curves
    figure = plot_curves(metric_histories(tracking_uri, [run_id], metrics=curves), metrics=curves,
                         title=job.tracking.run_name or run_id)
    log_run_artifacts(tracking_uri, run_id, config_yaml=run.to_yaml(), figures={"curves": figure})
    final = next((m for m in checkpoint_models(client, run_id) if m.tags.get(CHECKPOINT_TAG) == checkpoint_path),
                 None)
    if final is None:
        log.warning("MLflow: no logged model of the final checkpoint %s; its weights stay there only", checkpoint_path)
    elif job.tracking.log_weights and not storage.is_remote(checkpoint_path):
        with tempfile.TemporaryDirectory() as weights_dir:
            for name in (WEIGHTS_FILE, EMA_WEIGHTS_FILE, CONFIG_FILE):  # links: the weights are not copied twice
                if (Path(checkpoint_path) / name).exists():
                    os.symlink(Path(checkpoint_path) / name, Path(weights_dir) / name)
            client.log_model_artifacts(final.model_id, weights_dir)
        client.delete_logged_model_tag(final.model_id, MLFLOW_MODEL_IS_EXTERNAL)
    elif job.tracking.log_weights:
        log.info("weights not copied into MLflow: the checkpoint is on remote storage, and the run links to it "
                 "(tag %s = %s)", CHECKPOINT_TAG, checkpoint_path)
    client.set_tag(run_id, CHECKPOINT_TAG, checkpoint_path)
    return f"models:/{final.model_id}" if final else ""
