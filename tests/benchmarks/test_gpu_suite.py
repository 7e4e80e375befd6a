"""The GPU machine's script, run here at a tiny size on the CPU: every part measures and the table holds it."""

import argparse

import pytest

from pipeline.benchmarks import gpu_suite


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    gpu_suite.add_arguments(parser)
    return parser.parse_args(argv)


def test_the_gpu_script_measures_every_part_at_a_tiny_size_on_the_cpu(ray_local, tmp_path, capsys):
    args = parse(["--device", "cpu", "--preset", "vit_demo_patch4_32", "--img-size", "32", "--batch-size", "8",
                  "--zero-stages", "2", "--compile", "off", "--warmup", "1", "--steps", "2", "--num-classes", "10",
                  "--peak-tflops", "1", "--cores", "2", "--num-images", "48", "--shard-size", "16",
                  "--data-batch-size", "8", "--rounds", "1", "--decode-images", "32", "--decode-batch-size", "16",
                  "--scaling", "1,2", "--workdir", str(tmp_path)])
    results = gpu_suite.run(args)

    [step] = results["steps"]
    assert (step["zero_stage"], step["compile"], step["dtype"]) == (2, False, "float32")
    assert step["images_per_s"] == pytest.approx(8 / step["median_step_s"])
    assert step["mfu"] == pytest.approx(3 * step["forward_flops"] * step["images_per_s"] / 1e12)
    decode = results["decode"]
    assert decode["images"] == 32 and decode["ratio"] == pytest.approx(decode["device_rate"] / decode["cpu_rate"])
    assert results["a_over_b"] > 0 and results["a_over_c"] > 0 and len(results["data_images_per_s"]) == 5
    scaling = results["scaling"]
    assert list(scaling) == [1, 2] and scaling[1]["efficiency"] == pytest.approx(1.0)
    assert scaling[2]["efficiency"] == pytest.approx(scaling[2]["images_per_s"] / (2 * scaling[1]["images_per_s"]))
    table = capsys.readouterr().out.split("| figure | measured | goal |")[1]
    assert table.count("\n| ") == 1 + 1 + 2 + 2  # step, decode, the two data ratios, two scaling rows
    assert f"{100 * step['mfu']:.1f} % MFU" in table and "capped at 2 CPUs" in table
