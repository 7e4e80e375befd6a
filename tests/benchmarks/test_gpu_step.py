import pytest

from pipeline.benchmarks import gpu_step


def test_mfu_arithmetic_and_peak_lookup():
    # ViT-B/16 at 224: 35.2 GFLOPs forward; 3x for forward + backward
    assert gpu_step.mfu(35.2e9, 4000.0, 989e12) == pytest.approx(3 * 35.2e9 * 4000 / 989e12)
    assert gpu_step.mfu(1e9, 100.0, 1e12) == pytest.approx(0.3)
    assert gpu_step.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_step.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_step.peak_flops("NVIDIA H200") == 989e12
    assert gpu_step.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_step.peak_flops("NVIDIA H100 80GB HBM3", peak_tflops=500) == 500e12
    with pytest.raises(ValueError, match="--peak-tflops"):
        gpu_step.peak_flops("Some Future GPU")
