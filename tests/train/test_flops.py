"""Achieved TFLOP/s and MFU (pipeline/train/flops.py): the peak table, its override, the FLOPs count on a meta
copy, and the step line's and metrics' arithmetic."""

import time

import pytest
import torch

from pipeline.model import build_model, flops_per_image, preset_kwargs
from pipeline.train import flops
from pipeline.train.progress import Progress


def test_mfu_arithmetic_and_peak_lookup():
    # ViT-B/16 at 224: 35.2 GFLOPs forward; 3x for forward + backward
    assert flops.mfu(35.2e9, 4000.0, 989e12) == pytest.approx(3 * 35.2e9 * 4000 / 989e12)
    assert flops.mfu(1e9, 100.0, 1e12) == pytest.approx(0.3)
    assert flops.achieved_flops(1e9, 100.0) == pytest.approx(3e11)
    assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    # the longest key found in the name wins: "H100 PCIe" and "H100 NVL" over "H100"
    assert flops.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert flops.peak_flops("NVIDIA H100 NVL") == 835e12
    assert flops.peak_flops("NVIDIA H200") == 989e12
    assert flops.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert flops.peak_flops("NVIDIA H100 80GB HBM3", peak_tflops=500) == 500e12
    assert flops.peak_flops("Some Future GPU") is None
    assert flops.peak_flops("Some Future GPU", peak_tflops=2000) == 2000e12
    # the CPU has no table entry: no peak unless one is given
    assert flops.device_peak_flops(torch.device("cpu")) == (None, "cpu")
    assert flops.device_peak_flops(torch.device("cpu"), peak_tflops=1.5) == (1.5e12, "cpu")


@pytest.mark.parametrize("preset,img_size", [("vit_demo_patch4_32", 64), ("vit_demo_hybrid_patch1_32", 32),
                                             ("vit_small_patch16_224", 224)])
def test_flops_are_counted_on_a_meta_copy_at_the_runs_image_size(preset, img_size):
    model_args = preset_kwargs(preset, img_size=img_size)
    assert flops.model_flops_per_image(model_args) == flops_per_image(build_model(preset, img_size=img_size))
    if img_size != 32 and preset.startswith("vit_demo"):  # 4x the tokens: more than 4x the FLOPs (attention)
        assert flops.model_flops_per_image(model_args) > 4 * flops.model_flops_per_image(preset_kwargs(preset))


def test_step_metrics_give_tflops_per_device_and_mfu_from_images_per_s():
    progress = Progress(100, 0, images_per_step=64, forward_flops_per_image=2e9, world_size=1, peak_flops_per_s=1e12)
    for _ in range(3):
        progress.add(torch.tensor(2.0), data_wait_s=0.0)
    time.sleep(0.05)
    metrics, line = progress.flush_collective(3, 1e-3, world_size=1)
    assert metrics["train/tflops"] == pytest.approx(3 * 2e9 * metrics["train/images_per_s"] / 1e12)
    assert metrics["train/mfu"] == pytest.approx(metrics["train/tflops"] * 1e12 / 1e12)
    assert f"{metrics['train/tflops']:.3g} TFLOP/s/device" in line and f"MFU {100 * metrics['train/mfu']:.1f}%" in line

    no_peak = Progress(100, 0, images_per_step=64, forward_flops_per_image=2e9, world_size=1)
    no_peak.add(torch.tensor(2.0), data_wait_s=0.0)
    metrics, line = no_peak.flush_collective(1, 1e-3, world_size=1)
    assert "train/tflops" in metrics and "train/mfu" not in metrics
    assert "TFLOP/s/device" in line and "MFU" not in line
