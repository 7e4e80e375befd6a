"""The training loop that every worker runs.

The loop talks to what runs it only through its `TrainContext` (context.py): on Ray Train through
`RayTrainContext`, in one process through `LocalContext`; this module imports nothing of Ray. What is learnt is
the objective's (objectives/): the loop knows no loss, no model and no metric of its own. Each concern is a
component that decides for itself when to act:

    engine.py         the DeepSpeed engine around the objective's module, and one optimizer step
    feed.py           this rank's batches, sample by sample across epochs and resumes
    validator.py      evaluation and the EMA
    progress.py       the step line and the tracker (MLflow)
    checkpointer.py   resume, checkpoints, their commit, drains

Every rank runs exactly `train.steps` optimizer steps and calls every collective (eval, checkpoint, report) at
the same steps, so no rank waits on another that has stopped.
"""

import logging

import torch

from pipeline.config import ConfigError, plain
from pipeline.console import is_verbose, worker_console
from pipeline.data.bad_samples import BadSampleReport
from pipeline.train.checkpoint import LoopState
from pipeline.train.checkpointer import Checkpointer
from pipeline.train.context import TrainContext
from pipeline.train.engine import build_engine, resolve_device, train_step
from pipeline.train.feed import TrainFeed
from pipeline.train.inputs import InputPipeline
from pipeline.train.objectives import build_objective
from pipeline.train.progress import MetricsProcessor
from pipeline.train.resolved_job import ResolvedJob
from pipeline.train.validator import Validator

log = logging.getLogger(__name__)


def run_training(run: ResolvedJob, ctx: TrainContext, *, init_state: dict[str, torch.Tensor] | None = None
                 ) -> LoopState:
    """Train to `train.steps` (or `stop_after_steps`), resuming from the context's latest checkpoint or
    `train.resume_from`, at whatever world size the context has (within `train.num_workers`). `init_state`: a
    fine-tune's starting weights (run.init says whether the head is new)."""
    job = run.job
    worker_console(is_verbose(job.train.verbose))  # our lines; the libraries' known ones quiet (pipeline/console.py)
    train_cfg, rank, world_size = job.train, ctx.rank, ctx.world_size
    if world_size not in train_cfg.world_sizes:
        raise ConfigError(f"train.num_workers is {plain(train_cfg.num_workers)} but the context has {world_size} ranks")
    stop_step = train_cfg.stop_after_steps or train_cfg.steps
    device = resolve_device(job, ctx.local_rank)
    objective = build_objective(job, run.model_args)
    engine, dtype = build_engine(job, objective, world_size, device, init_state=init_state,
                                 reset_head=run.init.reset_head if run.init else False)
    micro_batch, accum = train_cfg.micro_batch_size_per_worker(), train_cfg.grad_accum_steps(world_size)
    checkpointer = Checkpointer(run, ctx, engine, objective, stop_step=stop_step)
    state, stored_at, ema_weights = checkpointer.restore()
    if rank == 0:
        log.info("world size %d%s: micro-batch %d x accumulation %d x %d workers = global batch %d", world_size,
                 f" (was {state.world_size})" if state.world_size not in (0, world_size) else "", micro_batch, accum,
                 world_size, train_cfg.global_batch_size)
    state.world_size = world_size
    torch.manual_seed(train_cfg.seed * 10_000 + rank * 1_000 + state.step)  # augmentation draws differ per rank

    num_classes = len(run.classes) if objective.needs_labels else None
    train_ledger, eval_ledger = ctx.start_ledgers(2, job.data.max_bad_fraction, job.data.min_samples_for_bad_check)
    if rank == 0 and state.bad_samples:
        train_ledger.restore(BadSampleReport(**state.bad_samples))
    feed = TrainFeed(ctx, run.train_shards, job.data, batch_size=train_cfg.global_batch_size // world_size,
                     num_classes=num_classes, ledger=train_ledger, device=device)
    inputs = InputPipeline(job.model.input_mean, job.model.input_std, device, dtype, num_classes=num_classes or 0,
                           mixup_alpha=job.optim.mixup_alpha, cutmix_alpha=job.optim.cutmix_alpha)
    validator = Validator(run, ctx, engine, objective, inputs, eval_ledger, ema_weights=ema_weights,
                          stop_step=stop_step)
    metrics = MetricsProcessor(run, ctx, objective, feed, state, stored_at=stored_at, device=device,
                               stop_step=stop_step)
    steps = feed.steps(state.epoch_record(), first_step=state.step + 1)
    outcome = "FAILED"
    try:
        while state.step < stop_step:
            epoch, batch, data_wait_s = next(steps)
            images, targets = inputs.train_batch(batch)
            lr = max(engine.lr_scheduler.get_last_lr())  # this step's: the step advances the schedule
            loss = train_step(engine, objective, images, targets, micro_batch=micro_batch, accum=accum)
            validator.after_step()
            state.advance(epoch, train_cfg.global_batch_size)
            evaluation = validator.validate(state.step)
            metrics.log(state, epoch=epoch, loss=loss, lr=lr, data_wait_s=data_wait_s, evaluation=evaluation)
            checkpointer.save(state, feed, validator, metrics)
        outcome = "FINISHED"
    except Exception:
        # Ray Data hands the trainer a wrapper of a decode task's error without its cause; the ledgers say
        # whether it was the bad-sample limit
        train_ledger.check()
        eval_ledger.check()
        raise
    finally:
        metrics.close(outcome)
        steps.close()
    return state
