"""The make_shards job end to end, and the data config's validation."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

from pipeline.config import DataConfig

JOB = Path(__file__).resolve().parents[2] / "jobs" / "make_shards.py"


def load_job():
    spec = importlib.util.spec_from_file_location("make_shards_job", JOB)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def test_make_shards_digits_then_index(tmp_path, capsys):
    job = load_job()
    out = tmp_path / "digits"
    assert job.main(["--out", str(out), "--max-count", "500", "--img-size", "24", "--no-progress"]) == 0
    assert "train: 1438 samples, 3 shards" in capsys.readouterr().out
    train = json.loads((out / "train.manifest.json").read_text())
    assert [s["num_samples"] for s in train["shards"]] == [500, 500, 438]
    assert json.loads((out / "val.manifest.json").read_text())["num_samples"] == 359
    os.remove(out / "val.manifest.json")
    assert job.main(["--source", f"shards:{out}/val-*.tar", "--classes", ",".join("0123456789"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"val: 359 samples in 1 shards (1 from their tar headers) -> {out}/val.manifest.json" in printed
    assert "labels: .cls members" in printed and "classes:" not in printed
    indexed = json.loads((out / "val.manifest.json").read_text())
    assert indexed["num_samples"] == 359 and indexed["classes"] == list("0123456789")
    assert indexed["sample_members"] == ["cls", "jpg", "json"]


def test_make_shards_errors_are_one_line(tmp_path, capsys):
    job = load_job()
    assert job.main(["--source", f"shards:{tmp_path}/{{00000..00002}}.tar", "--no-progress"]) == 2
    missing = ", ".join(f"{tmp_path}/{i:05d}.tar" for i in range(3))
    assert capsys.readouterr().err == f"error: 3 of 3 shards do not exist: {missing}\n"
    assert job.main(["--source", f"imagefolder:{tmp_path}/nothing"]) == 2
    assert capsys.readouterr().err.startswith("error: imagefolder root")


def test_every_flag_has_help():
    parser = load_job().build_parser()
    flags = [a for a in parser._actions if a.dest != "help"]
    assert len(flags) == 12 and all(a.help for a in flags)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("img_size", 0, "data.img_size"),
    ("crop_pct", 1.5, "data.crop_pct"),
    ("rrc_scale", (0.5, 0.1), "data.rrc_scale"),
    ("rrc_ratio", (0.0, 1.0), "data.rrc_ratio"),
    ("max_bad_fraction", 2.0, "data.max_bad_fraction"),
    ("decode_num_cpus", 0, "data.decode_num_cpus"),
])
def test_data_config_validation_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**{field: value}).validate()
    assert DataConfig().validate() == DataConfig()
