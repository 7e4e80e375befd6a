import argparse
import math

import pytest

from pipeline.benchmarks import train_speed


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train_speed.add_arguments(parser)
    return parser.parse_args(argv)


def test_mfu_arithmetic_and_peak_lookup():
    # ViT-B/16 at 224: 35.2 GFLOPs forward; 3x for forward + backward
    assert train_speed.mfu(35.2e9, 4000.0, 989e12) == pytest.approx(3 * 35.2e9 * 4000 / 989e12)
    assert train_speed.mfu(1e9, 100.0, 1e12) == pytest.approx(0.3)
    assert train_speed.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert train_speed.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert train_speed.peak_flops("NVIDIA H200") == 989e12
    assert train_speed.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert train_speed.peak_flops("NVIDIA H100 80GB HBM3", peak_tflops=500) == 500e12
    with pytest.raises(ValueError, match="--peak-tflops"):
        train_speed.peak_flops("Some Future GPU")


def test_train_benchmark_measures_all_three_modes(ray_local, capsys):
    # the memory mode uses ViT-Ti/16's weights at 32 px (4 patches): its qkv and MLP matrices are above ZeRO-3's
    # persistence threshold (1e5 elements), as in a real run, while the demo model's are all below it
    args = parse(["--modes", "overhead,memory,gpu", "--device", "cpu", "--cores", "2",
                  "--preset", "vit_demo_patch4_32", "--img-size", "32", "--batch-size", "8", "--num-classes", "10",
                  "--warmup", "1", "--steps", "2", "--rounds", "2",
                  "--memory-preset", "vit_tiny_patch16_224", "--memory-img-size", "32", "--memory-precisions", "bf16",
                  "--gpu-preset", "vit_demo_patch4_32", "--gpu-img-size", "32", "--gpu-batch-size", "8",
                  "--gpu-warmup", "1", "--gpu-steps", "2", "--peak-tflops", "1"])
    results = train_speed.run(args)

    overhead = results["overhead"]
    assert set(overhead["median_step_s"]) == {"plain torch", "Ray Train + DeepSpeed ZeRO-0",
                                              "Ray Train + DeepSpeed ZeRO-2"}
    assert all(0 < seconds < 30 for seconds in overhead["median_step_s"].values())
    for ratios in (overhead["ratio"], overhead["round_ratio"], overhead["fastest_ratio"]):
        assert len(ratios) == 2 and all(math.isfinite(r) and r > 0 for r in ratios.values())
    # the same initial weights, batch and optimizer: the first loss is identical on every side
    first_losses = [details["losses"][0] for details in overhead["details"].values()]
    assert max(first_losses) - min(first_losses) < 1e-4
    assert {details["threads"] for details in overhead["details"].values()} == {2}

    memory = results["memory"]
    for precision in ("bf16",):  # the GPU precision, and the only DeepSpeed bf16 engines built in the suite
        state = {stage: memory[f"{precision} ZeRO-{stage}"]["state"] for stage in range(4)}
        assert all(state[stage] < state[0] for stage in (1, 2, 3)), state
        assert state[3] == min(state.values()), state
        assert state[0] >= 16 * memory[f"{precision} ZeRO-0"]["num_params"]  # params + grads + two moments
        # ZeRO-3's reduce bucket is capped at the model's size instead of DeepSpeed's 5e8 elements
        assert memory[f"{precision} ZeRO-3"]["buckets"] <= 4 * memory[f"{precision} ZeRO-3"]["num_params"]

    gpu = results["gpu"]
    assert gpu["images_per_s"] > 0 and gpu["forward_flops"] > 0
    assert gpu["mfu"] == pytest.approx(3 * gpu["forward_flops"] * gpu["images_per_s"] / 1e12)

    out = capsys.readouterr().out
    assert "### Orchestration overhead" in out and "### Per-rank state bytes" in out and "### GPU" in out
