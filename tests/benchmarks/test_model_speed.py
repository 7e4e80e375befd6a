import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.benchmarks import model_speed


def test_model_benchmark_times_both_models_on_identical_weights(capsys):
    parser = argparse.ArgumentParser()
    model_speed.add_arguments(parser)
    args = parser.parse_args(["--preset", "vit_demo_patch4_32", "--img-size", "32", "--batch-size", "4",
                              "--warmup", "1", "--iters", "4", "--device", "cpu"])
    result = model_speed.run(args)
    assert set(result["median_step_s"]) == {"ours", "timm"}
    assert all(0 < seconds < 10 for seconds in result["median_step_s"].values())
    assert 0.2 < result["ratio"] < 5 and 0.2 < result["pair_ratio"] < 5
    table = capsys.readouterr().out
    assert "| ours |" in table and "| timm |" in table and "ratio ours / timm" in table

    ours, theirs = model_speed.build_pair("vit_demo_patch4_32", 32, "cpu", "avg")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours.eval()(images), theirs.eval()(images), atol=1e-5)


ROOT = Path(__file__).resolve().parents[2]


def test_compiled_against_eager_with_the_compile_time(capsys):
    parser = argparse.ArgumentParser()
    model_speed.add_arguments(parser)
    args = parser.parse_args(["--preset", "vit_demo_patch4_32", "--img-size", "32", "--batch-size", "8",
                              "--warmup", "1", "--iters", "4", "--device", "cpu", "--compile"])
    result = model_speed.run(args)
    assert set(result["median_step_s"]) == {"eager", "compiled"}
    assert 0.2 < result["ratio"] < 5 and 0.2 < result["pair_ratio"] < 5
    # the first compiled step traces and generates code: far longer than a step
    assert result["first_step_s"]["compiled"] > 3 * result["median_step_s"]["compiled"]
    assert result["compile_s"] == pytest.approx(result["first_step_s"]["compiled"] - result["median_step_s"]["eager"])
    table = capsys.readouterr().out
    assert "| eager |" in table and "| compiled |" in table and "ratio compiled / eager" in table


def test_compiled_against_eager_trainer_steps_under_zero():
    # in its own process: the benchmark sets up DeepSpeed's CPU accelerator and a process group of one
    done = subprocess.run([sys.executable, "jobs/benchmark.py", "model", "--preset", "vit_demo_patch4_32",
                           "--img-size", "32", "--batch-size", "8", "--warmup", "1", "--iters", "4", "--device", "cpu",
                           "--compile", "--zero-stage", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the trainer's step (DeepSpeed ZeRO-2, AdamW, 1 process)" in done.stdout
    rows = dict(re.findall(r"^\| (eager|compiled) \| ([\d.]+) \|", done.stdout, re.M))
    assert float(rows["compiled"]) > float(rows["eager"])  # its first step compiles
    ratio = float(re.search(r"ratio compiled / eager \(medians\): ([\d.]+)", done.stdout).group(1))
    assert 0.2 < ratio < 5
    with pytest.raises(SystemExit, match="add --compile"):
        model_speed.run(parse_bare(["--zero-stage", "2"]))


def parse_bare(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    model_speed.add_arguments(parser)
    return parser.parse_args(argv)
