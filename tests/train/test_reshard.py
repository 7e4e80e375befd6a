"""A ZeRO-2 and a ZeRO-3 checkpoint saved by 2 ranks resume on 1, 2 and 3 ranks with the weights, the Adam
moments, the schedule and the step intact, and the next step's loss is the uninterrupted run's.

Real DeepSpeed engines from the trainer's `build_engine`, on a gloo process group; the ranks of one world size
are started together, each stage's checkpoint is saved once (by the 2-rank run, which then also resumes it at
its own size) and read by every resume. The global batch of each step is fixed; each rank takes its slice.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pipeline.benchmarks import free_port

STAGES = (2, 3)
SAVED_AT = 2  # steps before the checkpoint

WORKER = textwrap.dedent("""
    import argparse, dataclasses, json, logging, os, shutil, sys
    import torch
    from pipeline.train.engine import use_cpu_deepspeed
    use_cpu_deepspeed()
    import torch.distributed as dist
    from pipeline.config import JobConfig
    from pipeline.train.checkpoint import LoopState, gather_full_state_dict, load_checkpoint, save_checkpoint_collective
    from pipeline.train.engine import build_engine, train_step
    from pipeline.train.objectives import build_objective

    spec = json.loads(sys.argv[1])
    rank, world = spec["rank"], spec["world"]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spec["port"]), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("pipeline.train.reshard").addHandler(handler)
    logging.getLogger("pipeline.train.reshard").setLevel(logging.DEBUG)
    MODEL = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10)

    def engine_for(stage):
        job = JobConfig()
        job = dataclasses.replace(
            job, data=dataclasses.replace(job.data, img_size=16),
            train=dataclasses.replace(job.train, steps=10, global_batch_size=6, micro_batch_size=0, num_workers=world,
                                      zero_stage=stage, device="cpu", precision="fp32"))
        return build_engine(job.validate(), build_objective(job, MODEL), world, torch.device("cpu"))[0]

    def step(engine, number):
        # the same global batch of 6 (1, 2 and 3 ranks divide it) for step `number`; this rank's slice of it
        generator = torch.Generator().manual_seed(1000 + number)
        images = torch.randn(6, 3, 16, 16, generator=generator)
        targets = torch.randint(0, 10, (6,), generator=generator)
        part = slice(rank * 6 // world, (rank + 1) * 6 // world)
        loss = train_step(engine, build_objective(JobConfig(), MODEL), images[part], targets[part],
                          micro_batch=6 // world, accum=1)
        total = loss.detach() * (6 // world)
        dist.all_reduce(total)
        return (total / 6).item()

    def snapshot(engine):
        # a collective: the full fp32 weights and Adam moments, gathered from the ZeRO partitions
        from deepspeed.utils import lazy_init_hp_params_optimizer_state, safe_get_full_optimizer_state

        base = engine.optimizer.optimizer
        if hasattr(engine.optimizer, "single_partition_of_fp32_groups"):
            # ZeRO-1/2 link the Adam state of every param group to its parameters once, after the first group's
            # first step, when the other groups have none yet: link them all now
            for lp_params, flat in zip(engine.optimizer.bit16_groups, engine.optimizer.single_partition_of_fp32_groups):
                lazy_init_hp_params_optimizer_state(lp_params, flat, base.state)
        return {
            "weights": {name: value.clone() for name, value in gather_full_state_dict(engine).items()},
            "moments": {name: {key: safe_get_full_optimizer_state(param, key).detach().cpu().clone()
                               for key in ("exp_avg", "exp_avg_sq")}
                        for name, param in engine.module.named_parameters()},
            "lr": engine.lr_scheduler.get_last_lr(),
            "schedule_step": engine.lr_scheduler.last_epoch,
            "adam_steps": sorted({float(state["step"]) for state in base.state.values() if "step" in state}),
            "global_steps": engine.global_steps,
            "groups": [{k: v for k, v in group.items() if k != "params"} for group in base.param_groups],
        }

    def resume(stage, directory, **kwargs):
        engine = engine_for(stage)
        del messages[:]
        state = load_checkpoint(engine, directory, **kwargs)
        every_rank = [None] * world
        dist.all_gather_object(every_rank, list(messages))
        result = {"loop_step": state.step, "messages": every_rank, **snapshot(engine)}
        result["next_loss"] = step(engine, 3)
        engine.destroy()
        return result

    def error_of(stage, directory):
        try:
            load_checkpoint(engine_for(stage), directory)
        except Exception as err:
            return f"{type(err).__name__}: {err}"
        return None

    results = {}
    for stage in spec["stages"]:
        directory = os.path.join(spec["checkpoints"], f"zero{stage}")
        if spec["phase"] == "save":
            engine = engine_for(stage)
            for number in range(1, 3):
                step(engine, number)
            save_checkpoint_collective(engine, directory, rank=rank, state=LoopState(step=2), model_config={})
            saved = snapshot(engine)
            saved["next_loss"] = step(engine, 3)
            engine.destroy()
            results[stage] = {"saved": saved, "resumed": resume(stage, directory)}
        else:
            results[stage] = {"resumed": resume(stage, directory)}
            if world == 3 and stage == 2:
                # two ranks of local rank 0 on one host name: the third cannot tell whose conversion it sees
                results["split"] = resume(stage, directory, local_rank=[0, 1, 0][rank])
            if world == 1 and stage == 2:
                # a checkpoint missing a rank's file, and one holding what weights-only loading refuses
                broken = os.path.join(spec["scratch"], "broken")
                shutil.copytree(directory, broken)
                os.remove(os.path.join(broken, "deepspeed", "zero_pp_rank_1_mp_rank_00_optim_states.pt"))
                results["incomplete"] = error_of(stage, broken)
                shutil.rmtree(broken)
                shutil.copytree(directory, broken)
                torch.save({"optimizer_state_dict": argparse.Namespace(x=1)},
                           os.path.join(broken, "deepspeed", "zero_pp_rank_1_mp_rank_00_optim_states.pt"))
                results["unsafe"] = error_of(stage, broken)
                shutil.rmtree(broken)
    if rank == 0:
        torch.save(results, spec["out"])
""")


def run_ranks(world: int, phase: str, checkpoints: Path, scratch: Path) -> dict:
    """All ranks of one world size, started together; rank 0's results."""
    scratch.mkdir(parents=True, exist_ok=True)
    out = scratch / f"results-{phase}-{world}.pt"
    port = free_port()
    # this checkout's pipeline package first; TMPDIR, where the conversions go, one per world size
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "TMPDIR": str(scratch),
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    ranks = [subprocess.Popen([sys.executable, "-c", WORKER, json.dumps({
        "rank": rank, "world": world, "port": port, "phase": phase, "stages": list(STAGES),
        "checkpoints": str(checkpoints), "scratch": str(scratch), "out": str(out)})],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(world)]
    outputs = []
    for process in ranks:
        try:
            outputs.append(process.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for other in ranks:
                other.kill()
            raise
    failed = [(rank, output) for rank, (process, output) in enumerate(zip(ranks, outputs, strict=True))
              if process.returncode]
    assert not failed, f"{phase} on {world} ranks: rank {failed[0][0]} failed:\n{failed[0][1][-4000:]}"
    return torch.load(out, weights_only=False)


def files_of(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Save on 2 ranks (and resume there), then resume the same checkpoints on 1 and on 3 ranks."""
    root = tmp_path_factory.mktemp("reshard")
    checkpoints = root / "checkpoints"
    saved = run_ranks(2, "save", checkpoints, root / "scratch-2")
    before = files_of(checkpoints)
    resumed = {world: run_ranks(world, "resume", checkpoints, root / f"scratch-{world}") for world in (1, 3)}
    return {"saved": saved, "resumed": resumed, "root": root, "unchanged": files_of(checkpoints) == before}


def assert_resumed_as_saved(saved: dict, resumed: dict) -> None:
    assert resumed["weights"].keys() == saved["weights"].keys()
    for name, value in saved["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], value, rtol=0, atol=1e-6, msg=name)
    for name, moments in saved["moments"].items():
        for key, value in moments.items():
            torch.testing.assert_close(resumed["moments"][name][key], value, rtol=0, atol=1e-6,
                                       msg=f"{name} {key}")
    assert resumed["lr"] == pytest.approx(saved["lr"], rel=1e-12)
    assert resumed["schedule_step"] == saved["schedule_step"] == SAVED_AT
    assert resumed["adam_steps"] == saved["adam_steps"] == [float(SAVED_AT)]
    assert resumed["global_steps"] == saved["global_steps"] == SAVED_AT
    assert resumed["loop_step"] == SAVED_AT
    # each param group keeps its own hyperparameters (weight decay on some, not on others)
    assert resumed["groups"] == saved["groups"]
    assert len({group["weight_decay"] for group in saved["groups"]}) == 2
    assert resumed["next_loss"] == pytest.approx(saved["next_loss"], rel=1e-5)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("world", (1, 3))
def test_a_checkpoint_of_2_ranks_resumes_on_another_number(runs, stage, world):
    saved = runs["saved"][stage]["saved"]
    resumed = runs["resumed"][world][stage]["resumed"]
    assert_resumed_as_saved(saved, resumed)
    [line] = [m for m in resumed["messages"][0] if m.startswith("resharding")]  # rank 0's, and only rank 0's
    assert not [m for lines in resumed["messages"][1:] for m in lines if m.startswith("resharding")]
    assert line.startswith(f"resharding checkpoint of 2 ranks to {world}: converted in ") and line.endswith(" s")
    assert conversions(resumed) == [0]  # once per machine, by its local rank 0


def conversions(resumed: dict) -> list[int]:
    """The ranks that converted the checkpoint (their debug lines)."""
    return [rank for rank, lines in enumerate(resumed["messages"]) for line in lines
            if line.startswith(f"rank {rank} converted ")]


def test_ranks_that_cannot_tell_their_machines_conversion_convert_for_themselves(runs):
    split = runs["resumed"][3]["split"]
    assert_resumed_as_saved(runs["saved"][2]["saved"], split)
    assert conversions(split) == [0, 1, 2]


@pytest.mark.parametrize("stage", STAGES)
def test_a_checkpoint_resumes_on_its_own_number_of_ranks_without_conversion(runs, stage):
    assert_resumed_as_saved(runs["saved"][stage]["saved"], runs["saved"][stage]["resumed"])
    assert runs["saved"][stage]["resumed"]["messages"] == [[], []]


def test_resharding_only_reads_the_checkpoint_and_removes_its_conversions(runs):
    assert runs["unchanged"]
    for world in (1, 2, 3):
        left = [p.name for p in (runs["root"] / f"scratch-{world}").iterdir() if p.name.startswith("vit-reshard-")]
        assert left == []


def test_a_checkpoint_that_cannot_be_converted_says_why(runs):
    incomplete, unsafe = runs["resumed"][1]["incomplete"], runs["resumed"][1]["unsafe"]
    assert incomplete.startswith("ReshardError: ") and "records 2 ranks but holds 1 ZeRO optimizer files" in incomplete
    assert unsafe.startswith("ReshardError: ") and "cannot be loaded with weights_only=True" in unsafe
