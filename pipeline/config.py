"""Typed configuration for the pipeline's parts, YAML loading and `a.b=c` overrides.

Each part receives only its own config object. Configs are plain dataclasses so that they serialise into
`train_loop_config`, YAML and MLflow params unchanged; `validate()` raises `ValueError` naming the field.
A job's config is `JobConfig` (model, data, optim, train, tracking); `load_job_config` reads a YAML file over
the job's defaults, applies overrides and validates, raising `ConfigError` with one clear line.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class DataConfig:
    """Where the shards are and how images are decoded, augmented and fed to the trainer.

    Shard specs (`train`, `val`) accept a list of paths, a glob (`/data/train-*.tar`) or a brace pattern
    (`s3://bucket/in1k/train-{000000..001023}.tar`), local or any pyarrow filesystem URI.
    """

    train: str | list[str] = ""  # training shards; empty means none
    val: str | list[str] = ""  # evaluation shards; empty means none
    img_size: int = 224  # output side in pixels, square
    crop_pct: float = 0.875  # eval: resize shorter side to img_size / crop_pct, then centre crop img_size
    rrc_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area fraction range
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratio range
    hflip: float = 0.5  # probability of a horizontal flip (train)
    randaugment_num_ops: int = 0  # RandAugment ops per image (train); 0 turns RandAugment off
    randaugment_magnitude: int = 9  # RandAugment magnitude, 0..30
    label_key: str = ""  # empty: label from the `.cls` member; otherwise this key of the `.json` member
    num_classes: int = 0  # labels must be in [0, num_classes); 0 takes the count from the shard manifest
    max_image_pixels: int = 89_478_485  # width*height above this is skipped as a decompression bomb
    max_bad_fraction: float = 0.01  # stop the job when bad / seen samples exceeds this ...
    min_samples_for_bad_check: int = 1000  # ... once this many samples have been seen
    decode_batch_size: int = 64  # rows per read block and per decode call
    decode_concurrency: int = 0  # max concurrent decode tasks; 0 lets Ray Data decide
    decode_num_cpus: float = 1.0  # CPUs reserved by each decode task
    # "cpu": decode tasks decode, crop and resize; "gpu": they read headers and draw crops, and each Train
    # worker decodes its JPEGs on its GPU (nvJPEG; its CPU where it has no GPU)
    decode_device: str = "cpu"
    # Ray custom resources each read+decode task also requests, e.g. {data_node: 1}: decoding then runs only on
    # nodes started with that resource (the CPU-only data nodes of cluster/), leaving GPU nodes' CPUs to training
    decode_resources: dict[str, float] = field(default_factory=dict)
    shuffle_seed: int = 0  # epoch e reads the shard files in a permutation seeded with shuffle_seed + e
    local_shuffle_buffer: int = 1024  # rows in each worker's local shuffle buffer (train); 0 turns it off
    prefetch_batches: int = 2  # batches each worker prefetches

    def validate(self) -> DataConfig:
        """Raise ValueError naming the first field that is out of range; return self for chaining."""
        checks = [
            (self.img_size > 0, "img_size must be > 0"),
            (0.0 < self.crop_pct <= 1.0, "crop_pct must be in (0, 1]"),
            (_is_range(self.rrc_scale) and 0.0 < self.rrc_scale[0] and self.rrc_scale[1] <= 1.0,
             "rrc_scale must be (low, high) with 0 < low <= high <= 1"),
            (_is_range(self.rrc_ratio) and self.rrc_ratio[0] > 0.0,
             "rrc_ratio must be (low, high) with 0 < low <= high"),
            (0.0 <= self.hflip <= 1.0, "hflip must be a probability in [0, 1]"),
            (self.randaugment_num_ops >= 0, "randaugment_num_ops must be >= 0"),
            (0 <= self.randaugment_magnitude <= 30, "randaugment_magnitude must be in [0, 30]"),
            (self.num_classes >= 0, "num_classes must be >= 0 (0 reads it from the manifest)"),
            (self.max_image_pixels > 0, "max_image_pixels must be > 0"),
            (0.0 <= self.max_bad_fraction <= 1.0, "max_bad_fraction must be in [0, 1]"),
            (self.min_samples_for_bad_check >= 1, "min_samples_for_bad_check must be >= 1"),
            (self.decode_batch_size >= 1, "decode_batch_size must be >= 1"),
            (self.decode_concurrency >= 0, "decode_concurrency must be >= 0 (0 lets Ray Data decide)"),
            (self.decode_num_cpus > 0, "decode_num_cpus must be > 0"),
            (self.decode_device in DECODE_DEVICES,
             f"decode_device must be one of {', '.join(DECODE_DEVICES)}; got {self.decode_device!r}"),
            *custom_resource_checks("decode_resources", self.decode_resources, "decode_num_cpus sets the CPUs"),
            (self.local_shuffle_buffer >= 0, "local_shuffle_buffer must be >= 0"),
            (self.prefetch_batches >= 0, "prefetch_batches must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"data.{message}")
        return self


DECODE_DEVICES = ("cpu", "gpu")
OBJECTIVES = ("supervised", "mae")  # train.objective: pipeline/train/objectives/
_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def custom_resource_checks(key: str, resources: dict, hint: str) -> list[tuple[bool, str]]:
    return [
        (all(isinstance(name, str) and name and name not in _BUILTIN_RESOURCES for name in resources),
         f"{key} names custom resources (not {', '.join(_BUILTIN_RESOURCES)}; {hint})"),
        (all(isinstance(amount, (int, float)) and not isinstance(amount, bool) and amount > 0
             for amount in resources.values()), f"{key} amounts must be numbers > 0"),
    ]


def _is_range(pair) -> bool:
    return len(pair) == 2 and pair[0] <= pair[1]


@dataclass
class ModelConfig:
    """Which ViT to build: a preset (pipeline.model.PRESETS) and the arguments that runs change."""

    preset: str = "vit_demo_patch4_32"  # named architecture
    img_size: int = 0  # input side in pixels; 0 follows data.img_size, otherwise data.img_size follows it
    global_pool: str = ""  # "token" or "avg"; empty keeps the preset's
    drop_path_rate: float = 0.0  # stochastic depth at the last block (linear from 0)
    drop_rate: float = 0.0  # dropout before the head
    grad_checkpointing: bool = False  # recompute block activations in backward to save memory
    args: dict = field(default_factory=dict)  # any other VisionTransformer argument, e.g. {init_values: 1e-5}
    input_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # normalisation applied on the device
    input_std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def validate(self) -> ModelConfig:
        checks = [
            (bool(self.preset), "preset must name a model preset"),
            (self.img_size >= 0, "img_size must be >= 0 (0 follows data.img_size)"),
            (self.global_pool in ("", "token", "avg"), "global_pool must be 'token', 'avg' or empty"),
            (0.0 <= self.drop_path_rate < 1.0, "drop_path_rate must be in [0, 1)"),
            (0.0 <= self.drop_rate < 1.0, "drop_rate must be in [0, 1)"),
            (len(self.input_mean) == 3 and len(self.input_std) == 3 and min(self.input_std) > 0,
             "input_mean and input_std must be 3 numbers each, std > 0"),
        ]
        _raise_first("model", checks)
        return self


@dataclass
class OptimConfig:
    """AdamW, warmup + cosine, and the regularisers of the ViT/DeiT recipes."""

    lr: float = 1e-3  # peak learning rate at the global batch size
    min_lr_ratio: float = 0.01  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 0  # linear warmup from 0
    weight_decay: float = 0.05  # not applied to norms, biases, LayerScale, pos_embed, cls_token
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.0  # 0 turns mixup off
    cutmix_alpha: float = 0.0  # 0 turns cutmix off
    layer_decay: float = 1.0  # layer-wise lr decay (fine-tuning); 1 turns it off

    def validate(self) -> OptimConfig:
        checks = [
            (self.lr > 0, "lr must be > 0"),
            (0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio must be in [0, 1]"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), "betas must be two numbers in [0, 1)"),
            (self.eps > 0, "eps must be > 0"),
            (self.grad_clip >= 0, "grad_clip must be >= 0 (0 turns clipping off)"),
            (0.0 <= self.label_smoothing < 1.0, "label_smoothing must be in [0, 1)"),
            (self.mixup_alpha >= 0 and self.cutmix_alpha >= 0, "mixup_alpha and cutmix_alpha must be >= 0"),
            (0.0 < self.layer_decay <= 1.0, "layer_decay must be in (0, 1]"),
        ]
        _raise_first("optim", checks)
        return self


@dataclass
class TrainConfig:
    """How long, how wide, and how safely to train: steps, batch, workers, ZeRO, eval and checkpoints."""

    steps: int = 1000  # optimizer steps in the run (the unit of the schedule, eval and checkpoints)
    global_batch_size: int = 64  # images per optimizer step, all workers
    micro_batch_size: int = 0  # images per worker per forward; 0 means global / workers (the most workers)
    num_workers: int | tuple[int, int] = 2  # Ray Train workers, one per GPU; [min, max] is elastic
    cpus_per_worker: float = 1.0  # CPUs each Train worker reserves; fractions leave CPUs to Ray Data decode
    worker_resources: dict[str, float] = field(default_factory=dict)  # custom resources per worker: {trainer_node: 1}
    device: str = "auto"  # "auto" (cuda when the cluster has GPUs), "cuda" or "cpu"
    # what is learnt: "supervised" (class labels, cross-entropy) or "mae" (masked autoencoding of the images alone;
    # the mae section). A fine-tune is supervised
    objective: str = "supervised"
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0, 1, 2 or 3
    offload_optimizer: bool = False  # ZeRO optimizer state in CPU memory
    precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "bf16" or "fp32"
    compile: bool = False  # torch.compile the model in place (DeepSpeed's engine.compile; state_dict keys unchanged)
    peak_tflops: float = 0.0  # one device's peak dense TFLOP/s for train/mfu; 0 looks the GPU up in a table
    eval_every_n_steps: int = 100  # 0 evaluates only at the end
    checkpoint_every_n_steps: int = 100  # 0 checkpoints only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept in storage
    log_every_n_steps: int = 10
    seed: int = 0
    max_failures: int = 1  # worker-group restarts from the latest checkpoint before the run fails
    resize_check_s: float = 60.0  # an elastic run checks this often whether more workers fit the cluster
    resume_from: str = ""  # a checkpoint directory to continue from (model, optimizer, schedule, data position)
    stop_after_steps: int = 0  # end this run at this step with a checkpoint (time-limited slots); 0 runs to the end
    storage_path: str = ""  # where Ray Train keeps checkpoints (shared storage on multi-node); "" is ./runs
    run_name: str = ""  # Ray Train run name (same name + storage resumes); "" derives one from the job and time
    verbose: bool = False  # print the libraries' known chatter too (pipeline/console.py); or VIT_PIPELINE_VERBOSE=1

    @property
    def world_sizes(self) -> range:
        """The world sizes the run may train at: `num_workers`, or every size in [min, max]."""
        low, high = (self.num_workers, self.num_workers) if isinstance(self.num_workers, int) else self.num_workers
        return range(low, high + 1)

    def micro_batch_size_per_worker(self) -> int:
        """Images per worker per forward, the same at every world size (what fits a GPU does not change)."""
        return self.micro_batch_size or self.global_batch_size // max(self.world_sizes[-1:] or [1])

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step at `world_size`: micro-batch x accumulation x world size is always
        `global_batch_size`, so the schedule and the step count do not depend on how many workers there are."""
        return self.global_batch_size // (world_size * self.micro_batch_size_per_worker())

    def _unsplittable_world_sizes(self) -> list[int]:
        micro = self.micro_batch_size_per_worker()
        return [w for w in self.world_sizes if w < 1 or micro < 1 or self.global_batch_size % (w * micro)]

    def _split_error(self) -> str:
        bad = self._unsplittable_world_sizes()
        micro = self.micro_batch_size_per_worker()
        if isinstance(self.num_workers, int):
            return (f"global_batch_size {self.global_batch_size} is not divisible by num_workers {self.num_workers} "
                    f"x micro_batch_size {micro}")
        return (f"global_batch_size {self.global_batch_size} does not split into micro_batch_size {micro} x "
                f"accumulation x world size at world size {', '.join(map(str, bad))} of num_workers "
                f"{plain(self.num_workers)}; choose a range whose every size divides "
                f"{self.global_batch_size // max(micro, 1)} micro-batches, or another micro_batch_size")

    def validate(self) -> TrainConfig:
        checks = [
            (self.steps >= 1, "steps must be >= 1"),
            (len(self.world_sizes) >= 1 and self.world_sizes[0] >= 1,
             f"num_workers must be >= 1, or [min, max] with 1 <= min <= max; got {plain(self.num_workers)}"),
            (self.global_batch_size >= 1 and self.micro_batch_size >= 0, "batch sizes must be positive"),
            (not self._unsplittable_world_sizes(), self._split_error()),
            (self.cpus_per_worker > 0, "cpus_per_worker must be > 0"),
            *custom_resource_checks("worker_resources", self.worker_resources, "cpus_per_worker sets the CPUs"),
            (self.device in ("auto", "cuda", "cpu"), "device must be 'auto', 'cuda' or 'cpu'"),
            (self.objective in OBJECTIVES, f"objective must be one of {', '.join(OBJECTIVES)}; got {self.objective!r}"),
            (self.zero_stage in (0, 1, 2, 3), "zero_stage must be 0, 1, 2 or 3"),
            (not self.offload_optimizer or self.zero_stage >= 1, "offload_optimizer needs zero_stage >= 1"),
            (self.precision in ("auto", "bf16", "fp32"), "precision must be 'auto', 'bf16' or 'fp32'"),
            (isinstance(self.compile, bool), "compile must be true or false"),
            (self.peak_tflops >= 0, "peak_tflops must be >= 0 (0 looks the GPU up in a table of known cards)"),
            (min(self.eval_every_n_steps, self.checkpoint_every_n_steps) >= 0, "every_n_steps values must be >= 0"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (self.log_every_n_steps >= 1, "log_every_n_steps must be >= 1"),
            (self.max_failures >= 0, "max_failures must be >= 0"),
            (self.resize_check_s >= 0, "resize_check_s must be >= 0"),
            (0 <= self.stop_after_steps <= self.steps, "stop_after_steps must be in [0, steps]"),
        ]
        _raise_first("train", checks)
        return self


@dataclass
class MaeConfig:
    """Masked-autoencoder pretraining (train.objective=mae; He et al., 2021): the mask, the decoder, the monitors."""

    mask_ratio: float = 0.75  # fraction of each image's patches hidden from the encoder, drawn per sample
    decoder_embed_dim: int = 0  # decoder width; 0 takes the preset's (MAE's 512 for B/L/H)
    decoder_depth: int = 0  # decoder blocks; 0 takes the preset's (MAE's 8 for B/L/H)
    decoder_num_heads: int = 0  # decoder attention heads; 0 takes the preset's (MAE's 16 for B/L/H)
    norm_pix_loss: bool = True  # targets: each patch's pixels normalised by the patch's own mean and variance
    eval_mask_seed: int = 0  # val masks are drawn per sample from this seed: curves compare across runs and resumes
    knn_k: int = 20  # neighbours of the k-NN top-1 monitor (when the train and val shards have labels)
    knn_train_samples: int = 10_000  # labelled train samples the k-NN monitor searches; 0 turns it off
    recon_images: int = 8  # val images in the reconstruction PNG logged at each evaluation; 0 logs none

    def validate(self) -> MaeConfig:
        width, heads = self.decoder_embed_dim, self.decoder_num_heads
        checks = [
            (0.0 < self.mask_ratio < 1.0, f"mask_ratio must be in (0, 1); got {self.mask_ratio}"),
            (min(width, self.decoder_depth, heads) >= 0, "decoder sizes must be >= 0 (0 takes the preset's)"),
            (not (width and heads) or width % heads == 0,
             f"decoder_num_heads {heads} must divide decoder_embed_dim {width}"),
            (self.knn_k >= 1, "knn_k must be >= 1"),
            (self.knn_train_samples >= 0, "knn_train_samples must be >= 0 (0 turns the k-NN monitor off)"),
            (self.recon_images >= 0, "recon_images must be >= 0"),
        ]
        _raise_first("mae", checks)
        return self


@dataclass
class TrackingConfig:
    """Where runs are recorded (MLflow)."""

    uri: str = ""  # MLflow tracking URI; "" uses $MLFLOW_TRACKING_URI or the local sqlite store
    experiment: str = "vit-pipeline"  # MLflow experiment name
    run_name: str = ""  # MLflow run name; "" uses the train run name
    log_weights: bool = True  # the final model's consolidated weights as its artifacts (else a tag points at them)
    register_as: str = ""  # register the checkpoint with the best val/top1 under this name at the end of a run

    def validate(self) -> TrackingConfig:
        _raise_first("tracking", [(bool(self.experiment), "experiment must not be empty"),
                                  (not self.register_as or bool(re.fullmatch(r"[\w.\- ]+", self.register_as)),
                                   f"register_as {self.register_as!r}: a registered model name has letters, digits, "
                                   "'_', '-', '.' and spaces only")])
        return self


@dataclass
class FinetuneConfig:
    """How a fine-tune starts from pretrained weights (the weights themselves come from `init_from`)."""

    reset_head: bool = False  # a new head even when the class count matches
    ema_decay: float = 0.0  # keep an EMA of the weights, evaluated and checkpointed beside them; 0 = off

    def validate(self) -> FinetuneConfig:
        _raise_first("finetune", [(0.0 <= self.ema_decay < 1.0, "ema_decay must be in [0, 1)")])
        return self


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    mae: MaeConfig = field(default_factory=MaeConfig)
    # pretrained weights: a checkpoint dir, a model.safetensors, runs:/<mlflow run id>, or a timm state_dict file
    init_from: str = ""

    def validate(self) -> JobConfig:
        for part in (self.model, self.data, self.optim, self.train, self.tracking, self.finetune, self.mae):
            part.validate()
        if self.train.objective != "supervised":
            for key, value in (("optim.mixup_alpha", self.optim.mixup_alpha), ("optim.cutmix_alpha",
                                                                              self.optim.cutmix_alpha)):
                if value:
                    raise ValueError(f"{key} is {value}, but train.objective={self.train.objective} learns without "
                                     "labels, so there are none to mix; set it to 0 (it belongs to the fine-tune)")
            if self.finetune.ema_decay:
                raise ValueError(f"finetune.ema_decay is for supervised runs; train.objective={self.train.objective} "
                                 "keeps no EMA of its weights (MAE's recipe has none)")
        if self.model.img_size and self.model.img_size != self.data.img_size:
            self.data = dataclasses.replace(self.data, img_size=self.model.img_size)
        if self.finetune.ema_decay and self.train.zero_stage == 3:
            raise ValueError("finetune.ema_decay needs train.zero_stage <= 2 (ZeRO-3 holds only a partition of "
                             "the weights on each rank)")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` as a string; ML configs mean a float."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str):
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(ValueError):
    """A config that cannot run: an unknown key, a wrong type or an impossible combination."""


def load_job_config(path: str | Path | None, overrides: list[str], defaults: JobConfig | None = None,
                    config_type: type = JobConfig) -> JobConfig:
    """`defaults` <- YAML file `path` <- `a.b=c` overrides, then validated; raises ConfigError."""
    config = defaults if defaults is not None else config_type()
    try:
        if path:
            text = Path(path).read_text()
            values = parse_yaml(text) or {}
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: expected a mapping of sections at the top level")
            config = merge(config, values)
        for override in overrides:
            key, sep, raw = override.partition("=")
            if not sep or not key:
                raise ConfigError(f"override {override!r} is not of the form section.key=value")
            config = merge(config, _nest(key.strip().split("."), parse_yaml(raw) if raw else ""))
        return config.validate()
    except FileNotFoundError as err:
        raise ConfigError(f"config file not found: {path}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse YAML: {err}".splitlines()[0]) from err
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from err


def config_from_dict(config_type: type, values: dict):
    """Rebuild a config dataclass from `to_dict()` output (e.g. inside a Ray Train worker)."""
    return merge(config_type(), values)


def merge(config, values: dict, prefix: str = ""):
    """A copy of dataclass `config` with `values` (nested dicts) applied, type-checked field by field."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(type(config))
    names = [f.name for f in dataclasses.fields(config)]
    changes = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {dotted!r}{hint}")
        current = getattr(config, key)
        if dataclasses.is_dataclass(current):
            changes[key] = merge(current, value, f"{dotted}.")
        else:
            changes[key] = _coerce(value, hints[key], dotted)
    return dataclasses.replace(config, **changes)


def _coerce(value, annotation, key: str):
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a {_type_name(annotation)}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif origin in (tuple, list) and isinstance(value, (list, tuple)):
        if origin is tuple and len(args) != len(value) and not (len(args) == 2 and args[1] is Ellipsis):
            raise ConfigError(f"{key}: expected {len(args)} values, got {list(value)}")
        element_types = [args[0]] * len(value) if origin is list or args[-1] is Ellipsis else args
        return origin(_coerce(v, t, key) for v, t in zip(value, element_types, strict=True))
    elif origin is dict or annotation is dict:
        if isinstance(value, dict):
            return dict(value)
    raise ConfigError(f"{key}: {value!r} is not a {_type_name(annotation)}")


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _nest(keys: list[str], value) -> dict:
    for key in reversed(keys):
        value = {key: value}
    return value


def plain(value):
    """Tuples become lists so that YAML stays readable and safe_load-able."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _raise_first(section: str, checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise ValueError(f"{section}.{message}")
