"""The driver side of a training job: check everything before Ray starts, then `TorchTrainer.fit()`, then
record the outcome in MLflow.

    prepare_job(job)      config-level checks that need the model or the data: one clear error, no Ray yet
    resolve_init(job)     fine-tuning: the weights init_from names, and the resolution to fine-tune at
    start_ray(...)        attach to RAY_ADDRESS (ray job submit), or start the embedded local instance
    run_job(job, ...)     MLflow run -> TorchTrainer.fit() -> artifacts -> JobResult; JobFailed when it fails

Locations (shards, checkpoints, storage_path, init_from) stay URIs with their scheme throughout; see
pipeline/storage.py.
"""

import dataclasses
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ray.train import UserCallback

from pipeline import storage
from pipeline.config import ConfigError, JobConfig
from pipeline.train.context import JobFailed
from pipeline.train.loop import RunInputs, train_loop_per_worker

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    run_id: str
    tracking_uri: str
    checkpoint_path: str  # the final checkpoint (DeepSpeed shards + model.safetensors + config.json), a location
    metrics: dict  # the last report: step, val/top1, ...
    wall_time_s: float
    storage_path: str
    run_name: str


def absolute_shard_spec(spec: str | list[str]) -> str | list[str]:
    """Workers do not share the driver's current directory: local relative paths become absolute."""
    def absolute(path: str) -> str:
        return path if storage.is_remote(path) or os.path.isabs(path) else os.path.abspath(path)
    return absolute(spec) if isinstance(spec, str) else [absolute(p) for p in spec]


def storage_error(key: str, spec, err: Exception) -> ConfigError:
    """One line for a location that cannot be read; for remote ones, where the store's settings come from."""
    first = spec if isinstance(spec, str) else (spec[0] if spec else "")
    hint = "" if isinstance(err, FileNotFoundError) or not storage.is_remote(str(first)) else (
        " (credentials, endpoint and region come from the AWS_* variables or the instance role; under ray job "
        "submit pass them in --runtime-env-json env_vars: docs/operations.md)")
    return ConfigError(f"{key}: {err}{hint}")


def prepare_job(job: JobConfig) -> tuple[JobConfig, RunInputs]:
    """Resolve paths, read the train manifest for the classes, and build the model on the meta device so that
    an impossible architecture fails here, with one line, before Ray starts. Raises ConfigError."""
    import torch

    from pipeline.data.shard_specs import expand_shards
    from pipeline.model import preset_kwargs
    from pipeline.model.vit import VisionTransformer
    from pipeline.train.data_feed import ShardCatalog

    if not job.data.train:
        raise ConfigError("data.train is empty: give the training shards (a list, a glob or a brace pattern)")
    data = dataclasses.replace(job.data, train=absolute_shard_spec(job.data.train),
                               val=absolute_shard_spec(job.data.val) if job.data.val else "")
    try:
        catalog = ShardCatalog(data.train)
    except (OSError, ValueError) as err:  # missing shards or manifest, a store refusing access
        raise storage_error("data.train", data.train, err) from err
    problem = catalog.manifest.label_problem(data.label_key)
    if problem:
        raise ConfigError(f"data.train: {problem}")
    if data.val:
        try:
            expand_shards(data.val)
        except (OSError, ValueError) as err:
            raise storage_error("data.val", data.val, err) from err
    classes = catalog.classes or [str(i) for i in range(job.data.num_classes)]
    if job.data.num_classes and job.data.num_classes != len(classes):
        raise ConfigError(f"data.num_classes {job.data.num_classes} differs from the {len(classes)} classes "
                          "of the train manifest")
    if not classes:
        raise ConfigError("data.train: the manifest names no classes; set data.num_classes=N (labels 0..N-1), or "
                          "index the shards with `python jobs/make_shards.py --source shards:PATTERN --classes a,b,c`")
    data = dataclasses.replace(data, num_classes=len(classes))
    overrides = {"img_size": data.img_size, "num_classes": len(classes), "drop_path_rate": job.model.drop_path_rate,
                 "drop_rate": job.model.drop_rate, **job.model.args}
    if job.model.global_pool:
        overrides["global_pool"] = job.model.global_pool
    try:
        model_args = preset_kwargs(job.model.preset, **overrides)
        with torch.device("meta"):
            VisionTransformer(**model_args)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model: {err}") from err
    if job.train.resume_from:
        check_resumable(job.train.resume_from, model_args)
    from pipeline.tracking.runs import TrackingUnavailable, check_tracking_reachable, resolve_tracking_uri

    try:
        check_tracking_reachable(resolve_tracking_uri(job.tracking.uri))
    except TrackingUnavailable as err:
        raise ConfigError(str(err)) from err
    job = dataclasses.replace(job, data=data)
    return job, RunInputs(model_args=_plain(model_args), classes=classes)


