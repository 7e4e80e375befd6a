"""The MAE benchmark at a tiny size: both objectives' steps on the trainer's engine, and the decode cores a GPU
needs, each figure from its own parts."""

import argparse

import pytest

from pipeline.benchmarks import mae_suite
from pipeline.train.flops import PEAK_BF16_FLOPS


def test_mae_benchmark_times_both_objectives_and_computes_the_decode_cores(capsys):
    parser = argparse.ArgumentParser()
    mae_suite.add_arguments(parser)
    args = parser.parse_args(["--modes", "step,cores", "--preset", "vit_demo_patch4_32", "--img-size", "32",
                              "--batch-size", "8", "--warmup", "1", "--rounds", "2", "--num-images", "16",
                              "--decode-rounds", "1"])
    results = mae_suite.run(args)

    rows = results["step"]["rows"]
    assert set(rows) == {"supervised", "mae"}
    for row in rows.values():
        assert row["images_per_s"] == pytest.approx(8 / row["step_s"])
    assert results["step"]["ratio"] == pytest.approx(rows["mae"]["images_per_s"] / rows["supervised"]["images_per_s"])
    assert rows["mae"]["forward_gflops"] < rows["supervised"]["forward_gflops"]  # a quarter of the patches encoded

    cores = results["cores"]
    assert cores["flops"]["mae"] == pytest.approx(19.56e9, rel=1e-3)  # ViT-B/16 with MAE's 512 x 8 decoder
    for name in ("supervised", "mae"):
        assert cores["gpu_rate"][name] == pytest.approx(0.45 * PEAK_BF16_FLOPS["H100"] / (3 * cores["flops"][name]))
        assert cores["cores"][name] == pytest.approx(cores["gpu_rate"][name] / cores["per_core"][name])
    out = capsys.readouterr().out
    assert "MAE ÷ supervised images/s" in out and "| mae | 19.56 | 7583 |" in out
