"""One resolved job: everything the driver decides before training, in one object.

`resolve_job(job, kind)` checks the config against the data, the model, the weights and the tracking store,
with one clear error (ConfigError) and before Ray starts, and returns a `ResolvedJob`: shard specs made
absolute and read once (`ShardSet`s, shipped to the workers), the classes, the model's arguments, the run
name, the checkpoint storage and the tracking store, and for a fine-tune where its weights come from and at
which resolution it trains. That one object is what the Train workers receive, what MLflow records as the
run's params (`params()`) and `config.yaml`, and what every checkpoint's `config.json` holds (`record()`).
Two facts are added when the job starts: the device (from the cluster's GPUs) and the MLflow run id.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass

import torch
import yaml

from pipeline import storage
from pipeline.config import ConfigError, JobConfig, plain
from pipeline.data.shard_set import ShardSet, read_shard_set
from pipeline.train.objectives import build_objective, objective_type

log = logging.getLogger(__name__)

KINDS = ("pretrain", "finetune")


@dataclass(frozen=True)
class InitPlan:
    """Where a fine-tune's weights come from (the tensors travel beside the job, through the object store)."""

    spec: str  # init_from, as resolved (runs:/<id> when it named no source)
    parent_run_id: str  # the pretrain run, when known
    source_img_size: int  # the resolution the weights were trained at; 0 when it cannot be told
    reset_head: bool  # the weights carry no head: the model keeps its fresh one
    model_id: str = ""  # the MLflow logged model the weights are, when known


@dataclass(frozen=True)
class ResolvedJob:
    kind: str  # "pretrain" or "finetune"
    job: JobConfig  # as resolved: absolute shard specs, the resolution, the class count
    model_args: dict  # VisionTransformer(**model_args)
    classes: list[str]
    train_shards: ShardSet
    val_shards: ShardSet | None
    run_name: str  # Ray Train's run name (same name + storage resumes)
    storage_path: str  # where Ray Train keeps checkpoints: a URI, or an absolute local path
    tracking_uri: str
    init: InitPlan | None = None  # fine-tuning only
    mlflow_run_id: str = ""  # set when the job starts; rank 0 logs step metrics into it

    def record(self) -> dict:
        """config.json and config.yaml: enough to rebuild the model anywhere (`VisionTransformer(**model_args)`)
        and to trace the run."""
        return {"architecture": "vision_transformer", "kind": self.kind, "model_args": self.model_args,
                "classes": self.classes, "run_name": self.run_name, "storage_path": self.storage_path,
                "tracking_uri": self.tracking_uri, "mlflow_run_id": self.mlflow_run_id,
                "train_shards": self.train_shards.summary(),
                "val_shards": self.val_shards.summary() if self.val_shards else None,
                "init": dataclasses.asdict(self.init) if self.init else None, "job": self.job.to_dict()}

    def params(self) -> dict:
        """MLflow params: the job's config, and what was resolved from it (flattened by the tracker)."""
        resolved = {"model_args": self.model_args, "num_classes": len(self.classes), "run_name": self.run_name,
                    "storage_path": self.storage_path, "train_shards": self.train_shards.summary()}
        if self.val_shards:
            resolved["val_shards"] = self.val_shards.summary()
        params = {**self.job.to_dict(), "resolved": resolved}
        if self.init:
            params.update(pretrain_img_size=self.init.source_img_size, img_size=self.job.data.img_size)
        return params

    def model_params(self) -> dict:
        """A checkpoint's logged-model params (MLflow's Models tab): what the model is, flattened by the tracker."""
        return {"kind": self.kind, "objective": self.job.train.objective, "model_args": self.model_args,
                "num_classes": len(self.classes)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(plain(self.record()), sort_keys=False)


def resolve_job(job: JobConfig, kind: str) -> tuple[ResolvedJob, dict[str, torch.Tensor] | None]:
    """The resolved job and, for a fine-tune, the weights it starts from (checked against the model).
    Raises ConfigError with one line."""
    from pipeline.tracking.store import TrackingUnavailable, check_tracking_reachable, resolve_tracking_uri

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "pretrain" and job.init_from:
        raise ConfigError("init_from starts from pretrained weights: use jobs/finetune.py")
    if kind == "finetune" and job.train.objective != "supervised":
        raise ConfigError(f"train.objective={job.train.objective}: a fine-tune learns the class labels (supervised); "
                          "pretrain with jobs/pretrain.py, then fine-tune with init_from=runs:/<that run>")
    if job.train.objective == "mae":
        from pipeline.train.objectives.mae import resolve_decoder

        job = resolve_decoder(job)  # recorded with the run: the decoder sizes it trains
    tracking_uri = resolve_tracking_uri(job.tracking.uri)
    try:
        check_tracking_reachable(tracking_uri)
    except TrackingUnavailable as err:
        raise ConfigError(str(err)) from err
    source = None
    if kind == "finetune":
        job, source = resolve_init_source(job, tracking_uri)
    job, train_shards, val_shards, classes = resolve_data(job)
    model_args = resolve_model(job, classes)
    if job.train.resume_from:
        check_resumable(job.train.resume_from, model_args)
    init, init_state = None, None
    if source is not None:
        init, init_state = fit_init_weights(source, model_args, reset_head=job.finetune.reset_head)
    storage_path = job.train.storage_path or str(default_runs_dir())
    if not storage.is_remote(storage_path):
        storage_path = os.path.abspath(storage_path)
    run = ResolvedJob(kind=kind, job=job, model_args=model_args, classes=classes, train_shards=train_shards,
                      val_shards=val_shards, run_name=job.train.run_name or f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}",
                      storage_path=storage_path, tracking_uri=tracking_uri, init=init)
    return run, init_state


