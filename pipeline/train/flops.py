"""Achieved TFLOP/s and MFU of a training run, from the model's forward FLOPs per image and its images/s.

Training FLOPs per image are 3 x the forward's (backward ~ 2 x forward), counted by
`pipeline.model.flops_per_image` at the run's image size: model FLOPs, so the recomputed forward of gradient
checkpointing is not counted. Achieved TFLOP/s are per device (per Train worker: one GPU each on GPU nodes),
which is what MFU compares with one card's peak. The peak is dense bf16 from a table of known cards, or given.
"""

from collections.abc import Callable

import torch
from torch import nn

from pipeline.model import VisionTransformer, flops_per_image

# dense bf16 peak FLOP/s by a substring of torch.cuda.get_device_name(); the longest matching key wins
PEAK_BF16_FLOPS = {
    "H100": 989e12,  # SXM ("NVIDIA H100 80GB HBM3")
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
}


def peak_flops(device_name: str, peak_tflops: float = 0.0) -> float | None:
    """Peak dense bf16 FLOP/s: `peak_tflops` when > 0, else the longest key of the table found in `device_name`;
    None for a card the table does not know."""
    if peak_tflops > 0:
        return peak_tflops * 1e12
    matches = [key for key in PEAK_BF16_FLOPS if key.lower() in device_name.lower()]
    return PEAK_BF16_FLOPS[max(matches, key=len)] if matches else None


def achieved_flops(forward_flops_per_image: float, images_per_s: float) -> float:
    """Training FLOP/s: forward + backward (~3 x forward) FLOPs per image times images/s."""
    return 3 * forward_flops_per_image * images_per_s


def mfu(forward_flops_per_image: float, images_per_s: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: forward + backward (~3 x forward) FLOPs per second over the peak."""
    return achieved_flops(forward_flops_per_image, images_per_s) / peak_flops_per_s


def model_flops_per_image(model_args: dict, build: Callable[..., nn.Module] = VisionTransformer) -> int:
    """Forward FLOPs of one image for `build(**model_args)` (a ViT, or an objective's module around it, as its
    forward runs), counted on a meta-device copy (no memory, no compute, no compiled graph touched)."""
    with torch.device("meta"):
        return flops_per_image(build(**model_args))


def device_peak_flops(device: torch.device, peak_tflops: float = 0.0) -> tuple[float | None, str]:
    """(peak FLOP/s or None, the device's name) for a run on `device`: `peak_tflops` when > 0 on any device, the
    table's entry for a GPU; None for the CPU (no table) or an unknown card."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if device.type != "cuda" and peak_tflops <= 0:
        return None, name
    return peak_flops(name, peak_tflops), name