def check_resumable(path: str, model_args: dict) -> None:
    """`train.resume_from` must be a checkpoint of this pipeline made by a model of the same shape."""
    import pyarrow.fs as pafs
    import torch

    from pipeline.model.vit import VisionTransformer
    from pipeline.train.checkpoint import DEEPSPEED_TAG, CheckpointMismatch, check_compatible

    try:
        if storage.file_type(path) != pafs.FileType.Directory:
            raise ConfigError(f"train.resume_from: {path} does not exist or is not a directory")
        has_state = storage.file_type(storage.join(path, DEEPSPEED_TAG)) == pafs.FileType.Directory
    except OSError as err:
        raise storage_error("train.resume_from", path, err) from err
    if not has_state:
        raise ConfigError(f"train.resume_from: {path} holds no DeepSpeed state ({DEEPSPEED_TAG}/), so training "
                          "cannot resume from it")
    with torch.device("meta"):
        model = VisionTransformer(**model_args)
    try:
        check_compatible(path, model)
    except (CheckpointMismatch, FileNotFoundError) as err:
        raise ConfigError(f"train.resume_from: {err}") from err


def parse_job_args(argv, *, doc: str, demo_config, sections: str, overrides_help: str):
    """The command line every training job takes: --config, section.key=value overrides, --local-cpus. Also
    sets up the job's console logging (our INFO lines, other libraries' warnings)."""
    import argparse
    import logging

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"job YAML (sections {sections}); default {demo_config}")
    parser.add_argument("overrides", nargs="*", help=overrides_help)
    parser.add_argument("--local-cpus", type=int, default=None,
                        help="logical CPUs of the embedded local Ray (ignored when RAY_ADDRESS is set)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the job (config, shards, model, init weights, tracking store), print the resolved "
                             "config, and stop before Ray starts")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("pipeline").setLevel(logging.INFO)
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
        ray.init(num_cpus=local_num_cpus, dashboard_host="127.0.0.1", include_dashboard=True)
    return ray


def resolve_init(job: JobConfig):
    """Fine-tuning: read the weights `init_from` names (by default the newest finished pretrain run of the
    job's experiment), and set the resolution: `model.img_size` when set, otherwise twice the one the weights
    were trained at, whichever way `init_from` is given. Returns (job, InitSource); raises ConfigError before
    Ray starts."""
    from pipeline.tracking.lineage import latest_pretrain_run_id
    from pipeline.tracking.runs import resolve_tracking_uri
    from pipeline.train.init_weights import locate_init

    uri = resolve_tracking_uri(job.tracking.uri)
    init_from = job.init_from
    if not init_from:
        run_id = latest_pretrain_run_id(uri, job.tracking.experiment)
        if run_id is None:
            raise ConfigError(f"no finished pretrain run in experiment {job.tracking.experiment!r} of {uri}; make "
                              "one with `python jobs/pretrain.py`, or give init_from=")
        init_from = f"runs:/{run_id}"
        log.info("init_from: the newest finished pretrain run of %r, %s", job.tracking.experiment, init_from)
    source = locate_init(init_from, uri)
    if job.model.img_size:
        img_size, why = job.model.img_size, "model.img_size"
    elif source.img_size:
        img_size = 2 * source.img_size
        why = f"twice the {source.img_size} px it was trained at; model.img_size chooses another"
    else:
        raise ConfigError(f"init_from: cannot tell the resolution {init_from} was trained at; set model.img_size")
    log.info("fine-tuning at %d px (%s)", img_size, why)
    job = dataclasses.replace(job, init_from=init_from, model=dataclasses.replace(job.model, img_size=img_size),
                              data=dataclasses.replace(job.data, img_size=img_size))
    return job, source


def prepare_init(job: JobConfig, inputs: RunInputs, source):
    """Check the weights of `source` (an InitSource) fit the model (on the meta device) and decide the head.
    Returns `InitWeights`; raises ConfigError before Ray starts."""
    import torch

    from pipeline.model.vit import VisionTransformer
    from pipeline.train.init_weights import load_init_weights

    with torch.device("meta"):
        model_state = VisionTransformer(**inputs.model_args).state_dict()
    return load_init_weights(source, model_state, reset_head=job.finetune.reset_head)


def run_finetune(job: JobConfig, inputs: RunInputs, init) -> JobResult:
    """A fine-tune: the prepared init weights go to the workers through the object store, and the run is
    linked to its source (tags `pipeline.parent_run_id`, `pipeline.init_from`; params of the resolution change)."""
    ray = start_ray()
    inputs = dataclasses.replace(inputs, init_weights=ray.put(init.state_dict), init_reset_head=init.reset_head)
    return run_job(job, inputs, job_name="finetune", parent_run_id=init.parent_run_id or None,
                   extra_tags={"pipeline.init_from": job.init_from},
                   extra_params={"pretrain_img_size": init.source_img_size, "img_size": job.data.img_size})


