import argparse

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
