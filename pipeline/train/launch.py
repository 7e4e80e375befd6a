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
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    from pipeline.internals import pin_data_stats_to_this_node
    from pipeline.tracking.runs import finish_run, start_job_run
    from pipeline.train.ray_context import train_loop_per_worker

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
                             checkpoint_config=CheckpointConfig(num_to_keep=train_cfg.keep_checkpoints)),
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
        record_outcome(run, checkpoint)
    except TrainingFailedError as err:
        finish_run(run.tracking_uri, run_id, "FAILED")
        raise JobFailed(failure_message(err, train_cfg.max_failures)) from None
    except BaseException:
        finish_run(run.tracking_uri, run_id, "FAILED")
        raise
    finish_run(run.tracking_uri, run_id, "FINISHED")
    return JobResult(run_id=run_id, tracking_uri=run.tracking_uri, checkpoint_path=checkpoint,
                     metrics=dict(result.metrics or {}), wall_time_s=time.perf_counter() - start,
                     storage_path=run.storage_path, run_name=run.run_name)


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


def end_job(err: JobFailed) -> int:
    """A job main's end after a failure: Ray is let go first, so that its log lines do not follow ours."""
    import ray

    ray.shutdown()
    print(f"error: {err}", file=sys.stderr)
    return 1


def record_outcome(run: ResolvedJob, checkpoint_path: str) -> None:
    """Artifacts: the resolved job, the curves, and the consolidated weights of a local checkpoint. The tag
    `pipeline.checkpoint` holds the checkpoint's location (a URI for remote storage), which `runs:/<id>`
    follows; weights on remote storage are not copied into MLflow, and the job says so."""
    from mlflow import MlflowClient

    from pipeline.tracking.lineage import CHECKPOINT_TAG
    from pipeline.tracking.plots import metric_histories, plot_curves
    from pipeline.tracking.runs import log_run_artifacts
    from pipeline.train.checkpoint import CONFIG_FILE, EMA_WEIGHTS_FILE, WEIGHTS_FILE

    job, run_id, tracking_uri = run.job, run.mlflow_run_id, run.tracking_uri
    curves = ("train/loss", "val/top1")
    figure = plot_curves(metric_histories(tracking_uri, [run_id], metrics=curves), metrics=curves,
                         title=job.tracking.run_name or run_id)
    with tempfile.TemporaryDirectory() as weights_dir:
        files = {}
        if job.tracking.log_weights and not storage.is_remote(checkpoint_path):
            for name in (WEIGHTS_FILE, EMA_WEIGHTS_FILE, CONFIG_FILE):  # links: the weights are not copied twice
                if (Path(checkpoint_path) / name).exists():
                    os.symlink(Path(checkpoint_path) / name, Path(weights_dir) / name)
            files = {"weights": weights_dir}
        elif job.tracking.log_weights:
            log.info("weights not copied into MLflow: the checkpoint is on remote storage, and the run links to it "
                     "(tag %s = %s)", CHECKPOINT_TAG, checkpoint_path)
        log_run_artifacts(tracking_uri, run_id, config_yaml=run.to_yaml(), figures={"curves": figure}, files=files)
    MlflowClient(tracking_uri).set_tag(run_id, CHECKPOINT_TAG, checkpoint_path)
