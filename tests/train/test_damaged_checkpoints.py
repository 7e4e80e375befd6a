"""Checkpoints damaged after they were saved (a file cut short, bytes changed): the resume checks them against the
checksums written at save, goes back to the newest whole one Ray keeps, or ends the job in one line naming the
file. Through `LocalContext` in a fresh interpreter, on the digits-like shards of the local training tests."""

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.train.test_local_training import write_shards

PROGRAM = Path(__file__).with_name("damaged_checkpoint_program.py")


def test_a_damaged_checkpoint_gives_way_to_the_newest_whole_one_or_ends_the_job_naming_its_file(tars, tmp_path):
    write_shards(tars)
    folder = tars.folder / "s"
    common = [f"data.train={folder}/train-*.tar", f"data.val={folder}/val-*.tar", "data.img_size=16",
              "data.local_shuffle_buffer=0", "data.decode_batch_size=4", "model.args={depth: 1}",
              "train.num_workers=1", "train.global_batch_size=4", "train.checkpoint_every_n_steps=2",
              "train.eval_every_n_steps=0", "train.log_every_n_steps=1", "optim.warmup_steps=1",
              f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    args = {"config": "jobs/configs/digits_pretrain.yaml", "common": common, "folder": str(tmp_path)}
    done = subprocess.run([sys.executable, str(PROGRAM), json.dumps(args)], capture_output=True, text=True,
                          timeout=600, check=False, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    phases = {line.split(" ", 2)[1]: json.loads(line.split(" ", 2)[2])
              for line in done.stdout.splitlines() if line.startswith("PHASE ")}
    store = tmp_path / "store"

    whole = phases["whole"]
    assert whole["step"] == 6 and whole["reports"][-3:] == [2, 4, 6] and whole["lines"] == []
    manifest = json.loads((store / "checkpoint_000002" / "checksums" / "rank-00000.json").read_text())
    assert {"model.safetensors", "train_state.json", "config.json"} <= set(manifest)
    assert any(path.startswith("deepspeed/") and path.endswith("optim_states.pt") for path in manifest)

    # the newest cut short: one line names it and the file, and the run resumes at step 4 from the one before
    newest = phases["newest_cut"]
    assert newest["step"] == 8 and newest["reports"][3:] == [6, 8]
    [warning, resumed] = newest["lines"]
    assert warning.startswith(f"checkpoint {store}/checkpoint_000002 is damaged (deepspeed/") and \
        " bytes, against " in warning and " when saved): resuming from the newest whole one before it" in warning, \
        warning
    assert resumed.startswith(f"resumed from {store}/checkpoint_000001 at step 4 "), resumed

    # nothing whole before a damaged newest: the job ends in one line, and does not start from scratch
    [bytes_changed] = [name for name in json.loads((store / "checkpoint_000004" / "checksums" / "rank-00000.json")
                                                   .read_text()) if name.endswith("model_states.pt")]
    none = phases["none_whole"]
    assert none["error"] == (f"CheckpointDamaged: checkpoint {store}/checkpoint_000004 is damaged ({bytes_changed} "
                             "is not what was saved: its CRC-32 differs), and no whole checkpoint is kept before it: "
                             "resume_from a good one, or start anew under another train.run_name")
    assert none["reports"] == newest["reports"]

    # train.resume_from: its sizes are checked before the job starts, its contents where the workers read it
    assert phases["resume_from_flipped"]["error"] == (
        f"CheckpointDamaged: train.resume_from: {store}/checkpoint_000004 is damaged: {bytes_changed} is not what "
        "was saved: its CRC-32 differs")
    cut = phases["resume_from_cut"]["error"]
    assert cut.startswith(f"train.resume_from: {store}/checkpoint_000002 is damaged: deepspeed/") and \
        re.search(r" is [\d,]+ bytes, against [\d,]+ when saved$", cut), cut
