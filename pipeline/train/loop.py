"""The training loop that every worker runs: DeepSpeed engine, per-epoch data, eval, checkpoints, metrics.

The loop talks to what runs it only through its `TrainContext` (context.py): on Ray Train through
`RayTrainContext`, in one process through `LocalContext`; this module imports nothing of Ray. Every rank
runs exactly `train.steps` optimizer steps and calls every collective (eval, checkpoint, report) at the same
steps, so no rank waits on another that has stopped. Functions that are collectives say so in their names.
"""

import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline import storage
from pipeline.config import ConfigError, JobConfig, plain
from pipeline.console import is_verbose, worker_console
from pipeline.data.bad_samples import BadSampleReport
from pipeline.internals import use_weights_only_loading
from pipeline.train.checkpoint import (
    EMA_WEIGHTS_FILE,
    SCORE_KEY,
    LoopState,
    load_checkpoint,
    local_checkpoint,
    read_weights,
    save_checkpoint_collective,
)
from pipeline.train.context import TrainContext
from pipeline.train.ema import WeightEMA
from pipeline.train.evaluate import evaluate_collective
from pipeline.train.feed import TrainFeed
from pipeline.train.flops import achieved_flops, device_peak_flops, model_flops_per_image
from pipeline.train.inputs import InputPipeline
from pipeline.train.resolved_job import ResolvedJob

log = logging.getLogger(__name__)


def load_into_model(model: torch.nn.Module, state: dict[str, torch.Tensor], *, reset_head: bool) -> None:
    """Pretrained weights into the fresh model (position embeddings are resampled by the model's load hook)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"head.weight", "head.bias"} if reset_head else set()
    if set(missing) - allowed_missing or unexpected:
        raise RuntimeError(f"init weights do not fit the model: missing {missing}, unexpected {unexpected}")


def resolve_device(job: JobConfig, local_rank: int) -> torch.device:
    if job.train.device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if job.train.device == "cuda":
        raise ConfigError("train.device=cuda but this worker sees no GPU")
    return torch.device("cpu")


def use_cpu_deepspeed() -> None:
    """Before DeepSpeed's first import on a CPU-only worker: choose its CPU accelerator, and put this interpreter's
    bin folder first on PATH, so that the shared-memory comm op it JIT-builds is always built by the `ninja`
    installed with DeepSpeed. A system ninja of another version hashes the build commands differently, and every
    switch between the two rebuilds the op, which takes a minute."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when DeepSpeed is first imported
    bin_dir = os.path.dirname(sys.executable)
    if os.path.exists(os.path.join(bin_dir, "ninja")):
        rest = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != bin_dir]
        os.environ["PATH"] = os.pathsep.join([bin_dir, *rest])


def build_engine(job: JobConfig, model_args: dict, world_size: int, device: torch.device, *,
                 init_state: dict[str, torch.Tensor] | None = None, reset_head: bool = False):
    """Model from its arguments (with `init_state` loaded, if given), AdamW param groups, warmup+cosine,
    wrapped by DeepSpeed. Returns (engine, the dtype of its inputs)."""
    if device.type == "cpu":
        use_cpu_deepspeed()
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules

    from pipeline.model import VisionTransformer
    from pipeline.model.vit import Block
    from pipeline.train.deepspeed_config import build_deepspeed_config
    from pipeline.train.optim import build_optimizer, build_scheduler

    torch.manual_seed(job.train.seed)  # identical initial weights on every rank
    model = VisionTransformer(**model_args)
    if init_state is not None:
        load_into_model(model, init_state, reset_head=reset_head)
    model.set_grad_checkpointing(job.model.grad_checkpointing)
    model.to(device)
    if job.train.compile and job.train.zero_stage == 3:
        # ZeRO-3 gathers parameters in hooks around every module that holds some, and each hook breaks the graph;
        # with the blocks as its "leaf" modules it gathers a block's parameters on entry and each block compiles whole
        set_z3_leaf_modules(model, [Block])
    optim = job.optim
    optimizer = build_optimizer(model, lr=optim.lr, weight_decay=optim.weight_decay, betas=optim.betas,
                                eps=optim.eps, layer_decay=optim.layer_decay, fused=device.type == "cuda")
    scheduler = build_scheduler(optimizer, warmup_steps=optim.warmup_steps, total_steps=job.train.steps,
                                min_lr_ratio=optim.min_lr_ratio)
    bf16 = job.train.precision == "bf16" or (job.train.precision == "auto" and device.type == "cuda")
    ds_config = build_deepspeed_config(
        micro_batch_size=job.train.micro_batch_size_per_worker(),
        grad_accum_steps=job.train.grad_accum_steps(world_size), world_size=world_size,
        zero_stage=job.train.zero_stage, bf16=bf16, grad_clip=optim.grad_clip,
        offload_optimizer=job.train.offload_optimizer, num_params=sum(p.numel() for p in model.parameters()))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    use_weights_only_loading(engine)
    if job.train.compile:
        compile_engine(engine)
    return engine, (torch.bfloat16 if bf16 else torch.float32)