def default_runs_dir():
    from pipeline.tracking.store import default_store_dir

    return default_store_dir() / "runs"


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


def read_split(key: str, spec) -> ShardSet:
    try:
        return read_shard_set(spec)
    except (OSError, ValueError) as err:  # missing shards, a manifest that does not list them, a store refusing us
        raise storage_error(key, spec, err) from err


def resolve_data(job: JobConfig) -> tuple[JobConfig, ShardSet, ShardSet | None, list[str]]:
    """Both splits read once, the classes and their count; training needs every shard's sample count. An objective
    that learns without labels (MAE) reads shards with none, and makes no label check: its classes are the
    manifest's, for its monitors, or none."""
    if not job.data.train:
        raise ConfigError("data.train is empty: give the training shards (a list, a glob or a brace pattern)")
    data = dataclasses.replace(job.data, train=absolute_shard_spec(job.data.train),
                               val=absolute_shard_spec(job.data.val) if job.data.val else "")
    train_shards = read_split("data.train", data.train)
    if train_shards.counts is None:
        raise ConfigError(f"data.train: no manifest beside {train_shards.uris[0]}: training needs the sample count "
                          "of every shard; write one with `python jobs/make_shards.py --source shards:PATTERN`")
    needs_labels = objective_type(job.train.objective).needs_labels
    problem = train_shards.label_problem(data.label_key)
    if problem and needs_labels:
        raise ConfigError(f"data.train: {problem}")
    val_shards = read_split("data.val", data.val) if data.val else None
    classes = train_shards.classes or [str(i) for i in range(job.data.num_classes)]
    if job.data.num_classes and job.data.num_classes != len(classes):
        raise ConfigError(f"data.num_classes {job.data.num_classes} differs from the {len(classes)} classes "
                          "of the train manifest")
    if not classes and needs_labels:
        raise ConfigError("data.train: the manifest names no classes; set data.num_classes=N (labels 0..N-1), or "
                          "index the shards with `python jobs/make_shards.py --source shards:PATTERN --classes a,b,c`")
    job = dataclasses.replace(job, data=dataclasses.replace(data, num_classes=len(classes)))
    return job, train_shards, val_shards, classes


def resolve_model(job: JobConfig, classes: list[str]) -> dict:
    """The arguments of the ViT whose weights the run exports (an MAE run's: its encoder's), checked by building
    the objective's module on the meta device: an impossible architecture fails here, in one line."""
    from pipeline.model import preset_kwargs

    overrides = {"img_size": job.data.img_size, "num_classes": len(classes), "drop_path_rate": job.model.drop_path_rate,
                 "drop_rate": job.model.drop_rate, **job.model.args}
    if job.model.global_pool:
        overrides["global_pool"] = job.model.global_pool
    try:
        objective = build_objective(job, preset_kwargs(job.model.preset, **overrides))
        with torch.device("meta"):
            objective.build_module()
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model: {err}") from err
    return plain(objective.model_args)


def check_resumable(path: str, model_args: dict) -> None:
    """`train.resume_from` must be a checkpoint of this pipeline made by a model of the same shape."""
    import pyarrow.fs as pafs

    from pipeline.model.vit import VisionTransformer
    from pipeline.train.checkpoint import (
        DEEPSPEED_TAG,
        WEIGHTS_FILE,
        CheckpointMismatch,
        check_compatible,
        checkpoint_problem,
    )

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
    except ValueError as err:  # model.safetensors is not one
        raise ConfigError(f"train.resume_from: {path}/{WEIGHTS_FILE} is damaged ({err})") from err
    # the files' sizes against those at save; their contents are checked where they are read, on the workers
    problem = checkpoint_problem(path, contents=False)
    if problem:
        raise ConfigError(f"train.resume_from: {path} is damaged: {problem}")


def resolve_init_source(job: JobConfig, tracking_uri: str):
    """Fine-tuning: read the weights `init_from` names (by default the newest finished pretrain run of the
    job's experiment), and set the resolution: `model.img_size` when set, otherwise twice the one the weights
    were trained at, whichever way `init_from` is given. Returns (job, InitSource)."""
    from pipeline.tracking.lineage import latest_pretrain_run_id
    from pipeline.train.init_weights import locate_init

    init_from = job.init_from
    if not init_from:
        run_id = latest_pretrain_run_id(tracking_uri, job.tracking.experiment)
        if run_id is None:
            raise ConfigError(f"no finished pretrain run in experiment {job.tracking.experiment!r} of {tracking_uri}; "
                              "make one with `python jobs/pretrain.py`, or give init_from=")
        init_from = f"runs:/{run_id}"
        log.info("init_from: the newest finished pretrain run of %r, %s", job.tracking.experiment, init_from)
    source = locate_init(init_from, tracking_uri)
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


def fit_init_weights(source, model_args: dict, *, reset_head: bool) -> tuple[InitPlan, dict[str, torch.Tensor]]:
    """Check the weights of `source` (an InitSource) fit the model (built on the meta device) and decide the
    head."""
    from pipeline.model.vit import VisionTransformer
    from pipeline.train.init_weights import check_init_weights

    with torch.device("meta"):
        model_state = VisionTransformer(**model_args).state_dict()
    weights = check_init_weights(source, model_state, reset_head=reset_head)
    plan = InitPlan(spec=source.spec, parent_run_id=weights.parent_run_id, source_img_size=weights.source_img_size,
                    reset_head=weights.reset_head, model_id=weights.model_id)
    return plan, weights.state_dict