def run_job(job: JobConfig, inputs: RunInputs, *, job_name: str, parent_run_id: str | None = None,
            extra_tags: dict | None = None, extra_params: dict | None = None) -> JobResult:
    """Create the MLflow run, train under Ray Train, log the artifacts. If training fails, the run is FAILED and
    JobFailed says why in one line. `extra_params` are logged beside the flattened config (lineage such as
    `pretrain_img_size`)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    from pipeline.tracking.runs import default_store_dir, finish_run, resolve_tracking_uri, start_job_run

    tracking_uri = resolve_tracking_uri(job.tracking.uri)
    train_cfg = job.train
    run_name = train_cfg.run_name or f"{job_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage_path = train_cfg.storage_path or str(default_store_dir() / "runs")
    if not storage.is_remote(storage_path):
        storage_path = os.path.abspath(storage_path)
    use_gpu = train_cfg.device == "cuda" or (train_cfg.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    if not use_gpu and job.train.device == "auto":
        job = dataclasses.replace(job, train=dataclasses.replace(train_cfg, device="cpu"))
    run_id = start_job_run(uri=tracking_uri, experiment=job.tracking.experiment,
                           run_name=job.tracking.run_name or run_name, job=job_name,
                           config={**job.to_dict(), **(extra_params or {})}, parent_run_id=parent_run_id,
                           extra_tags=extra_tags)
    inputs = dataclasses.replace(inputs, tracking_uri=tracking_uri, mlflow_run_id=run_id,
                                 extra_config={**inputs.extra_config, "mlflow_run_id": run_id})
    log.info("MLflow run %s in %s; checkpoints under %s/%s", run_id, tracking_uri, storage_path, run_name)
    resources = {"CPU": train_cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job.to_dict(), "inputs": dataclasses.asdict(inputs)},
        scaling_config=ScalingConfig(num_workers=train_cfg.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=run_name, storage_path=storage_path, callbacks=[EndOnJobFailed()],
                             failure_config=FailureConfig(max_failures=train_cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=train_cfg.keep_checkpoints)),
    )
    pin_data_stats_to_this_node()
    start = time.perf_counter()
    try:
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError("training finished without a checkpoint")
        checkpoint = storage.to_uri(storage_path, result.checkpoint.path)  # Ray gives the path without a scheme
        record_outcome(job, tracking_uri, run_id, checkpoint)
    except TrainingFailedError as err:
        finish_run(tracking_uri, run_id, "FAILED")
        raise JobFailed(failure_message(err, train_cfg.max_failures)) from None
    except BaseException:
        finish_run(tracking_uri, run_id, "FAILED")
        raise
    finish_run(tracking_uri, run_id, "FINISHED")
    return JobResult(run_id=run_id, tracking_uri=tracking_uri, checkpoint_path=checkpoint,
                     metrics=dict(result.metrics or {}), wall_time_s=time.perf_counter() - start,
                     storage_path=storage_path, run_name=run_name)


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


def pin_data_stats_to_this_node() -> None:
    """Ray Data keeps one detached stats actor per cluster, for the cluster's lifetime, on the node of the process
    that first runs a dataset. Left to the rank-0 Train worker, that would keep a trainer (GPU) node from ever
    scaling down; created by the driver, it lives on the driver's node (the head under `ray job submit`)."""
    try:
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError:  # another Ray layout: the actor then lands wherever the first dataset runs
        log.warning("could not pin Ray Data's stats actor to the driver's node")
        return
    get_or_create_stats_actor()


def record_outcome(job: JobConfig, tracking_uri: str, run_id: str, checkpoint_path: str) -> None:
    """Artifacts: the resolved config, the curves, and the consolidated weights of a local checkpoint. The tag
    `pipeline.checkpoint` holds the checkpoint's location (a URI for remote storage), which `runs:/<id>`
    follows; weights on remote storage are not copied into MLflow, and the job says so."""
    from mlflow import MlflowClient

    from pipeline.tracking.lineage import CHECKPOINT_TAG
    from pipeline.tracking.plots import metric_histories, plot_curves
    from pipeline.tracking.runs import log_run_artifacts
    from pipeline.train.checkpoint import CONFIG_FILE, EMA_WEIGHTS_FILE, WEIGHTS_FILE

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
        log_run_artifacts(tracking_uri, run_id, config_yaml=job.to_yaml(), figures={"curves": figure}, files=files)
    MlflowClient(tracking_uri).set_tag(run_id, CHECKPOINT_TAG, checkpoint_path)


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return list(value)
    return value