def compile_engine(engine) -> None:
    """torch.compile the engine's module in place: DeepSpeed's `engine.compile` calls `nn.Module.compile` with the
    accelerator's backend (inductor on CUDA and on the CPU), so the module, its state_dict keys and every checkpoint
    stay those of the eager model, and a checkpoint loads either way. The first forward and backward compile. Under
    ZeRO-3 the graph breaks at DeepSpeed's parameter gathers, around each block (build_engine makes the blocks
    ZeRO-3 leaf modules) and the modules outside them: the model compiles block by block."""
    engine.compile()


@contextlib.contextmanager
def eager_forward(engine) -> Iterator[None]:
    """Inside the block a compiled engine's module runs eager: for eval, whose batch sizes (the last partial batch,
    ZeRO-3's one-image padding), no-grad mode and eval mode would each compile graphs of their own."""
    if not getattr(engine, "is_compiled", False):
        yield
        return
    with torch.compiler.set_stance("force_eager"):
        yield


def train_step(engine, images: torch.Tensor, targets: torch.Tensor, *, micro_batch: int, accum: int,
               label_smoothing: float) -> torch.Tensor:
    """One optimizer step over `accum` micro-batches; DeepSpeed accumulates and steps at the boundary.
    Returns the step's loss: the mean over its micro-batches, detached."""
    total = torch.zeros((), device=images.device)
    for i in range(accum):
        part = slice(i * micro_batch, (i + 1) * micro_batch)
        loss = F.cross_entropy(engine(images[part]).float(), targets[part], label_smoothing=label_smoothing)
        engine.backward(loss)
        engine.step()
        total += loss.detach()
    return total / accum


