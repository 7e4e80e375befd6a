"""Run by test_damaged_checkpoints.py in a fresh interpreter: a run through LocalContext whose checkpoints get
damaged between its jobs, as a full disk or a killed upload leaves them. Prints one JSON line per phase."""

import json
import logging
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_job_config
from pipeline.train.checkpoint import CheckpointDamaged
from pipeline.train.context import LocalContext
from pipeline.train.loop import run_training
from pipeline.train.resolved_job import resolve_job

args = json.loads(sys.argv[1])
lines: list[str] = []
handler = logging.Handler()
handler.emit = lambda record: lines.append(record.getMessage())
logging.getLogger("pipeline").addHandler(handler)
logging.getLogger("pipeline").setLevel(logging.INFO)


def job(*overrides: str):
    return resolve_job(load_job_config(args["config"], [*args["common"], *overrides]), "pretrain")[0]


def cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def flip(path: Path) -> None:  # the same size, other bytes: only the checksum tells
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def phase(name: str, ctx: LocalContext, *overrides: str) -> None:
    lines.clear()
    try:
        state = run_training(job(*overrides), ctx)
        out = {"step": state.step}
    except (CheckpointDamaged, ConfigError) as err:
        out = {"error": f"{type(err).__name__}: {err}"}
    out.update(reports=[report["step"] for report in ctx.reports],
               lines=[line for line in lines if " is damaged" in line or line.startswith("resumed from")])
    print("PHASE", name, json.dumps(out), flush=True)


store = Path(args["folder"]) / "store"
ctx = LocalContext(store)
phase("whole", ctx, "train.steps=6")  # checkpoints 0, 1, 2 at steps 2, 4, 6
[optim] = (store / "checkpoint_000002" / "deepspeed").glob("*optim_states.pt")
cut(optim)
phase("newest_cut", ctx, "train.steps=8")  # from checkpoint 1 (step 4): checkpoints 3, 4 at steps 6, 8
[model_states] = (store / "checkpoint_000004" / "deepspeed").glob("mp_rank_*_model_states.pt")
flip(model_states)
for older in range(4):
    cut(store / f"checkpoint_{older:06d}" / "model.safetensors")
phase("none_whole", ctx, "train.steps=10")
phase("resume_from_flipped", LocalContext(Path(args["folder"]) / "other"), "train.steps=10",
      f"train.resume_from={store / 'checkpoint_000004'}")
try:
    job("train.steps=10", f"train.resume_from={store / 'checkpoint_000002'}")
except ConfigError as err:
    print("PHASE", "resume_from_cut", json.dumps({"error": str(err)}), flush=True)
