"""The DeepSpeed config from the typed settings, and real `deepspeed.initialize` calls for models of any size."""

import textwrap

import pytest

from pipeline.train.deepspeed_config import BUCKET_ALIGNMENT, build_deepspeed_config


def test_deepspeed_config_follows_the_typed_settings():
    config = build_deepspeed_config(micro_batch_size=8, grad_accum_steps=4, world_size=2, zero_stage=3, bf16=True,
                                    grad_clip=1.0, offload_optimizer=True)
    assert config["train_batch_size"] == 64 and config["gradient_accumulation_steps"] == 4
    assert config["zero_optimization"]["stage"] == 3 and config["bf16"]["enabled"] is True
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "optimizer" not in config  # the trainer passes a torch AdamW instance
    assert "reduce_bucket_size" not in config["zero_optimization"]  # DeepSpeed's default without a model size
    for num_params, bucket in [(5_000_000, 5_000_192), (459_077, 459_264), (512, 512), (1, 512), (10**10, 500_000_256)]:
        zero = build_deepspeed_config(micro_batch_size=8, grad_accum_steps=1, world_size=2, zero_stage=2, bf16=True,
                                      grad_clip=1.0, num_params=num_params)["zero_optimization"]
        assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == bucket
        assert bucket % BUCKET_ALIGNMENT == 0 and bucket >= min(num_params, 5 * 10**8)
    with pytest.raises(ValueError, match="offload_optimizer needs ZeRO stage"):
        build_deepspeed_config(micro_batch_size=8, grad_accum_steps=1, world_size=1, zero_stage=0, bf16=False,
                               grad_clip=1.0, offload_optimizer=True)


# One process (DeepSpeed wants a process group; this one is gloo, world size 1) builds the trainer's engine for
# each class count and ZeRO stage with the job's own build_engine, and takes one optimizer step.
ENGINES = textwrap.dedent("""
    import json, os, sys
    import torch
    from pipeline.train.engine import use_cpu_deepspeed
    use_cpu_deepspeed()
    import torch.distributed as dist
    from pipeline.config import load_job_config
    from pipeline.model import preset_kwargs
    from pipeline.train.engine import build_engine, train_step
    from pipeline.train.objectives import build_objective

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    results = []
    for num_classes in (3, 5, 7, 1000):
        for stage in (1, 2, 3):
            job = load_job_config(None, [f"train.zero_stage={stage}", "train.num_workers=1",
                                         "train.global_batch_size=4", "data.img_size=32", "optim.label_smoothing=0"])
            args = preset_kwargs("vit_demo_patch4_32", num_classes=num_classes, img_size=32)
            objective = build_objective(job, args)
            engine, _ = build_engine(job, objective, 1, torch.device("cpu"))
            before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
            images = torch.randn(4, 3, 32, 32)
            targets = torch.randint(0, num_classes, (4,))
            loss = train_step(engine, objective, images, targets, micro_batch=4, accum=1)
            changed = stage == 3 or any(not torch.equal(before[n], p) for n, p in engine.module.named_parameters())
            zero = engine.config["zero_optimization"]
            results.append({"classes": num_classes, "stage": stage, "loss": loss.item(), "changed": changed,
                            "params": sum(p.numel() for p in before.values()) if stage < 3 else None,
                            "bucket": zero["reduce_bucket_size"], "step": engine.global_steps})
            engine.destroy()
    print("RESULTS " + json.dumps(results))
""")


def test_any_class_count_builds_and_steps_at_every_zero_stage(results_script):
    results = results_script(ENGINES)
    assert [(r["classes"], r["stage"]) for r in results] == [(c, s) for c in (3, 5, 7, 1000) for s in (1, 2, 3)]
    for r in results:
        assert r["step"] == 1 and r["changed"] and 0.0 < r["loss"] < 20.0, r
        assert r["bucket"] % BUCKET_ALIGNMENT == 0, r
    # the demo ViT has 97 * classes + 458,592 parameters: odd for every odd class count
    assert {r["classes"]: r["params"] for r in results if r["stage"] == 1} == {
        c: 458_592 + 97 * c for c in (3, 5, 7, 1000)}
