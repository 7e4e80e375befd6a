"""The DeepSpeed engine around an objective's module, and one optimizer step of it.

    device = resolve_device(job, local_rank)
    engine, dtype = build_engine(job, objective, world_size, device)   # AdamW groups, warmup+cosine, ZeRO, compile
    loss = train_step(engine, objective, images, targets, micro_batch=8, accum=2)
"""

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist

from pipeline.config import ConfigError, JobConfig
from pipeline.internals import use_weights_only_loading

log = logging.getLogger(__name__)


def load_into_model(model: torch.nn.Module, state: dict[str, torch.Tensor], *, reset_head: bool) -> None:
    """Pretrained weights into the fresh model (position embeddings are resampled by the model's load hook); the
    keys `init_weights.fresh_keys` names for weights without them (a new head, the final norm's other place) keep
    the model's own initialisation."""
    from pipeline.train.init_weights import fresh_keys

    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = fresh_keys(state, model.state_dict(), reset_head=reset_head)
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


def build_engine(job: JobConfig, objective, world_size: int, device: torch.device, *,
                 init_state: dict[str, torch.Tensor] | None = None, reset_head: bool = False):
    """The objective's module (with `init_state` loaded, if given), AdamW param groups, warmup+cosine, wrapped by
    DeepSpeed. Returns (engine, the dtype of its inputs)."""
    if device.type == "cpu":
        use_cpu_deepspeed()
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules

    from pipeline.model.vit import Block
    from pipeline.train.deepspeed_config import build_deepspeed_config
    from pipeline.train.optim import build_optimizer, build_scheduler

    torch.manual_seed(job.train.seed)  # identical initial weights on every rank
    model = objective.build_module()
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
        if dist.get_rank() == 0:
            log.info("train.compile: the model is compiled with torch.compile (%s); the first step compiles it%s",
                     "block by block, between ZeRO-3's parameter gathers" if job.train.zero_stage == 3 else
                     "one graph", "; on the CPU a compiled step measured within 2% of an eager one "
                     "(docs/benchmarks.md)" if device.type == "cpu" and job.train.zero_stage < 3 else "")
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


def train_step(engine, objective, images: torch.Tensor, targets: torch.Tensor, *, micro_batch: int,
               accum: int) -> torch.Tensor:
    """One optimizer step over `accum` micro-batches of the objective's loss; DeepSpeed accumulates and steps at
    the boundary. Returns the step's loss: the mean over its micro-batches, detached."""
    total = torch.zeros((), device=images.device)
    for i in range(accum):
        part = slice(i * micro_batch, (i + 1) * micro_batch)
        loss = objective.loss(engine, images[part], targets[part])
        engine.backward(loss)
        engine.step()
        total += loss.detach()
    return total / accum
