"""`train.compile=true`: the trainer's engine (`build_engine`) compiled with torch.compile (inductor, on the CPU)
trains as the eager one does at ZeRO 0-3 (ZeRO-3 with its blocks as leaf modules), with gradient checkpointing
too, its checkpoints load into an eager engine and the other way, and eval runs eager (no graph compiled for its
batch sizes)."""

import textwrap

import pytest

# One process (DeepSpeed wants a process group; this one is gloo, world size 1). Per ZeRO stage: an eager and a
# compiled engine with the same initial weights take the same 2 steps and save; each checkpoint then loads into a
# fresh engine of the other kind, which takes step 3; the uninterrupted engines take step 3 too.
ENGINES = textwrap.dedent("""
    import dataclasses, json, os, sys, tempfile
    import torch
    from pipeline.train.engine import use_cpu_deepspeed
    use_cpu_deepspeed()
    import torch.distributed as dist
    from torch._dynamo.utils import counters
    from pipeline.config import JobConfig
    from pipeline.model import VisionTransformer
    from pipeline.train.checkpoint import LoopState, load_checkpoint, read_weights, save_checkpoint_collective
    from pipeline.train.evaluate import evaluate_collective
    from pipeline.train.inputs import InputPipeline
    from pipeline.train.engine import build_engine, eager_forward, train_step
    from pipeline.train.objectives import build_objective

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=0, world_size=1)
    MODEL = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10)  # token pool

    def engine_for(stage, compile, grad_checkpointing=False):
        job = JobConfig()
        job = dataclasses.replace(
            job, data=dataclasses.replace(job.data, img_size=16),
            model=dataclasses.replace(job.model, grad_checkpointing=grad_checkpointing),
            train=dataclasses.replace(job.train, steps=10, global_batch_size=6, micro_batch_size=3, num_workers=1,
                                      zero_stage=stage, device="cpu", precision="fp32", compile=compile))
        return build_engine(job.validate(), build_objective(job, MODEL), 1, torch.device("cpu"))[0]

    def step(engine, number):
        generator = torch.Generator().manual_seed(1000)  # the same batch each step: the loss falls
        images = torch.randn(6, 3, 16, 16, generator=generator)
        targets = torch.randint(0, 10, (6,), generator=generator)
        return train_step(engine, build_objective(JobConfig(), MODEL), images, targets, micro_batch=3, accum=2).item()

    class Stream:  # what evaluate_collective reads: batches of uint8 images and labels, the last one partial
        def iter_torch_batches(self, batch_size, drop_last):
            generator = torch.Generator().manual_seed(7)
            images = torch.randint(0, 256, (11, 3, 16, 16), dtype=torch.uint8, generator=generator)
            labels = torch.randint(0, 10, (11,), generator=generator)
            for start in range(0, 11, batch_size):
                yield {"image": images[start:start + batch_size], "label": labels[start:start + batch_size]}

    inputs = InputPipeline((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), torch.device("cpu"), torch.float32, num_classes=10)
    results, folder = {}, tempfile.mkdtemp()
    for stage in (0, 1, 2, 3):
        out = {}
        for kind in ("eager", "compiled"):
            engine = engine_for(stage, kind == "compiled")
            out[kind] = {"compiled": engine.is_compiled, "losses": [step(engine, 1), step(engine, 2)]}
            save_checkpoint_collective(engine, f"{folder}/{stage}-{kind}", rank=0, state=LoopState(step=2),
                                       model_config={})
            graphs = counters["stats"]["unique_graphs"]
            with eager_forward(engine):
                out[kind]["val"] = evaluate_collective(engine, Stream(), inputs, batch_size=4, world_size=1,
                                                       image_shape=(3, 16, 16))
            out[kind]["eval_graphs"] = counters["stats"]["unique_graphs"] - graphs
            if stage == 0 and kind == "compiled":  # what eager_forward spares: eval's own graphs, compiled
                evaluate_collective(engine, Stream(), inputs, batch_size=4, world_size=1, image_shape=(3, 16, 16))
                out[kind]["eval_graphs_compiled"] = counters["stats"]["unique_graphs"] - graphs
            out[kind]["keys"] = sorted(engine.module.state_dict())
            out[kind]["losses"].append(step(engine, 3))
            engine.destroy()
        for kind, other in (("eager", "compiled"), ("compiled", "eager")):  # the other kind's checkpoint
            engine = engine_for(stage, kind == "compiled")
            out[kind]["resumed_at"] = load_checkpoint(engine, f"{folder}/{stage}-{other}").step
            out[kind]["step3_from_other"] = step(engine, 3)
            engine.destroy()
        out["saved_keys"] = sorted(read_weights(f"{folder}/{stage}-compiled"))
        results[stage] = out
    for kind in ("eager", "compiled"):  # gradient checkpointing, under ZeRO-3: blocks recomputed, re-gathered
        engine = engine_for(3, kind == "compiled", grad_checkpointing=True)
        results[f"checkpointing-{kind}"] = [step(engine, n) for n in (1, 2, 3)]
        engine.destroy()
    results["model_keys"] = sorted(VisionTransformer(**MODEL).state_dict())
    results["graphs"] = counters["stats"]["unique_graphs"]
    print("RESULTS " + json.dumps(results))
""")


def test_compiled_engines_train_checkpoint_and_evaluate_as_eager_ones_at_every_zero_stage(results_script):
    results = results_script(ENGINES)
    assert results["graphs"] >= 2  # it compiled: the training graph, and the one with checkpointed blocks
    for stage in ("0", "1", "2", "3"):
        eager, compiled = results[stage]["eager"], results[stage]["compiled"]
        assert (eager["compiled"], compiled["compiled"]) == (False, True)
        assert compiled["losses"] == pytest.approx(eager["losses"], abs=1e-5), stage
        assert eager["losses"][2] < eager["losses"][0]  # it trains
        # the same state_dict keys, the model's own: a checkpoint loads either way
        assert compiled["keys"] == eager["keys"] == results["model_keys"] == results[stage]["saved_keys"]
        for kind in (eager, compiled):
            assert kind["resumed_at"] == 2
            assert kind["step3_from_other"] == pytest.approx(eager["losses"][2], abs=1e-5), stage
        # eval ran eager: the same metrics and no graph compiled for its batches of 4, 4 and 3
        assert compiled["eval_graphs"] == 0, stage
        if stage == "0":
            assert compiled["eval_graphs_compiled"] >= 1
        assert compiled["val"]["val/images"] == 11
        assert compiled["val"] == pytest.approx(eager["val"], abs=1e-5), stage
    assert results["checkpointing-compiled"] == pytest.approx(results["checkpointing-eager"], abs=1e-5)
    assert results["checkpointing-eager"] == pytest.approx(results["3"]["eager"]["losses"], abs=1e-5)