class Progress:
    """Rolling step timings for the step line and the rate metrics: images/s of the job, TFLOP/s per device from
    the forward FLOPs per image (pipeline/train/flops.py), and MFU when the device's peak is known."""

    def __init__(self, total_steps: int, start_step: int, images_per_step: int, *, forward_flops_per_image: float = 0.0,
                 world_size: int = 1, peak_flops_per_s: float | None = None):
        self.total_steps = total_steps
        self.images_per_step = images_per_step
        self.forward_flops_per_image = forward_flops_per_image
        self.world_size = world_size
        self.peak_flops_per_s = peak_flops_per_s
        self.window_start = time.perf_counter()
        self.window_steps = 0
        self.window_data_wait_s = 0.0
        self.losses: list[torch.Tensor] = []
        self.run_start = self.window_start
        self.start_step = start_step

    def add(self, loss: torch.Tensor, data_wait_s: float) -> None:
        self.window_steps += 1
        self.window_data_wait_s += data_wait_s
        self.losses.append(loss)

    def flush_collective(self, step: int, lr: float, world_size: int, group=None) -> tuple[dict[str, float], str]:
        """The window's metrics (loss averaged over ranks: a collective) and its step line; a new window."""
        now = time.perf_counter()
        elapsed_s = max(now - self.window_start, 1e-9)
        loss = torch.stack(self.losses).float().mean().cpu()
        if world_size > 1:
            dist.all_reduce(loss, group=group)  # `group`: the context's for CPU tensors
            loss /= world_size
        steps = max(self.window_steps, 1)
        metrics = {
            "train/loss": loss.item(),
            "train/lr": lr,
            "train/images_per_s": self.window_steps * self.images_per_step / elapsed_s,
            "train/step_time_s": (elapsed_s - self.window_data_wait_s) / steps,
            "train/data_wait_s": self.window_data_wait_s / steps,
        }
        rates = ""
        if self.forward_flops_per_image:
            device_flops = achieved_flops(self.forward_flops_per_image,
                                          metrics["train/images_per_s"] / self.world_size)
            metrics["train/tflops"] = device_flops / 1e12  # per device: what one card's peak compares with
            rates = f" | {metrics['train/tflops']:.3g} TFLOP/s/device"
            if self.peak_flops_per_s:
                metrics["train/mfu"] = device_flops / self.peak_flops_per_s
                rates += f" | MFU {100 * metrics['train/mfu']:.1f}%"
        eta_s = (now - self.run_start) / max(step - self.start_step, 1) * (self.total_steps - step)
        line = (f"step {step}/{self.total_steps} | loss {metrics['train/loss']:.3f} | lr {lr:.2e} | "
                f"{metrics['train/images_per_s']:.0f} img/s{rates} | data wait "
                f"{100 * self.window_data_wait_s / elapsed_s:.0f}% | eta {format_duration(eta_s)}")
        self.window_start, self.window_steps, self.window_data_wait_s, self.losses = now, 0, 0.0, []
        return metrics, line


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def run_training(run: ResolvedJob, ctx: TrainContext, *, init_state: dict[str, torch.Tensor] | None = None
                 ) -> LoopState:
    """Train to `train.steps` (or `stop_after_steps`), resuming from the context's latest checkpoint or
    `train.resume_from`, at whatever world size the context has (within `train.num_workers`). `init_state`: a
    fine-tune's starting weights (run.init says whether the head is new)."""
    job = run.job
    worker_console(is_verbose(job.train.verbose))  # our lines; the libraries' known ones quiet (pipeline/console.py)
    train_cfg, data_cfg, rank, world_size = job.train, job.data, ctx.rank, ctx.world_size
    if world_size not in train_cfg.world_sizes:
        raise ConfigError(f"train.num_workers is {plain(train_cfg.num_workers)} but the context has {world_size} ranks")
    device = resolve_device(job, ctx.local_rank)
    engine, dtype = build_engine(job, run.model_args, world_size, device, init_state=init_state,
                                 reset_head=run.init.reset_head if run.init else False)
    micro_batch, accum = train_cfg.micro_batch_size_per_worker(), train_cfg.grad_accum_steps(world_size)
    state, ema = LoopState(), None
    with ctx.latest_checkpoint() as (checkpoint_dir, stored_at), \
            local_checkpoint(checkpoint_dir or train_cfg.resume_from) as source:
        if source:
            state = load_checkpoint(engine, source, local_rank=ctx.local_rank)
            if rank == 0:
                record = state.epoch_record()
                log.info("resumed from %s at step %d (epoch %d: %d shards done, %d partly read)",
                         checkpoint_dir or train_cfg.resume_from, state.step, state.epoch, len(record.done),
                         len(record.partial))
        if job.finetune.ema_decay:
            ema = WeightEMA(engine.module, job.finetune.ema_decay)
            if source and os.path.exists(os.path.join(source, EMA_WEIGHTS_FILE)):
                ema.load_state_dict(read_weights(os.path.join(source, EMA_WEIGHTS_FILE)))
    if rank == 0:
        log.info("world size %d%s: micro-batch %d x accumulation %d x %d workers = global batch %d", world_size,
                 f" (was {state.world_size})" if state.world_size not in (0, world_size) else "", micro_batch, accum,
                 world_size, train_cfg.global_batch_size)
    resumed_from, state.world_size = state.step, world_size
    torch.manual_seed(train_cfg.seed * 10_000 + rank * 1_000 + state.step)  # augmentation draws differ per rank

    num_classes = len(run.classes)
    train_ledger, val_ledger = ctx.start_ledgers(2, data_cfg.max_bad_fraction, data_cfg.min_samples_for_bad_check)
    if rank == 0 and state.bad_samples:
        train_ledger.restore(BadSampleReport(**state.bad_samples))
    feed = TrainFeed(ctx, run.train_shards, data_cfg, batch_size=train_cfg.global_batch_size // world_size,
                     num_classes=num_classes, ledger=train_ledger, device=device)
    # the val split is not trimmed to equal streams, so every image counts; it is iterated once per evaluation
    val_stream = ctx.image_stream(run.val_shards, data_cfg, train=False, num_classes=num_classes, ledger=val_ledger,
                                  equal=False) if run.val_shards else None
    inputs = InputPipeline(job.model.input_mean, job.model.input_std, device, dtype, num_classes=num_classes,
                           mixup_alpha=job.optim.mixup_alpha, cutmix_alpha=job.optim.cutmix_alpha)
    tracked = None
    if rank == 0 and run.mlflow_run_id:
        from pipeline.tracking.attempts import AttemptMetrics
        from pipeline.tracking.datasets import dataset_key

        tracked = AttemptMetrics(run.tracking_uri, run.mlflow_run_id, run_name=run.run_name, world_size=world_size,
                                 start_step=state.step, carried=state.job_run_metrics, model_params=run.model_params(),
                                 val_dataset=dataset_key(run.val_shards) if run.val_shards else None,
                                 resumed_location=storage.to_uri(run.storage_path, stored_at) if stored_at else None)
    peak, device_name = device_peak_flops(device, train_cfg.peak_tflops)
    if rank == 0 and device.type == "cuda" and peak is None:
        log.warning("no peak bf16 FLOP/s known for %r: train/mfu is not logged; set train.peak_tflops to the card's "
                    "dense bf16 peak to have it", device_name)
    if rank == 0 and train_cfg.compile:
        log.info("train.compile: the model is compiled with torch.compile (%s); the first step compiles it%s",
                 "block by block, between ZeRO-3's parameter gathers" if train_cfg.zero_stage == 3 else "one graph",
                 "; on the CPU a compiled step measured within 2% of an eager one (docs/benchmarks.md)"
                 if device.type == "cpu" and train_cfg.zero_stage < 3 else "")
    progress = Progress(train_cfg.steps, state.step, train_cfg.global_batch_size,
                        forward_flops_per_image=model_flops_per_image(run.model_args), world_size=world_size,
                        peak_flops_per_s=peak)
    batches = feed.epochs(state.epoch_record())
    sample_log = open_sample_log_collective(rank, world_size, ctx.cpu_group)
    last_val: dict[str, float] = {}
    stop_step = train_cfg.stop_after_steps or train_cfg.steps
    outcome = "FAILED"
    try:
        while state.step < stop_step:
            wait_start = time.perf_counter()
            epoch, batch = next(batches)
            data_wait_s = time.perf_counter() - wait_start
            if sample_log is not None:
                sample_log.write(json.dumps({"step": state.step + 1, "epoch": epoch,
                                             "samples": feed.sample_ids(batch)}) + "\n")
            images, targets = inputs.train_batch(batch)
            lr = max(engine.lr_scheduler.get_last_lr())  # this step's: the step advances the schedule
            loss = train_step(engine, images, targets, micro_batch=micro_batch, accum=accum,
                              label_smoothing=job.optim.label_smoothing)
            if ema is not None:
                ema.update()
            state.step += 1
            state.epoch = epoch
            state.images_seen += train_cfg.global_batch_size
            progress.add(loss, data_wait_s)
            drain_deadline = ctx.preemption_deadline_collective()

            metrics: dict[str, float] = {}
            line = ""
            if due(state.step, train_cfg.log_every_n_steps, stop_step) or state.step == resumed_from + 1:
                window, line = progress.flush_collective(state.step, lr, world_size, ctx.cpu_group)
                metrics.update(window)
                metrics.update(feed.metrics())
                metrics.update({"train/epoch": epoch, "train/world_size": world_size})
                if state.step == resumed_from + 1 and resumed_from:  # where a restarted or resumed attempt picked up
                    metrics["train/resumed_at_step"] = resumed_from
            if val_stream is not None and due(state.step, train_cfg.eval_every_n_steps, stop_step):
                last_val = validate_collective(engine, ema, val_stream, inputs, batch_size=micro_batch,
                                               world_size=world_size, img_size=data_cfg.img_size)
                metrics.update(last_val)
                line = (line or f"step {state.step}/{train_cfg.steps}") + (
                    f" | val top-1 {last_val['val/top1']:.3f} loss {last_val['val/loss']:.3f}") + (
                    f" | ema top-1 {last_val['val_ema/top1']:.3f}" if ema is not None else "")
            if rank == 0 and line:
                log.info(line)
            if tracked is not None and metrics:
                tracked.log(metrics, step=state.step)
            if drain_deadline is not None and rank == 0:
                log.info("a node of the worker group is being drained (%s): checkpoint at step %d now",
                         f"deadline in {drain_deadline / 1000 - time.time():.0f} s" if drain_deadline else
                         "no deadline given", state.step)
            if due(state.step, train_cfg.checkpoint_every_n_steps, stop_step) or drain_deadline is not None:
                report = {"step": state.step, "epoch": state.epoch, "images_seen": state.images_seen,
                          **{k: v for k, v in metrics.items() if k.startswith(("train/", "val"))},
                          **{f"last_{k}": v for k, v in last_val.items()},
                          SCORE_KEY: last_val.get("val/top1", float("-inf"))}
                if tracked is not None:
                    state.job_run_metrics = tracked.carried()
                location = checkpoint_collective(run, ctx, engine, feed, state, ema, report)
                if location and tracked is not None:
                    tracked.commit(state.step, location)
                if drain_deadline is not None and state.step < stop_step:
                    if tracked is not None:  # the metrics sent while this group waits to be ended
                        tracked.flush(10.0)
                    if rank == 0:
                        log.info("checkpoint for the drain saved; training resumes from it once Ray Train restarts "
                                 "the worker group without the drained node")
                    ctx.wait_for_restart(drain_deadline)
        outcome = "FINISHED"
    except Exception:
        # Ray Data hands the trainer a wrapper of a decode task's error without its cause; the ledgers say
        # whether it was the bad-sample limit
        train_ledger.check()
        val_ledger.check()
        raise
    finally:
        if tracked is not None:
            tracked.close(outcome)
        if sample_log is not None:
            sample_log.close()
    return state


