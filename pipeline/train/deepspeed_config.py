"""The DeepSpeed config dict, built from our typed settings rather than written by hand per run."""

DEEPSPEED_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's default reduce/allgather bucket size
# ZeRO-1/2 require allgather_bucket_size to be a multiple of their start alignment (2 elements: 4 bytes of
# fp16); a multiple of 512 elements satisfies that, and any alignment DeepSpeed asks of a bucket's start
BUCKET_ALIGNMENT = 512


def build_deepspeed_config(*, micro_batch_size: int, grad_accum_steps: int, world_size: int, zero_stage: int,
                           bf16: bool, grad_clip: float, offload_optimizer: bool = False, num_params: int = 0) -> dict:
    """The caller passes a torch optimizer instance to `deepspeed.initialize`, so the config has no optimizer
    section (on the CPU that avoids JIT-building DeepSpeed's fused_adam).

    With `num_params`, ZeRO's communication buckets are capped at the model's size, rounded up to
    `BUCKET_ALIGNMENT`: DeepSpeed's default of 5e8 elements is allocated whole by ZeRO-3 (1.9 GiB per rank in
    fp32 for a 22M-parameter ViT-S, docs/benchmarks.md), more than the model state it partitions."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"train.zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if offload_optimizer and zero_stage == 0:
        raise ValueError("train.offload_optimizer needs ZeRO stage 1, 2 or 3")
    zero: dict = {"stage": zero_stage}
    if zero_stage >= 1:
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_scatter=True)
        if num_params > 0:
            bucket = -(-min(DEEPSPEED_BUCKET_ELEMENTS, num_params) // BUCKET_ALIGNMENT) * BUCKET_ALIGNMENT
            zero.update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
    if zero_stage == 3:
        # the consolidated fp32 weights are gathered by pipeline.train.checkpoint, not by DeepSpeed's saver
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # a torch.optim.AdamW instance under ZeRO
        "steps_per_print": 10**9,  # our own log lines replace DeepSpeed's
        "wall_clock_breakdown": False,
    }