SAMPLE_LOG_ENV = "VIT_PIPELINE_SAMPLE_LOG"


def open_sample_log_collective(rank: int, world_size: int, group=None):
    """With VIT_PIPELINE_SAMPLE_LOG=<folder> (on every worker): a file there per rank and attempt,
    `attempt-<start ns>-rank<r>of<w>.jsonl` (rank 0's start time, so later attempts sort later), with one JSON
    line per step holding the (shard, position) of every sample the rank trained on: to audit what a run saw
    (which samples a loss spike came from; that resumes repeat none). Off by default. Line-buffered, so a lost
    worker loses no step it logged. A collective when on."""
    folder = os.environ.get(SAMPLE_LOG_ENV)
    if not folder:
        return None
    started = [time.time_ns()]
    if world_size > 1:
        dist.broadcast_object_list(started, src=0, group=group)
    os.makedirs(folder, exist_ok=True)
    return open(os.path.join(folder, f"attempt-{started[0]}-rank{rank}of{world_size}.jsonl"), "a", buffering=1)


def checkpoint_collective(run: ResolvedJob, ctx: TrainContext, engine, feed: TrainFeed, state: LoopState,
                          ema: WeightEMA | None, report: dict) -> str | None:
    """The data position agreed by all ranks, the DeepSpeed state and the weights, reported to the context; on
    rank 0, where the checkpoint was committed (a path or storage URI), None if it was not (a collective)."""
    record, bad_samples = feed.record_collective()
    state.set_epoch_record(record)
    state.bad_samples = asdict(bad_samples)
    with tempfile.TemporaryDirectory(prefix="vit-checkpoint-") as directory:
        save_checkpoint_collective(engine, directory, rank=ctx.rank, state=state, model_config=run.record(),
                                   ema_weights=ema.state_dict() if ema is not None else None)
        location = ctx.report(report, directory)
    if ctx.rank == 0 and location:
        location = storage.to_uri(run.storage_path, location)
        log.info("checkpoint step %d: %s", state.step, location)
    return location


def validate_collective(engine, ema: WeightEMA | None, val_stream, inputs: InputPipeline, *, batch_size: int,
                        world_size: int, img_size: int) -> dict[str, float]:
    """val/* of the raw weights and, with an EMA, val_ema/* of the averaged ones (a collective)."""
    kwargs = {"batch_size": batch_size, "world_size": world_size, "image_shape": (3, img_size, img_size)}
    with eager_forward(engine):
        metrics = evaluate_collective(engine, val_stream, inputs, **kwargs)
        if ema is not None:
            with ema.applied():
                averaged = evaluate_collective(engine, val_stream, inputs, **kwargs)
            metrics.update({key.replace("val/", "val_ema/"): value for key, value in averaged.items()})
    return metrics
